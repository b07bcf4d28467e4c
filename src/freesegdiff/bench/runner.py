"""Running the benchmark: what one machine does per image, stage by stage.

The models are loaded as ``freesegdiff segment`` loads them: ``from_pretrained`` on folders in
the Hub's layouts, holding the real architectures with random weights in the published files
(:mod:`freesegdiff.bench.hub_layouts`, written once into a cache), so the load time and the
memory of loading are the user's.

N photos (the bundled examples, resized to a VOC-like 500x375 and mirrored for variety) are
written as JPEG files, then each batch is read, segmented and its label maps written back as PNG
files, the way ``freesegdiff segment`` treats a folder, after one warm-up batch. Every stage the
pipeline times (:class:`~freesegdiff.infra.timing.StageTimer`) is kept per image; the file
reading and writing is the ``io`` stage. Then the model forward passes alone are timed on the
same inputs (the *model floor*): what is left when every other cost is gone.
"""

from __future__ import annotations

import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freesegdiff.config import CaptionConfig, PipelineConfig, with_settings
from freesegdiff.errors import ConfigError
from freesegdiff.infra.hub import LoadOptions
from freesegdiff.infra.timing import STAGES, StageTimer
from freesegdiff.infra.tuning import RuntimeOptions, after_loading
from freesegdiff.pipeline import PRETRAINED, FreeSegDiff, ModelSource

logger = logging.getLogger(__name__)

EXAMPLES = ("cat.jpg", "coffee.jpg", "astronaut.jpg")


@dataclass
class BenchSettings:
    """What to run: a preset's models on ``images`` photos of ``size`` (width, height)."""

    preset: str = "paper"
    images: int = 5
    size: tuple[int, int] = (500, 375)
    dtype: str = "auto"  # bfloat16 on CPUs that support it, float16 on CUDA, else float32
    batch_size: int = 1
    device: str | None = None  # None: the preset's
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted settings, e.g. refine.method
    # speed and memory tuning (freesegdiff.infra.tuning); None: the models run untuned
    runtime: RuntimeOptions | None = field(default_factory=RuntimeOptions.fast)
    stream: bool = False  # also run the images streamed (needs images >= STREAM_IMAGES)


STREAM_IMAGES = 12  # the fewest images a streamed run is measured on (a few fill the stream)


@dataclass
class BenchReport:
    """Measured figures; :meth:`to_json` gives the keys the ``--json`` file holds.

    Attributes:
        stages: stage -> median seconds per image over the measured images.
        seconds_per_image: median wall-clock seconds per image, reading and writing included.
        images_per_second: measured images / their summed wall-clock seconds.
        model_floor_seconds: summed medians of the model forward passes alone, per image.
        model_floor: forward -> median seconds per image (caption generate, VAE encoder,
            truncated UNet, CLIP image and text towers).
        overhead: share of the total wall-clock time outside every named stage.
        peak_rss_gb: peak resident memory of the process (loading included), in GB: the
            steady state of a run.
        load_seconds: loading the models (``from_pretrained`` on the Hub-layout folders, the
            unused modules freed), in seconds.
        load_peak_rss_gb: peak resident memory once the models are loaded, in GB.
        settings: what ran where: preset, dtype, batch size, image size, device, versions.
        stream: with ``--stream``: the same images streamed (:class:`StreamFigures` as a dict).
    """

    stages: dict[str, float]
    seconds_per_image: float
    images_per_second: float
    model_floor_seconds: float
    model_floor: dict[str, float]
    overhead: float
    peak_rss_gb: float
    load_seconds: float
    load_peak_rss_gb: float
    settings: dict[str, Any]
    per_image: list[dict[str, float]] = field(default_factory=list)
    stream: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return asdict(self)

    def table(self) -> str:
        """The report as a plain-text table."""
        total = self.seconds_per_image
        lines = [
            f"freesegdiff bench: preset {self.settings['preset']}, {self.settings['dtype']}, "
            f"batch {self.settings['batch_size']}, {self.settings['images']} images of "
            f"{self.settings['image_size'][0]}x{self.settings['image_size'][1]}, "
            f"{self.settings['device_name']} ({self.settings['threads']} threads)",
            "",
            f"{'stage':<14}{'median s':>10}{'share':>8}",
        ]
        for stage, seconds in self.stages.items():
            share = seconds / total if total else 0.0
            lines.append(f"{stage:<14}{seconds:>10.3f}{share:>8.1%}")
        lines += [
            f"{'total':<14}{total:>10.3f}",
            "",
            f"images per second   {self.images_per_second:.3f}",
            f"model floor         {self.model_floor_seconds:.3f} s/image ("
            + ", ".join(f"{name} {seconds:.3f}" for name, seconds in self.model_floor.items())
            + ")",
            f"overhead            {self.overhead:.1%} of the total outside every stage",
            f"peak resident       {self.peak_rss_gb:.2f} GB "
            f"(loading: {self.load_peak_rss_gb:.2f} GB, {self.load_seconds:.1f} s)",
            f"load average        {self.settings.get('load_average_before')} before the run "
            "(1, 5, 15 min; other processes on these cores slow it down)",
        ]
        if self.stream is not None:
            lines += ["", *StreamFigures(**self.stream).lines(self.images_per_second)]
        return "\n".join(lines)


