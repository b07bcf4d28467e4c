"""Command-line options shared by every command that builds a pipeline."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from freesegdiff.config import PipelineConfig, merge_config, with_settings
from freesegdiff.errors import ConfigError

# flag -> (dotted setting, type, help); all default to "keep the preset's value".
SHORTCUTS: dict[str, tuple[str, Any, str]] = {
    "--device": ("device", str, "cpu, cuda, cuda:N, mps or auto"),
    "--dtype": ("dtype", str, "float32, bfloat16 (CPU), float16 (CUDA) or auto"),
    "--seed": ("seed", int, "seed for latent sampling, noise and k-means"),
    "--batch-size": ("batch_size", int, "images per model forward"),
    "--diffusion-model": ("models.diffusion", str, "Stable Diffusion: Hub id or diffusers folder"),
    "--captioner-model": ("models.captioner", str, "BLIP / BLIP-2: Hub id or folder"),
    "--clip-model": ("models.clip", str, "CLIP: Hub id or transformers folder"),
    "--backbone-model": (
        "models.backbone",
        str,
        "with --set features.extractor='\"vit\"': DINOv2 / DINO / CLIP ViT, Hub id or folder",
    ),
    "--revision": ("models.revision", str, "Hub revision for every model"),
    "--cache-dir": ("models.cache_dir", str, "Hugging Face cache folder"),
    "--variant": (
        "models.variant",
        str,
        "weight files of a variant, e.g. fp16 (*.fp16.safetensors: half the download)",
    ),
    "--image-size": ("features.image_size", int, "side the image is resized to for SD (512)"),
    "--timestep": ("features.timestep", int, "noise timestep t (paper: 0)"),
    "--feature-size": ("features.feature_size", int, "side of the feature grid (32)"),
    "--k": ("clustering.k", int, "number of k-means clusters (4)"),
    "--cluster-method": ("clustering.method", str, "kmeans or agglomerative"),
    "--entity-rule": ("entities.rule", str, "paper (released) or extended"),
    "--namer": (
        "classify.namer",
        str,
        "masked-crops (the method: CLIP on each masked image) or dense (CLIP patch tokens, NACLIP)",
    ),
    "--dense-regions": (
        "dense.regions",
        str,
        "with --namer dense: clusters (name the diffusion regions) or pixels (NACLIP itself)",
    ),
    "--refine": ("refine.method", str, "crf (default), pamr or none"),
    "--crf-backend": ("refine.backend", str, "pydensecrf (released) or torch (any device)"),
    "--crf-iterations": ("refine.iterations", int, "mean-field iterations (10)"),
    "--max-pixels": (
        "limits.max_pixels",
        int,
        "most pixels an image may have; above it refused unread, or see --oversize (100000000)",
    ),
    "--oversize": ("limits.oversize", str, "refuse (default) or downscale images above the limit"),
    "--working-size": (
        "limits.working_size",
        int,
        "longest side at which masks, CLIP and the CRF work; larger images are worked on at "
        "this size and the label map resized back (2048)",
    ),
}


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --preset, model, device and hyper-parameter options to ``parser``."""
    from freesegdiff.presets import available_presets

    presets = available_presets()
    group = parser.add_argument_group("pipeline")
    group.add_argument(
        "--preset",
        default="paper",
        choices=sorted(presets),
        help="settings to start from: "
        + "; ".join(f"{name}: {text}" for name, text in presets.items()),
    )
    group.add_argument(
        "--config", metavar="FILE", help="JSON file of settings merged over the preset"
    )
    for flag, (path, kind, text) in SHORTCUTS.items():
        group.add_argument(flag, type=kind, default=None, help=f"{text} [{path}]")
    group.add_argument(
        "--k-range",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        help="choose K in [LO, HI] by silhouette instead of a fixed K",
    )
    group.add_argument("--layers", help="comma-separated UNet attention layers to hook")
    group.add_argument(
        "--resolutions", help="comma-separated feature-map sides; hooks every layer at those"
    )
    group.add_argument(
        "--no-captioner", action="store_true", help="run without a captioner (needs --classes)"
    )
    group.add_argument(
        "--no-prune",
        action="store_true",
        help="with --classes: keep every class a candidate instead of pruning with the caption",
    )
    group.add_argument(
        "--offline", action="store_true", help="never contact the Hub (as HF_HUB_OFFLINE=1)"
    )
    group.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting by dotted name, value as JSON (e.g. --set refine.gt_prob=0.8)",
    )


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The :class:`PipelineConfig` the options describe: preset (with its settings for
    ``--dataset`` when the command has one: ``eval``, ``ablate``), then file, then flags and
    ``--set`` (later ones win), the flags merged at once so that each section is checked once
    with all its new values."""
    from freesegdiff.presets import load_preset

    config = load_preset(args.preset, getattr(args, "dataset", None))
    if args.config:
        try:
            with open(args.config) as handle:
                values = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read settings file {args.config!r}: {error}") from error
        config = merge_config(config, values)  # over the preset, section by section
    changes: dict[str, Any] = {}
    for flag, (path, _, _) in SHORTCUTS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            changes[path] = value
    if args.k_range:
        changes["clustering.k_range"] = list(args.k_range)
    if args.layers:
        changes["features.layers"] = [
            name.strip() for name in args.layers.split(",") if name.strip()
        ]
    if args.resolutions:
        changes["features.resolutions"] = [
            int(side) for side in args.resolutions.split(",") if side.strip()
        ]
    if args.no_captioner:
        changes["models.captioner"] = None
    if args.no_prune:
        changes["vocabulary.prune_with_caption"] = False
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        changes["models.offline"] = True
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        changes[key.strip()] = _json_value(value)
    return with_settings(config, changes)


def parse_classes(text: str | None) -> list[str] | None:
    """``--classes "cat, dog,traffic light"`` -> ``["cat", "dog", "traffic light"]``; None
    stays None (:func:`~freesegdiff.stages.vocabulary.parse_class_names`)."""
    from freesegdiff.stages.vocabulary import parse_class_names

    return parse_class_names(text, what="--classes")


def runtime_from_args(args: argparse.Namespace) -> Any:
    """The speed and memory tuning a command runs with (:mod:`freesegdiff.infra.tuning`):
    every trick (:meth:`RuntimeOptions.fast`), or None with ``--no-runtime-tuning``."""
    from freesegdiff.infra.tuning import RuntimeOptions

    if getattr(args, "no_runtime_tuning", False):
        return None
    if getattr(args, "no_stream", False):
        return RuntimeOptions(stream=False)
    return RuntimeOptions.fast()


def add_stream_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-stream``: the runtime tuning without the streaming executor."""
    parser.add_argument(
        "--no-stream",
        action="store_true",
        help="segment batch after batch instead of streaming them through the stage groups "
        "(freesegdiff.infra.stream): the same output files, byte for byte; slower where "
        "the refinement or reading could overlap the models",
    )


def pipeline_from_args(args: argparse.Namespace, runtime: Any = None) -> Any:
    """Load the :class:`FreeSegDiff` the options describe (models are loaded here).

    ``runtime``: :class:`freesegdiff.infra.tuning.RuntimeOptions` to tune with, or None.
    """
    from freesegdiff.pipeline import FreeSegDiff

    return FreeSegDiff.from_config(config_from_args(args), runtime=runtime)


def load_pipeline(args: argparse.Namespace, classes: list[str] | None) -> Any:
    """A command's pipeline, tuned unless ``--no-runtime-tuning`` (a Ray actor: one each).

    ``classes``: the run's fixed vocabulary; None (open vocabulary) frees Stable Diffusion's
    text encoder once the empty prompt is embedded (0.25 GB back).
    """
    from freesegdiff.infra.tuning import after_loading

    runtime = runtime_from_args(args)
    pipe = pipeline_from_args(args, runtime)  # tunes the process, then the models
    if classes is None:
        pipe.release_text_encoder()
    if runtime is not None:
        after_loading(runtime)  # copies left behind by layout conversions, freed modules
    return pipe
