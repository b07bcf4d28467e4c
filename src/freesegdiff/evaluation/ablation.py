"""Ablation grids: the evaluation of every combination of settings in a grid file, one table.

A grid file (JSON, or TOML on Python 3.11+) names the settings every run shares and one or more
*studies*, each the product of its *axes*::

    {
      "description": "what the grid is for",
      "preset": "paper",                       # optional; --preset wins when given
      "set": {"refine.backend": "torch"},      # optional: every run
      "studies": [
        {"name": "k", "axes": {"clustering.k": [3, 4, 5]}},
        {"name": "backbone", "axes": {"backbone": [
            {"label": "SD 1.4", "set": {}},
            {"label": "DINOv2-B", "set": {"features.extractor": "vit",
                                           "models.backbone": "facebook/dinov2-base"}}]}}
      ]
    }

An axis is a dotted setting with a list of values, or any name with a list of
``{"label", "set"}`` options that change several settings at once. A top-level ``"axes"`` is a
single study named ``grid``. Runs with the same settings (the baseline of several
one-axis-at-a-time studies) are run once and listed in each study.

Output folder::

    OUTPUT/grid.json                 the grid as read, and each run's settings
    OUTPUT/runs/<run>/               one ``freesegdiff eval`` output folder per run
    OUTPUT/cache/                    captions, entities, features, text embeddings shared by
                                     runs (:mod:`freesegdiff.evaluation.stage_cache`)
    OUTPUT/ablation.md, ablation.csv one row per run: its axes, mIoU under both protocols,
                                     pixel accuracy, seconds per image
    OUTPUT/ablation-<study>.png      mIoU against the axis, for a study with one axis
    OUTPUT/shared_work.json          what this invocation computed, reused and loaded

Every run's predictions are cached per image (as ``eval`` caches them) and every shared output
as soon as it is made, so a killed grid run again resumes where it stopped and gives the same
table. The table is rewritten after every run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from freesegdiff.config import PipelineConfig, with_settings
from freesegdiff.errors import ConfigError
from freesegdiff.evaluation.stage_cache import digest
from freesegdiff.io import atomic

logger = logging.getLogger(__name__)

GRIDS_PACKAGE = "freesegdiff"
GRIDS_FOLDER = "data/grids"
PROTOCOL_COLUMNS = (("standard", "mIoU"), ("paper", "mIoU (paper protocol)"))


@dataclass(frozen=True)
class Option:
    """One value of an axis: a label for the table and the settings it changes."""

    label: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class Axis:
    name: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Study:
    name: str
    axes: tuple[Axis, ...]
    description: str = ""


@dataclass(frozen=True)
class Grid:
    """A parsed grid file (see the module docstring)."""

    studies: tuple[Study, ...]
    settings: dict[str, Any] = field(default_factory=dict)  # every run
    preset: str | None = None
    description: str = ""
    source: str = ""


@dataclass
class Run:
    """One evaluation of the grid: its settings and where it appears in the studies."""

    run_id: str
    settings: dict[str, Any]  # dotted name -> value, the grid's shared settings first
    appears: list[tuple[str, dict[str, str]]]  # (study, axis -> option label)


# ------------------------------------------------------------------------------ grid files


def shipped_grids() -> dict[str, Path]:
    """The grid files that ship with the package, by name (file name without suffix)."""
    from importlib.resources import files

    folder = Path(str(files(GRIDS_PACKAGE).joinpath(GRIDS_FOLDER)))
    return {path.stem: path for path in sorted(folder.glob("*.json"))}


def load_grid(name_or_path: str | Path) -> Grid:
    """Read a grid file (``.json``, ``.toml``) or a shipped grid by name; check its shape.

    Raises:
        ConfigError: the file is missing or unreadable, or an entry is malformed (named).
    """
    path = Path(name_or_path)
    shipped = shipped_grids()
    if not path.is_file() and str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    if not path.is_file():
        raise ConfigError(
            f"no grid file {str(name_or_path)!r}; give a .json or .toml file, or a shipped grid: "
            + ", ".join(shipped)
        )
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError as error:  # Python 3.10
                raise ConfigError("TOML grid files need Python 3.11; write it as JSON") from error
            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read grid file {str(path)!r}: {error}") from error
    return parse_grid(data, str(path))


def parse_grid(data: Any, source: str = "the grid") -> Grid:
    """A :class:`Grid` from the file's parsed contents (see the module docstring)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a grid is a mapping with 'studies' or 'axes'")
    known = {"description", "preset", "set", "studies", "axes"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown grid keys {unknown}; known: {sorted(known)}")
    if ("studies" in data) == ("axes" in data):
        raise ConfigError(f"{source}: give either 'studies' (a list) or 'axes' (one study)")
    raw_studies = data.get("studies") or [{"name": "grid", "axes": data.get("axes")}]
    if not isinstance(raw_studies, list) or not raw_studies:
        raise ConfigError(f"{source}: 'studies' must be a non-empty list")
    studies = []
    for number, raw in enumerate(raw_studies, 1):
        where = f"{source}, study {number}"
        if not isinstance(raw, dict) or not isinstance(raw.get("axes"), dict) or not raw["axes"]:
            raise ConfigError(f"{where}: a study is a mapping with non-empty 'axes'")
        name = str(raw.get("name") or f"study-{number}")
        axes = tuple(
            _axis(axis, values, f"{where} ({name}), axis {axis!r}")
            for axis, values in raw["axes"].items()
        )
        studies.append(Study(name, axes, str(raw.get("description", ""))))
    names = [study.name for study in studies]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: study names must differ, got {names}")
    settings = data.get("set") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{source}: 'set' must map dotted settings to values")
    preset = data.get("preset")
    return Grid(tuple(studies), dict(settings), preset, str(data.get("description", "")), source)


def _axis(name: str, values: Any, where: str) -> Axis:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: give a non-empty list of values")
    options = []
    for value in values:
        if isinstance(value, dict):
            if not isinstance(value.get("set"), dict) or "label" not in value:
                raise ConfigError(
                    f"{where}: an option that is a mapping needs 'label' and 'set' "
                    "(settings by dotted name)"
                )
            options.append(Option(str(value["label"]), dict(value["set"])))
        else:
            if "." not in name:
                raise ConfigError(
                    f"{where}: plain values need the axis to be a dotted setting (e.g. "
                    "clustering.k); for named options give {'label': ..., 'set': {...}}"
                )
            options.append(Option(_label(value), {name: value}))
    labels = [option.label for option in options]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: the options' labels must differ, got {labels}")
    return Axis(name, tuple(options))


def _label(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "+".join(_label(v) for v in value)
    return json.dumps(value)


def expand(grid: Grid, base: PipelineConfig | None = None) -> list[Run]:
    """Every run of the grid, in file order; runs with equal settings merged into one.

    With ``base`` (the settings the runs start from), runs are equal when their whole
    configurations are (``clustering.k = 4`` is the baseline when 4 is the preset's K).
    """
    runs: dict[str, Run] = {}
    for study in grid.studies:
        for combination in itertools.product(*(axis.options for axis in study.axes)):
            settings = dict(grid.settings)
            for option in combination:
                settings.update(option.settings)
            labels = {
                axis.name: option.label
                for axis, option in zip(study.axes, combination, strict=True)
            }
            key = digest(settings, 10)
            if base is not None:
                key = digest(run_config(base, settings).to_dict(), 10)
            if key not in runs:
                slug = "_".join(f"{_slug(axis)}={_slug(label)}" for axis, label in labels.items())
                runs[key] = Run(f"{slug[:60]}-{key}", settings, [])
            runs[key].appears.append((study.name, labels))
    return list(runs.values())


def _slug(text: str) -> str:
    text = text.rsplit(".", 1)[-1] if "." in text and " " not in text else text
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def run_config(base: PipelineConfig, settings: dict[str, Any], name: str = "") -> PipelineConfig:
    """``base`` with a run's settings (dotted name -> value) applied; a bad name or value:
    :class:`ConfigError`, naming the run ``name`` when given."""
    try:
        return with_settings(base, settings)  # one merge: each section checked once
    except ConfigError as error:
        raise ConfigError(f"run {name}: {error}" if name else str(error)) from error


# ------------------------------------------------------------------------------ running


@dataclass
class RunResult:
    run: Run
    scores: dict[str, float | None]  # protocol -> mIoU
    pixel_accuracy: float | None
    mean_accuracy: float | None
    seconds_per_image: float | None
    images: int
    failed: int


def run_grid(
    dataset: Any,
    grid: Grid,
    runs: Sequence[Run],
    configs: dict[str, PipelineConfig],
    output: str | Path,
    make_predictor: Callable[[PipelineConfig], Any],
    settings_of: Callable[[PipelineConfig], dict[str, Any]],
    store: Any,
    limit: int | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """Evaluate every run (cached predictions re-scored, the rest predicted) and write the
    table, the plots and ``shared_work.json``.

    Args:
        dataset: the :class:`~freesegdiff.evaluation.datasets.SegmentationDataset`.
        runs: :func:`expand`'s runs; ``configs``: run id -> its pipeline settings.
        make_predictor: a run's config -> its predictor for
            :func:`~freesegdiff.evaluation.runner.evaluate`, called only when the run has images
            left to predict.
        settings_of: a run config -> the settings stored with its predictions.
        store: the :class:`~freesegdiff.evaluation.stage_cache.StageStore` of shared work.
        limit: the first ``limit`` images only.
    """
    from freesegdiff.evaluation.runner import evaluate

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temporaries(output)
    description = {
        "source": grid.source,
        "description": grid.description,
        "dataset": dataset.name,
        "runs": [{"id": r.run_id, "settings": r.settings, "appears": r.appears} for r in runs],
    }
    atomic.write_text(output / "grid.json", json.dumps(description, indent=2) + "\n")
    bar = _bar(len(runs), progress)
    results: list[RunResult] = []
    for run in runs:
        config = configs[run.run_id]
        if bar is not None:
            bar.set_postfix_str(run.run_id[:40])
        report = evaluate(
            dataset,
            output / "runs" / run.run_id,
            partial(make_predictor, config),
            protocol="standard",
            limit=limit,
            settings=settings_of(config),
            progress=progress,
            also=("paper",),
        )
        paper = report.extra.get("other_protocols", {}).get("paper", {})
        results.append(
            RunResult(
                run,
                {"standard": report.scores.miou, "paper": paper.get("miou")},
                report.scores.pixel_accuracy,
                report.scores.mean_accuracy,
                report.seconds_per_image,
                report.images,
                len(report.failed),
            )
        )
        write_tables(results, grid, dataset.name, output)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    write_plots(results, grid, output)
    atomic.write_text(output / "shared_work.json", json.dumps(store.summary(), indent=2) + "\n")
    return results


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="ablate", unit="run", dynamic_ncols=True, position=0)


# ------------------------------------------------------------------------------ tables


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(results: Sequence[RunResult], grid: Grid, dataset: str) -> str:
    """``ablation.md``: one table per study, a row per run, in the grid's order."""
    images = max((r.images for r in results), default=0)
    lines = [f"# Ablation on {dataset} ({images} images)", ""]
    if grid.description:
        lines += [grid.description, ""]
    for study in grid.studies:
        rows = [
            (r, labels) for r in results for name, labels in r.run.appears if name == study.name
        ]
        if not rows:
            continue
        lines += [f"## {study.name}", ""]
        if study.description:
            lines += [study.description, ""]
        axes = [axis.name for axis in study.axes]
        header = [*axes, *(title for _, title in PROTOCOL_COLUMNS), "pixel accuracy", "s / image"]
        lines += [
            "| " + " | ".join(header) + " | run |",
            "|" + "---|" * len(axes) + "---:|" * 4 + "---|",
        ]
        for result, labels in rows:
            cells = [labels[axis] for axis in axes]
            cells += [_number(result.scores[protocol]) for protocol, _ in PROTOCOL_COLUMNS]
            cells += [_number(result.pixel_accuracy), _number(result.seconds_per_image, 3)]
            failed = f" ({result.failed} failed)" if result.failed else ""
            lines.append("| " + " | ".join(cells) + f" | `{result.run.run_id}`{failed} |")
        lines.append("")
    lines += [
        "mIoU and accuracy in percent. mIoU: one confusion matrix over the split, void ignored; "
        "paper protocol: the released script's per-image score (not comparable with mIoU). "
        "s / image: model seconds of every stage of the run's setting, outputs shared with "
        "other runs counted at the time they took when first computed.",
        "",
    ]
    return "\n".join(lines)


def render_csv(results: Sequence[RunResult], grid: Grid) -> str:
    """``ablation.csv``: a row per run and study it appears in; axes of other studies empty."""
    axes = list(dict.fromkeys(axis.name for study in grid.studies for axis in study.axes))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["study", "run", *axes, "miou", "miou_paper_protocol", "pixel_accuracy",
         "mean_accuracy", "seconds_per_image", "images", "failed", "settings"]
    )  # fmt: skip
    order = {study.name: index for index, study in enumerate(grid.studies)}
    rows = sorted(
        (
            (order[name], index, name, labels, r)
            for index, r in enumerate(results)
            for name, labels in r.run.appears
        ),
        key=lambda row: (row[0], row[1]),
    )
    for _, _, name, labels, result in rows:
        writer.writerow(
            [
                name,
                result.run.run_id,
                *(labels.get(axis, "") for axis in axes),
                _csv(result.scores["standard"]),
                _csv(result.scores["paper"]),
                _csv(result.pixel_accuracy),
                _csv(result.mean_accuracy),
                _csv(result.seconds_per_image),
                result.images,
                result.failed,
                json.dumps(result.run.settings, sort_keys=True),
            ]
        )
    return buffer.getvalue()


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_tables(results: Sequence[RunResult], grid: Grid, dataset: str, output: Path) -> None:
    """Write ``ablation.md`` and ``ablation.csv`` (atomically) for the runs so far."""
    atomic.write_text(output / "ablation.md", render_markdown(results, grid, dataset))
    atomic.write_text(output / "ablation.csv", render_csv(results, grid))


def write_plots(results: Sequence[RunResult], grid: Grid, output: Path) -> list[Path]:
    """``ablation-<study>.png`` for each study with one axis: mIoU under both protocols
    against the axis' options (numeric axes to scale). Needs matplotlib (the ``[viz]`` extra);
    without it, no plot and a warning."""
    studies = [study for study in grid.studies if len(study.axes) == 1]
    if not studies:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning('the plots need matplotlib: pip install "freesegdiff[viz]"')
        return []
    written = []
    for study in studies:
        axis = study.axes[0]
        points = []
        for option in axis.options:
            for result in results:
                if (study.name, {axis.name: option.label}) in result.run.appears:
                    points.append((option.label, result))
        if not points:
            continue
        labels = [label for label, _ in points]
        numeric = all(_is_number(label) for label in labels)
        xs = [float(label) for label in labels] if numeric else list(range(len(labels)))
        figure, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
        for protocol, title in PROTOCOL_COLUMNS:
            ys = [r.scores[protocol] for _, r in points]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=title)
        if not numeric:
            ax.set_xticks(xs, labels, rotation=20 if max(map(len, labels)) > 8 else 0)
        ax.set_xlabel(axis.name)
        ax.set_ylabel("mIoU (%)")
        ax.set_title(study.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figure.tight_layout()
        path = output / f"ablation-{_slug(study.name)}.png"
        atomic.save_with(path, partial(_save_figure, figure))
        plt.close(figure)
        written.append(path)
    return written


def _save_figure(figure: Any, handle: Any) -> None:
    figure.savefig(handle, format="png")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