@dataclass
class StreamFigures:
    """The images of a bench run streamed as ``segment`` streams a folder.

    Attributes:
        images: images streamed.
        images_per_second: all of them over the run's wall-clock seconds.
        steady_images_per_second: the images after the first batch over the seconds from
            its results to the last one (the stream full).
        busy: stage group -> share of the run's wall-clock time it worked. The refinement
            group only hands each image to its threads; ``refinement_workers`` is what they
            did: the images' summed refinement seconds over the wall-clock time (the mean
            number of images refining at once).
        refinement_workers: see ``busy``.
        queue_depths: stage group -> mean depth of its input queue when an item was put.
        wall_seconds: the run's wall-clock seconds.
    """

    images: int
    images_per_second: float
    steady_images_per_second: float
    busy: dict[str, float]
    refinement_workers: float
    queue_depths: dict[str, float]
    wall_seconds: float

    def lines(self, serial_images_per_second: float) -> list[str]:
        """The figures as table lines, beside the serial run's images per second."""
        ratio = self.steady_images_per_second / max(serial_images_per_second, 1e-9)
        return [
            f"streamed ({self.images} images)",
            f"images per second   {self.images_per_second:.3f} "
            f"(steady {self.steady_images_per_second:.3f}: {ratio:.2f}x the serial run)",
            "busy                "
            + ", ".join(f"{name} {share:.0%}" for name, share in self.busy.items())
            + f"; refining at once {self.refinement_workers:.2f} images",
            "queue depth         "
            + ", ".join(f"{name} {depth:.2f}" for name, depth in self.queue_depths.items()),
        ]


