"""What the runs of an ablation grid share, computed once and kept on disk.

Runs that differ only in later stages (K, normalisation, refinement) see the same captions,
entity lists and features. :class:`CachingSource` is a :class:`~freesegdiff.pipeline.ModelSource`
whose stages look their outputs up in a :class:`StageStore` first, keyed by the image's pixels
and by every setting that produces them, and load a model only when something is missing:

====================  ======================================  ===============================
stage                 key: settings                           stored per image (or text)
====================  ======================================  ===============================
``caption``           captioner model, ``caption``, dtype     the caption (a string array)
``entities``          ``entities`` (and the adjective form)   the entity list (strings)
``features``          feature model, ``features``, seed, dtype  ``(C, F, F)`` float32
``text``              Stable Diffusion model, dtype           one text embedding ``(D,)``
====================  ======================================  ===============================

(device type, revision and variant are part of every model key). Layout::

    CACHE/<stage>/<setting hash>/setting.json   the settings the hash stands for
    CACHE/<stage>/<setting hash>/<item hash>.npz  one output and its seconds, written atomically

Every lookup is counted (``computed`` and ``reused`` per stage, and model loads), so a test can
prove that shared work is done once. Each stored output keeps the seconds it took, so a run that
reuses it still reports the seconds its setting costs (:meth:`StageStore.credit`).

Nothing here changes what a stage computes: a cached output is the float32 array or the text the
stage returned, so a run with the cache gives the label maps a run without it gives.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from freesegdiff.infra import timing
from freesegdiff.infra.timing import StageTimer
from freesegdiff.io import atomic

if TYPE_CHECKING:
    from freesegdiff.pipeline import ModelSource

logger = logging.getLogger(__name__)

CAPTION = "caption"
ENTITIES = "entities"
FEATURES = "features"
TEXT = "text"


def digest(value: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-able value (dataclasses and tuples included)."""
    text = json.dumps(_plain(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def image_key(image: np.ndarray) -> str:
    """The hash of an image's pixels and shape: the same image read twice has the same key."""
    array = np.ascontiguousarray(image)
    hasher = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    hasher.update(array.data)
    return hasher.hexdigest()[:24]


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    return value


class StageStore:
    """The on-disk cache of shared stage outputs under ``root``, with its counters.

    ``computed[stage]`` and ``reused[stage]`` count outputs (images, or texts for ``text``)
    made and read back in this process; ``loads[model]`` counts model loads.
    """

    def __init__(
        self,
        root: str | Path,
        stages: Sequence[str] = (CAPTION, ENTITIES, FEATURES, TEXT),
        shared_features: set[str] | None = None,
    ):
        self.root = Path(root)
        self.stages = frozenset(stages)
        # the feature settings (digest of feature_setting) worth keeping; None: every one
        self.shared_features = shared_features
        self.computed: Counter[str] = Counter()
        self.reused: Counter[str] = Counter()
        self.loads: Counter[str] = Counter()
        # image key -> stage -> seconds of the outputs reused since the last credit()
        self._credit: dict[str, dict[str, float]] = defaultdict(dict)
        # the image each caption was last given for, and the image whose vocabulary is being
        # made (entities, then text embeddings): where the seconds of reused ones are credited
        self.image_of_caption: dict[str, str] = {}
        self.current_image: str | None = None

    def folder(self, stage: str, setting: dict[str, Any]) -> Path | None:
        """The folder of ``stage``'s outputs under ``setting``; None when the stage is not kept."""
        if stage not in self.stages:
            return None
        key = digest(setting)
        unshared = self.shared_features is not None and key not in self.shared_features
        if stage == FEATURES and unshared:
            return None  # one run uses these features: computed, not kept
        folder = self.root / stage / key
        if not (folder / "setting.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps(_plain(setting), indent=2, sort_keys=True) + "\n"
            atomic.write_text(folder / "setting.json", text)
        return folder

    # ------------------------------------------------------------------------------ entries
    def get_array(
        self, folder: Path | None, key: str
    ) -> tuple[np.ndarray, dict[str, float]] | None:
        """A stored array and the seconds (per timing stage) it took; None if absent."""
        if folder is None:
            return None
        path = folder / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as stored:
                array = stored["array"]
                seconds = json.loads(str(stored["seconds"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as error:
            logger.warning("unreadable cache entry %s (%s): computing it again", path, error)
            return None
        return array, seconds

    def put_array(
        self, folder: Path | None, key: str, array: np.ndarray, seconds: dict[str, float]
    ) -> None:
        if folder is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, array=array, seconds=np.array(json.dumps(seconds)))
        atomic.write_bytes(folder / f"{key}.npz", buffer.getvalue())

    def through(
        self,
        stage: str,
        folder: Path | None,
        keys: Sequence[str],
        compute: Callable[[list[int]], tuple[Sequence[np.ndarray], dict[str, float]]],
        credit_to: Callable[[int], str | None],
    ) -> list[np.ndarray]:
        """Each key's output: read from ``folder``, or made by one ``compute(missing indices)``
        call, which returns their arrays and the seconds (per timing stage) of the whole call;
        each is stored with its share of those seconds. Counted per stage; a reused output's
        seconds are credited to the image ``credit_to(index)`` names (None: to none)."""
        found = [self.get_array(folder, key) for key in keys]
        missing = [index for index, entry in enumerate(found) if entry is None]
        if missing:
            arrays, seconds = compute(missing)
            share = {name: value / len(missing) for name, value in seconds.items()}
            for index, array in zip(missing, arrays, strict=True):
                found[index] = (array, share)
                self.put_array(folder, keys[index], array, share)
            self.computed[stage] += len(missing)
        outputs = []
        for index, entry in enumerate(found):
            assert entry is not None
            if index not in missing:
                self.reuse(stage, credit_to(index), entry[1])
            outputs.append(entry[0])
        return outputs

    # ------------------------------------------------------------------------------ seconds
    def reuse(self, stage: str, image: str | None, seconds: dict[str, float]) -> None:
        """Count a reused output; remember its seconds against ``image`` (if any)."""
        self.reused[stage] += 1
        if image is not None:
            for name, value in seconds.items():
                self._credit[image][name] = self._credit[image].get(name, 0.0) + value

    def credit(self, image: np.ndarray) -> dict[str, float]:
        """The seconds (per timing stage) of the outputs reused for ``image`` since the last
        call, which the run did not spend again; forgotten once returned."""
        return self._credit.pop(image_key(image), {})

    def summary(self) -> dict[str, dict[str, int]]:
        """``{"computed": {...}, "reused": {...}, "loads": {...}}``, per stage or model."""
        return {
            "computed": dict(sorted(self.computed.items())),
            "reused": dict(sorted(self.reused.items())),
            "loads": dict(sorted(self.loads.items())),
        }


class _OneAtATime:
    """Loads models on demand and keeps the last one per kind (a grid seldom goes back)."""

    def __init__(self, store: StageStore) -> None:
        self.store = store
        self._held: dict[str, tuple[str, Any]] = {}

    def get(self, kind: str, key: str, load: Callable[[], Any]) -> Any:
        held = self._held.get(kind)
        if held is not None and held[0] == key:
            return held[1]
        if held is not None:  # free the previous model first: two may not fit
            del self._held[kind]
            del held
            gc.collect()
        model = load()
        self.store.loads[kind] += 1
        self._held[kind] = (key, model)
        return model


def feature_setting(
    name: str | None, config: Any, device: Any, dtype: Any, load: Any, seed: int | None
) -> dict[str, Any]:
    """What a feature output depends on: the model, the ``features`` section, seed, dtype."""
    return {**_model_key(name, device, dtype, load), "features": config, "seed": seed}


def run_feature_setting(config: Any) -> dict[str, Any]:
    """:func:`feature_setting` of a :class:`~freesegdiff.config.PipelineConfig`'s run."""
    from freesegdiff.infra.devices import resolve_device, resolve_dtype
    from freesegdiff.infra.hub import LoadOptions

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    vit = config.features.extractor == "vit"
    name = config.models.backbone if vit else config.models.diffusion
    load = LoadOptions.of(config.models)
    return feature_setting(name, config.features, device, dtype, load, config.seed)


def _model_key(
    name: str | None, device: torch.device, dtype: torch.dtype, load: Any
) -> dict[str, Any]:
    return {
        "model": name,
        "device": torch.device(device).type,
        "dtype": str(dtype),
        "revision": getattr(load, "revision", None),
        "variant": getattr(load, "variant", None),
    }


class CachedCaptioner:
    """The caption stage through the store: ``caption(images) -> list[str]``."""

    def __init__(self, load: Callable[[], Any], store: StageStore, folder: Path | None) -> None:
        self._load = load
        self.store = store
        self.folder = folder

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        keys = [image_key(image) for image in images]

        def compute(missing: list[int]) -> tuple[list[np.ndarray], dict[str, float]]:
            model = self._load()
            timer = StageTimer()
            with timer(timing.CAPTION):
                captions = model.caption([images[index] for index in missing])
            return [np.array(caption) for caption in captions], dict(timer.seconds)

        stored = self.store.through(CAPTION, self.folder, keys, compute, keys.__getitem__)
        captions = [str(caption) for caption in stored]
        self.store.image_of_caption.update(zip(captions, keys, strict=True))
        return captions


class CachedEntities:
    """The entity stage through the store: ``(caption, adjectives) -> list[str]``."""

    def __init__(self, inner: Any, store: StageStore, setting: dict[str, Any]) -> None:
        self.inner = inner
        self.store = store
        self.folder = store.folder(ENTITIES, setting)

    def __call__(self, caption: str | None, adjectives: Any = "phrase") -> list[str]:
        store = self.store
        store.current_image = None if caption is None else store.image_of_caption.get(caption)
        if caption is None:
            return list(self.inner(caption, adjectives))
        image = store.current_image

        def compute(_: list[int]) -> tuple[list[np.ndarray], dict[str, float]]:
            timer = StageTimer()
            with timer(timing.ENTITIES):
                entities = list(self.inner(caption, adjectives))
            return [np.array(entities, dtype=str)], dict(timer.seconds)

        key = digest([caption, adjectives], 24)
        (stored,) = store.through(ENTITIES, self.folder, [key], compute, lambda _: image)
        return [str(entity) for entity in stored]


class CachedFeatures:
    """The feature stage through the store (a
    :class:`~freesegdiff.stages.features.diffusion.FeatureExtractor`).

    The extractor is loaded when an image's features are missing; its closed-vocabulary text
    embedder is :meth:`CachingSource.text`'s (Stable Diffusion's text encoder alone, cached).
    """

    def __init__(
        self,
        load: Callable[[], Any],
        store: StageStore,
        setting: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        text: Callable[[], Any],
    ) -> None:
        self._load = load
        self.store = store
        self.setting = setting  # with the seed of each call: the key of its folder
        self.device = device
        self.dtype = dtype
        self.released: dict[str, list[str]] = {}
        self._text = text

    def __call__(
        self,
        images: Sequence[np.ndarray],
        seed: int | None = 0,
        stop_early: bool = True,
        timer: StageTimer | None = None,
    ) -> torch.Tensor:
        """``B`` images -> ``(B, C, F, F)`` float32 on ``device``, as the extractor gives them."""
        folder = self.store.folder(FEATURES, {**self.setting, "seed": seed})
        keys = [image_key(image) for image in images]

        def compute(missing: list[int]) -> tuple[list[np.ndarray], dict[str, float]]:
            extractor = self._load()
            own = StageTimer(extractor.device)
            computed = extractor(
                [images[index] for index in missing], seed=seed, stop_early=stop_early, timer=own
            )
            if timer is not None:
                for name, value in own.seconds.items():
                    timer.seconds[name] += value
            return [row.float().cpu().numpy() for row in computed], dict(own.seconds)

        arrays = self.store.through(FEATURES, folder, keys, compute, keys.__getitem__)
        return torch.from_numpy(np.stack(arrays)).to(self.device)

    def text_embedder(self) -> Any:
        return self._text()

    def release_unused(self) -> dict[str, list[str]]:
        return self.released  # the extractor frees its own when it is loaded

    def release_text_encoder(self) -> None:
        """Nothing to do: the text encoder is loaded apart, and only when needed."""


class CachingSource:
    """A :class:`~freesegdiff.pipeline.ModelSource` for grid runs: stages through ``store``.

    ``base`` makes the real models (default :data:`~freesegdiff.pipeline.PRETRAINED`); each kind
    of model is loaded at most once per setting in a row, and only when an output is missing.
    CLIP is always needed (it names every run's masks) and is loaded once per name.
    """

    def __init__(self, store: StageStore, base: Any = None) -> None:
        from freesegdiff.pipeline import PRETRAINED

        self.store = store
        self.base = base or PRETRAINED
        self.models = _OneAtATime(store)

    # the ModelSource fields, as bound methods
    def features(
        self,
        name: str,
        config: Any,
        device: torch.device,
        dtype: torch.dtype,
        load: Any,
        runtime: Any,
    ) -> CachedFeatures:
        setting = feature_setting(name, config, device, dtype, load, None)
        key = digest(setting)  # without a seed: one model serves every seed

        def make() -> Any:
            extractor = self.base.features(name, config, device, dtype, load, runtime)
            extractor.release_unused()
            return extractor

        return CachedFeatures(
            lambda: self.models.get(FEATURES, key, make),
            self.store,
            setting,
            torch.device(device),
            dtype,
            lambda: self.text(name, device, dtype, load),
        )

    def clip(self, name: str, device: torch.device, dtype: torch.dtype, load: Any) -> Any:
        key = digest(_model_key(name, device, dtype, load))
        return self.models.get("clip", key, lambda: self.base.clip(name, device, dtype, load))

    def captioner(
        self,
        name: str,
        config: Any,
        device: torch.device,
        dtype: torch.dtype,
        load: Any,
        runtime: Any = None,
    ) -> CachedCaptioner:
        setting = {**_model_key(name, device, dtype, load), "caption": config}
        key = digest(setting)  # (the runtime changes no token: not part of the key)

        def make() -> Any:
            return self.base.captioner(name, config, device, dtype, load, runtime)

        return CachedCaptioner(
            lambda: self.models.get(CAPTION, key, make),
            self.store,
            self.store.folder(CAPTION, setting),
        )

    def text(self, name: str, device: torch.device, dtype: torch.dtype, load: Any) -> Any:
        """The closed-vocabulary text embedder of Stable Diffusion ``name``, through the store."""
        setting = _model_key(name, device, dtype, load)
        key = digest(setting)
        folder = self.store.folder(TEXT, setting)
        store = self.store

        def load_embedder() -> Any:
            return self.models.get(TEXT, key, lambda: self.base.text(name, device, dtype, load))

        def embed(texts: Sequence[str]) -> torch.Tensor:
            if not texts:
                return load_embedder()(texts)
            keys = [digest(text, 24) for text in texts]

            def compute(missing: list[int]) -> tuple[list[np.ndarray], dict[str, float]]:
                embedder = load_embedder()
                timer = StageTimer()
                with timer(timing.ENTITIES):  # text embeddings are part of that stage
                    rows = embedder([texts[index] for index in missing]).float().cpu().numpy()
                return list(rows), dict(timer.seconds)

            image = store.current_image
            rows = store.through(TEXT, folder, keys, compute, lambda _: image)
            return torch.from_numpy(np.stack(rows))

        return embed

    def as_source(self) -> ModelSource:
        """These factories as the :class:`~freesegdiff.pipeline.ModelSource` a pipeline takes."""
        from freesegdiff.pipeline import ModelSource

        return ModelSource(self.features, self.clip, self.captioner, self.text)

    def entities(self, config: Any) -> CachedEntities:
        """The entity stage of ``config`` (:class:`~freesegdiff.config.EntityConfig`) through the
        store, for a pipeline to be built with (the stage has no model to load)."""
        from freesegdiff.stages.entities import EntityExtractor

        return CachedEntities(EntityExtractor(config), self.store, {"entities": config})
