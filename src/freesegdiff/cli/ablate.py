"""``freesegdiff ablate``: evaluate every run of a grid of settings, sharing what runs share."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from freesegdiff.cli.common import (
    add_pipeline_arguments,
    add_stream_argument,
    config_from_args,
    runtime_from_args,
)
from freesegdiff.errors import ConfigError
from freesegdiff.evaluation.datasets import DATASETS
from freesegdiff.infra.interrupts import Terminated, exit_code


def add_parser(subparsers: Any) -> None:
    """Register ``ablate``."""
    from freesegdiff.evaluation.ablation import shipped_grids

    parser = subparsers.add_parser(
        "ablate",
        help="evaluate a grid of settings (backbones, layers, timesteps, K, ...) in one table",
        description=(
            "Run freesegdiff eval for every combination of a grid file's settings (closed "
            "vocabulary, as the paper evaluates) and write OUTPUT/ablation.md and ablation.csv "
            "(a row per run: its settings, mIoU under the standard and the paper protocol, "
            "pixel accuracy, seconds per image) and OUTPUT/ablation-<study>.png for each study "
            "with one axis. Captions, entity lists, features and text embeddings are computed "
            "once per image and setting and kept in OUTPUT/cache; predictions in "
            "OUTPUT/runs/<run>. Run the same command again to resume a killed grid."
        ),
    )
    parser.add_argument("--dataset", required=True, choices=list(DATASETS), help="benchmark")
    parser.add_argument("--data-root", required=True, metavar="DIR", help="the dataset folder")
    parser.add_argument(
        "--grid",
        required=True,
        metavar="FILE",
        help="grid file (.json, .toml) or a shipped grid: " + ", ".join(shipped_grids()),
    )
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    parser.add_argument(
        "--class-names", metavar="FILE", help="class-name file replacing the shipped one"
    )
    parser.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="do not keep features on disk (a VOC image's paper features take 26 MB): each "
        "run computes its own; captions and entities are still shared",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-runtime-tuning", action="store_true", help="run untuned (freesegdiff.infra.tuning)"
    )
    add_stream_argument(parser)
    add_pipeline_arguments(parser)
    parser.set_defaults(run=run, preset=None)  # None: the grid's preset, else paper


def run(args: argparse.Namespace) -> int:
    """Run the grid; return 0, or 1 when some run had failed images, 130 on Ctrl-C."""
    from freesegdiff.evaluation.ablation import expand, load_grid, run_config, run_grid
    from freesegdiff.evaluation.classnames import label_texts
    from freesegdiff.evaluation.datasets import DatasetError, open_dataset
    from freesegdiff.evaluation.runner import evaluation_settings
    from freesegdiff.evaluation.stage_cache import (
        CAPTION,
        ENTITIES,
        FEATURES,
        TEXT,
        CachingSource,
        StageStore,
        digest,
        run_feature_setting,
    )
    from freesegdiff.infra.hub import check_models_available
    from freesegdiff.pipeline import check_settings, unused_models

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    grid = load_grid(args.grid)
    args.preset = args.preset or grid.preset or "paper"
    base = config_from_args(args)
    runs = expand(grid, base)
    configs = {run.run_id: run_config(base, run.settings, run.run_id) for run in runs}
    for config in configs.values():  # every run's settings and models, before any loads
        check_settings(config)
    checked: set[str] = set()
    for config in configs.values():  # closed vocabulary: the classes are pruned
        skip = unused_models(config, pruning=True)
        if repr((config.models, skip)) not in checked:
            check_models_available(config.models, skip=skip)
            checked.add(repr((config.models, skip)))
    try:
        dataset = open_dataset(args.dataset, args.data_root, class_names_file=args.class_names)
    except DatasetError as error:
        raise ConfigError(str(error)) from error
    stages = (
        (CAPTION, ENTITIES, TEXT) if args.no_feature_cache else (CAPTION, ENTITIES, FEATURES, TEXT)
    )
    # features are kept only where two runs or more share them (a VOC image's are 26 MB)
    uses = Counter(digest(run_feature_setting(config)) for config in configs.values())
    shared = {key for key, count in uses.items() if count > 1}
    store = StageStore(f"{args.output}/cache", stages, shared_features=shared)

    def vocabulary_of(config: Any) -> Any:
        return label_texts(dataset.classes, dataset.background_id, config.vocabulary.dataset_texts)

    def settings_of(config: Any) -> dict[str, Any]:
        return evaluation_settings(args.preset, dataset, vocabulary_of(config), config)

    source = CachingSource(store)

    def make_predictor(config: Any) -> Any:
        from freesegdiff.evaluation.runner import dataset_predictor
        from freesegdiff.pipeline import FreeSegDiff

        pipe = FreeSegDiff.from_config(
            config,
            runtime=runtime_from_args(args),
            source=source.as_source(),
            entities=source.entities(config.entities),
        )
        return dataset_predictor(pipe, dataset, vocabulary_of(config), credit=store.credit)

    print(f"{len(runs)} runs on {dataset.name} ({grid.source})")
    try:
        results = run_grid(
            dataset,
            grid,
            runs,
            configs,
            args.output,
            make_predictor,
            settings_of,
            store,
            limit=args.limit,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM
        stopped = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"{stopped}: run the same command again to resume (finished work is kept)")
        return exit_code(stop)
    summary = store.summary()
    print(f"table: {args.output}/ablation.md, ablation.csv")
    print(
        "shared work: "
        + ", ".join(
            f"{stage} {summary['computed'].get(stage, 0)} computed, "
            f"{summary['reused'].get(stage, 0)} reused"
            for stage in stages
        )
    )
    failed = [result for result in results if result.failed]
    for result in failed:
        print(f"  {result.run.run_id}: {result.failed} images failed (see its results.json)")
    return 1 if failed else 0