# ------------------------------------------------------------------------------- inputs
def bench_images(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` RGB uint8 ``(H, W, 3)`` photos of ``size`` = (width, height): the bundled
    examples, resized (aspect not kept), every second round mirrored and rolled."""
    from importlib import resources

    from PIL import Image

    width, height = size
    folder = resources.files("freesegdiff") / "data" / "examples"
    photos = []
    for name in EXAMPLES:
        with (folder / name).open("rb") as handle, Image.open(handle) as image:
            resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            photos.append(np.asarray(resized))
    images = []
    for index in range(count):
        photo = photos[index % len(photos)]
        round_ = index // len(photos)
        if round_ % 2 == 1:
            photo = photo[:, ::-1]
        if round_:
            photo = np.roll(photo, shift=round_ * width // 7, axis=1)
        images.append(np.ascontiguousarray(photo))
    return images


# --------------------------------------------------------------------------- pipelines
def bench_config(settings: BenchSettings) -> PipelineConfig:
    """The preset's config with the benchmark's dtype, batch size, device and overrides."""
    from freesegdiff.presets import load_preset

    changes: dict[str, Any] = {
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
    }
    if settings.device is not None:
        changes["device"] = settings.device
    config = with_settings(load_preset(settings.preset), changes)
    if not _is_tiny(config):
        # The preset's decoding (beams, prompt, limits), every caption as long as its limit
        # allows: random weights would stop at a random step, real ones after ~10 to 15 tokens.
        caption = config.caption
        if caption.max_new_tokens is not None:
            config = with_settings(config, {"caption.min_new_tokens": caption.max_new_tokens})
        elif caption.max_length is not None:
            config = with_settings(config, {"caption.min_length": caption.max_length})
    return with_settings(config, dict(settings.overrides))


def _caption_tokens(config: PipelineConfig) -> int | None:
    """The caption length the bench forces: new tokens, or the decoder's whole length."""
    caption = config.caption
    return caption.max_new_tokens if caption.max_new_tokens is not None else caption.max_length


def _is_tiny(config: PipelineConfig) -> bool:
    names = [config.models.diffusion, config.models.clip, config.models.captioner or "tiny:"]
    if config.features.extractor == "vit":
        names.append(config.models.backbone or "tiny:")
    return all(name.startswith("tiny:") for name in names)


def _hub_names(config: PipelineConfig) -> dict[str, str]:
    """Setting -> Hub id of every model of ``config`` that is not a ``tiny:`` one."""
    models = config.models
    names = {"diffusion": models.diffusion, "clip": models.clip, "captioner": models.captioner}
    if config.features.extractor == "vit":
        names["backbone"] = models.backbone
    return {key: name for key, name in names.items() if name and not name.startswith("tiny:")}


def with_layout_folders(config: PipelineConfig, root: Path | None = None) -> PipelineConfig:
    """``config`` with every Hub model replaced by its random-weight folder in the Hub layout
    (:mod:`freesegdiff.bench.hub_layouts`), written first, in a child process, if missing."""
    from freesegdiff.bench.hub_layouts import ensure_layouts_in_subprocess
    from freesegdiff.bench.tokenizers import check_vocabularies

    check_vocabularies()  # the real tokenizers' files: one clear message, not the child's
    names = _hub_names(config)
    folders = ensure_layouts_in_subprocess(sorted(set(names.values())), root)
    return with_settings(config, {f"models.{key}": str(folders[n]) for key, n in names.items()})


def bench_source() -> ModelSource:
    """Each library's ``from_pretrained``, as ``segment`` loads models (:data:`PRETRAINED`),
    with the captioner wrapped as a :class:`~freesegdiff.bench.models.ScriptedCaptioner`."""
    from dataclasses import replace

    from freesegdiff.bench.models import ScriptedCaptioner

    def captioner(
        name: str,
        config: CaptionConfig,
        device: torch.device,
        dtype: torch.dtype,
        load: LoadOptions,
        runtime: RuntimeOptions | None = None,
    ) -> ScriptedCaptioner:
        return ScriptedCaptioner.from_pretrained(
            name, config=config, device=device, dtype=dtype, load=load, runtime=runtime
        )

    return replace(PRETRAINED, captioner=captioner)


def build_pipeline(config: PipelineConfig, runtime: RuntimeOptions | None = None) -> FreeSegDiff:
    """The pipeline of ``config``, built by :meth:`FreeSegDiff.from_config` like every other
    and loaded by the same ``from_pretrained`` calls (:func:`bench_source`): its own ``tiny:``
    models, or for Hub names the real architectures with random weights, from the folders
    :func:`with_layout_folders` writes. ``runtime``: the speed and memory tuning (None: none)."""
    if not _is_tiny(config):
        config = with_layout_folders(config)
    return FreeSegDiff.from_config(config, runtime=runtime, source=bench_source())


# ------------------------------------------------------------------------------ measuring
def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (10^9 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return float(peak * scale / 1e9)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_label_map(label_map: np.ndarray, labels: dict[int, str], path: Path) -> None:
    from freesegdiff.io.outputs import label_png

    label_png(label_map, labels).save(path)


@dataclass
class _Measured:
    stages: list[dict[str, float]]
    totals: list[float]


def bench_classes(pipe: FreeSegDiff) -> list[str] | None:
    """The class texts the bench gives a pipeline without a captioner (``naclip``): VOC21's
    synonym lists, 56 texts, as ``eval --dataset voc21`` gives them; None (open vocabulary,
    from the caption) otherwise."""
    if pipe.captioner is not None:
        return None
    from freesegdiff.evaluation.classnames import flatten_synonyms, load_class_names

    return list(flatten_synonyms(load_class_names("voc21"), 0).texts)


def _run_images(
    pipe: FreeSegDiff,
    paths: Sequence[Path],
    out: Path,
    batch_size: int,
    classes: list[str] | None = None,
) -> _Measured:
    """Read, segment and write ``paths`` batch by batch; per-image stage seconds and totals."""
    from freesegdiff.io.images import load_image

    measured = _Measured([], [])
    for start in range(0, len(paths), batch_size):
        batch = list(paths[start : start + batch_size])
        began = time.perf_counter()
        timer = StageTimer(pipe.device)
        with timer("io"):
            arrays = [load_image(path) for path in batch]
        results = pipe.segment_arrays(arrays, [str(path) for path in batch], classes, timer)
        writing = StageTimer()
        with writing("io"):
            for path, result in zip(batch, results, strict=True):
                _write_label_map(result.label_map, result.labels, out / f"{path.stem}.png")
        elapsed = time.perf_counter() - began
        for result in results:
            stages = {stage: float(result.timings.get(stage, 0.0)) for stage in STAGES}
            stages["io"] += writing.seconds["io"] / len(batch)
            measured.stages.append(stages)
            measured.totals.append(elapsed / len(batch))
    return measured


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    _sync(device)
    began = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - began


@torch.inference_mode()
def model_floor(
    pipe: FreeSegDiff, images: Sequence[np.ndarray], batch_size: int
) -> dict[str, float]:
    """Median seconds per image of each model's forward passes alone, batch by batch.

    Inputs are prepared outside the timed region: the captioner's preprocessed pixels, the
    VAE's resized image tensor, the UNet's noisy latents, CLIP's masked and preprocessed images
    (``clustering.k`` masks per image) and label texts (three per image).
    """
    device = pipe.device
    times: dict[str, list[float]] = {"caption": [], "vae": [], "unet": [], "backbone": []}
    times["clip"] = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        forwards = _forwards(pipe, batch)
        for name, forward in forwards.items():
            times[name].append(_timed(device, forward) / len(batch))
    return {name: statistics.median(values) for name, values in times.items() if values}


def _forwards(pipe: FreeSegDiff, batch: list[np.ndarray]) -> dict[str, Callable[[], object]]:
    """Each model's forward pass on this batch's prepared inputs, ready to call."""
    from freesegdiff.stages.features.diffusion import DiffusionFeatures

    features, classifier, device, config = pipe.features, pipe.classifier, pipe.device, pipe.config
    forwards: dict[str, Callable[[], object]] = {}
    if pipe.captioner is not None:  # the pipeline's inputs and decoding, exactly
        forwards["caption"] = partial(pipe.captioner.generate, pipe.captioner.inputs(batch))
    if isinstance(features, DiffusionFeatures):
        forwards.update(_diffusion_forwards(features, batch, config))
    elif features is not None:  # a ViT backbone: its whole call, resize and scaling included
        forwards["backbone"] = partial(features, batch, seed=config.seed)
    if config.classify.namer == "dense":
        forwards["clip"] = _dense_forward(pipe.namer.dense, batch, bench_classes(pipe))
    else:
        forwards["clip"] = _clip_forward(classifier, batch, config.clustering.k, device)
    return forwards


def _dense_forward(
    dense: Any, batch: list[np.ndarray], classes: list[str] | None
) -> Callable[[], object]:
    """The dense namer's work on each image against the bench's class texts, or three label
    texts (their embeddings made beforehand): resize, every sliding window's forward,
    upsampling and PAMR as set."""
    texts = classes or ["cat", "sofa", "remote control"]
    dense.text_embeddings(texts)

    def clip() -> None:
        for image in batch:
            dense.logits(image, texts)

    return clip


def _diffusion_forwards(
    features: Any, batch: list[np.ndarray], config: PipelineConfig
) -> dict[str, Callable[[], object]]:
    """The VAE's and the UNet's forward passes on this batch's prepared inputs."""
    from freesegdiff.infra.devices import image_generators
    from freesegdiff.stages.features import images_to_tensor

    device = features.device
    forwards: dict[str, Callable[[], object]] = {}
    pixels = images_to_tensor(batch, config.features.image_size, device, config.features.resize)
    vae_input = pixels.to(features.dtype)
    runtime = features.runtime
    if runtime is not None:  # as DiffusionFeatures.encode runs it
        vae_input = runtime.vae_input(features, vae_input)

    def vae() -> None:
        if runtime is None:
            features.vae.encode(vae_input)
            return
        with runtime.vae_buffers(features, vae_input):
            features.vae.encode(vae_input)

    forwards["vae"] = vae
    generators = image_generators(config.seed, len(batch), device)
    noisy = features.add_noise(features.encode(pixels, generators), generators)
    forwards["unet"] = partial(features.unet_queries, noisy)
    return forwards


def _clip_forward(
    classifier: Any, batch: list[np.ndarray], k: int, device: torch.device
) -> Callable[[], object]:
    """CLIP's forward passes on ``k`` masked images per image and three label texts each."""
    masked = []
    for image in batch:
        height, width = image.shape[:2]
        masks = torch.zeros(k, height, width, dtype=torch.bool, device=device)
        for index in range(k):  # K vertical stripes
            masks[index, :, index * width // k : (index + 1) * width // k] = True
        masked.append(classifier.masked_images(image, masks))
    clip_images = torch.cat(masked).to(classifier.dtype)
    texts = classifier.processor.tokenizer(
        ["cat", "sofa", "remote control"] * len(batch), padding=True, return_tensors="pt"
    ).to(device)

    def clip() -> None:
        classifier.model.get_image_features(pixel_values=clip_images)
        classifier.model.get_text_features(**texts)

    return clip


def run_bench(settings: BenchSettings) -> BenchReport:
    """Build the preset's pipeline, run the images after one warm-up batch, and measure."""
    if settings.images < 1:
        raise ConfigError(f"--images must be at least 1, got {settings.images}")
    if settings.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if min(settings.size) < 16:
        raise ConfigError(f"--size must be at least 16x16, got {settings.size}")
    if settings.stream and settings.images < STREAM_IMAGES:
        raise ConfigError(
            f"--stream needs --images of at least {STREAM_IMAGES} (the stream fills with the "
            f"first few), got {settings.images}"
        )
    config = bench_config(settings)
    hub_names = _hub_names(config)
    if not _is_tiny(config):  # written once, in a child process: not part of the load
        config = with_layout_folders(config)
    load_before = _load_average()  # other processes compete for the cores: say how busy
    runtime = settings.runtime
    began = time.perf_counter()
    # the user's loading path: each library's from_pretrained on folders in the Hub layouts
    pipe = FreeSegDiff.from_config(config, runtime=runtime, source=bench_source())
    if pipe.captioner is not None:
        pipe.release_text_encoder()  # open vocabulary: only the empty prompt is ever embedded
    if runtime is not None:
        after_loading(runtime)
    load_seconds = time.perf_counter() - began
    load_peak = peak_rss_gb()
    logger.info("models loaded in %.1f s, peak %.2f GB", load_seconds, load_peak)
    batch_size = settings.batch_size
    images = bench_images(batch_size + settings.images, settings.size)
    with tempfile.TemporaryDirectory(prefix="freesegdiff-bench-") as folder:
        root = Path(folder)
        (root / "out").mkdir()
        paths = []
        for index, image in enumerate(images):
            from PIL import Image

            path = root / f"image-{index:03d}.jpg"
            Image.fromarray(image).save(path, quality=90)
            paths.append(path)
        classes = bench_classes(pipe)
        _run_images(pipe, paths[:batch_size], root / "out", batch_size, classes)  # warm-up
        began = time.perf_counter()
        measured = _run_images(pipe, paths[batch_size:], root / "out", batch_size, classes)
        wall = time.perf_counter() - began
        streamed = (
            _stream_images(pipe, paths[batch_size:], root / "streamed", classes)
            if settings.stream
            else None
        )
    floor = model_floor(pipe, images[batch_size:], batch_size)
    stages = {stage: statistics.median(per[stage] for per in measured.stages) for stage in STAGES}
    named = sum(sum(per.values()) for per in measured.stages)
    device = pipe.device
    run_settings = {
        "preset": settings.preset,
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "image_size": list(settings.size),
        "images": settings.images,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        # on a GPU the models live in its memory: its peak, as torch's allocator saw it
        "peak_gpu_gb": (
            round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
            if device.type == "cuda"
            else None
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "caption_tokens": _caption_tokens(config) if pipe.captioner is not None else None,
        "class_texts": None if classes is None else len(classes),  # given, no captioner
        "models": {
            key: {"hub_id": name, "folder": getattr(config.models, key)}
            for key, name in hub_names.items()
        },
        "wall_seconds": round(wall, 3),
        "load_average_before": load_before,  # 1, 5 and 15 minutes, before the models
        "load_average_after": _load_average(),  # this run's own load included
        "runtime": None if runtime is None else asdict(runtime),
    }
    return BenchReport(
        stages=stages,
        seconds_per_image=statistics.median(measured.totals),
        images_per_second=len(measured.totals) / sum(measured.totals),
        model_floor_seconds=sum(floor.values()),
        model_floor=floor,
        overhead=1.0 - named / sum(measured.totals),
        peak_rss_gb=peak_rss_gb(),
        load_seconds=round(load_seconds, 2),
        load_peak_rss_gb=round(load_peak, 3),
        settings=run_settings,
        per_image=[
            {**per, "total": total}
            for per, total in zip(measured.stages, measured.totals, strict=True)
        ],
        stream=None if streamed is None else asdict(streamed),
    )


def _stream_images(
    pipe: FreeSegDiff, paths: Sequence[Path], out: Path, classes: list[str] | None
) -> StreamFigures:
    """``paths`` through the streaming executor as ``segment`` runs a folder (its batches,
    groups and queues), each label map written as it comes out; the stream's figures."""
    from dataclasses import replace

    out.mkdir(parents=True, exist_ok=True)
    saved = pipe.runtime
    pipe.runtime = replace(saved or RuntimeOptions.off(), stream=True)
    done: list[float] = []
    refining = 0.0
    began = time.perf_counter()
    try:
        for name, outcome, _ in pipe.iter_segment_with_images([str(p) for p in paths], classes):
            if isinstance(outcome, Exception):
                raise outcome
            _write_label_map(outcome.label_map, outcome.labels, out / f"{Path(name).stem}.png")
            refining += float(outcome.timings.get("refinement", 0.0))
            done.append(time.perf_counter())
    finally:
        pipe.runtime = saved
    wall = done[-1] - began
    stats = pipe.last_stream.stats
    # the first batch fills the stream: the steady rate counts the images after it
    first = min(max(1, pipe.config.batch_size), len(done)) - 1
    span = done[-1] - done[first]
    steady = (len(done) - 1 - first) / span if span > 0 else 0.0
    return StreamFigures(
        images=len(done),
        images_per_second=len(done) / wall,
        steady_images_per_second=steady,
        busy={name: round(share, 4) for name, share in stats.busy_fraction().items()},
        refinement_workers=round(refining / wall, 3),
        queue_depths={name: round(depth, 3) for name, depth in stats.mean_depths().items()},
        wall_seconds=round(wall, 3),
    )


def _load_average() -> list[float] | None:
    import os

    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None
