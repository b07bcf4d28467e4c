"""Stage 1 of the method: describe each image in one sentence with BLIP or BLIP-2.

The released FreeSeg-Diff script uses BLIP base fine-tuned for COCO captioning
(``Salesforce/blip-image-captioning-base``); the paper names BLIP-2 (``Salesforce/blip2-opt-2.7b``).
Both load here through their own transformers classes, picked from the checkpoint's config, and
caption a whole list of images with one batched ``generate`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
from PIL import Image

from freesegdiff.config import CaptionConfig
from freesegdiff.errors import ConfigError, ImageReadError
from freesegdiff.infra.devices import frozen
from freesegdiff.infra.hub import LoadOptions, load_pretrained
from freesegdiff.infra.weights import load_model

if TYPE_CHECKING:
    from freesegdiff.infra.tuning import RuntimeOptions

CaptionerKind = Literal["blip", "blip2"]
CaptionerT = TypeVar("CaptionerT", bound="Captioner")

# transformers ``model_type`` -> our name for it. Anything else is refused up front.
_KINDS: dict[str, CaptionerKind] = {"blip": "blip", "blip-2": "blip2"}
_WHAT = "captioner"
_FLAG = "--captioner-model"


def _model_classes(kind: CaptionerKind) -> tuple[Any, Any]:
    """The (model, processor) transformers classes of a captioner kind."""
    if kind == "blip":
        from transformers import BlipForConditionalGeneration, BlipProcessor

        return BlipForConditionalGeneration, BlipProcessor
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    return Blip2ForConditionalGeneration, Blip2Processor


def _check_image(image: object, index: int) -> Image.Image:
    """An ``(H, W, 3)`` ``uint8`` array -> PIL image (no channel-order guessing downstream)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        got = (
            f"a {image.dtype} array of shape {image.shape}"
            if isinstance(image, np.ndarray)
            else f"a {type(image).__name__}"
        )
        raise ImageReadError(
            f"image {index} must be an (H, W, 3) uint8 RGB array, got {got}; "
            "read images with freesegdiff.io.images.load_image"
        )
    if image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ImageReadError(
            f"image {index} must be an (H, W, 3) uint8 RGB array, got shape {image.shape}; "
            "read images with freesegdiff.io.images.load_image"
        )
    return Image.fromarray(image)


class Captioner:
    """One captioning model (BLIP or BLIP-2) with its processor, frozen, in eval mode.

    Build it with :meth:`from_pretrained`; then :meth:`caption` describes a batch of images.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        config: CaptionConfig,
        runtime: RuntimeOptions | None = None,
    ) -> None:
        """Wrap an already loaded ``Blip(2)ForConditionalGeneration`` and its processor.

        ``runtime``: the speed tuning (:class:`~freesegdiff.infra.tuning.RuntimeOptions`):
        extra ``generate`` keywords per call that change no token (``fast_captioner``:
        BLIP's decoder and vision attention at their floor; ``beam_cross_cache``);
        None: transformers' ``generate`` as released.

        Raises:
            ConfigError: the model is neither BLIP nor BLIP-2.
        """
        model_type = getattr(model.config, "model_type", None)
        if model_type not in _KINDS:
            raise ConfigError(_unsupported_message(str(model_type)))
        self.model = frozen(model, model.device)
        self.processor = processor
        self.config = config
        self.generate_options: Callable[[Captioner, int], dict[str, Any]] | None = (
            runtime.generate_options() if runtime is not None else None
        )
        self._kind: CaptionerKind = _KINDS[model_type]
        if self._kind == "blip2" and getattr(processor, "num_query_tokens", None) is None:
            # Older Hub checkpoints lack it in processor_config.json; without it a prompt is
            # not preceded by the image tokens that the model fills with the Q-Former output.
            processor.num_query_tokens = model.config.num_query_tokens

    @classmethod
    def from_pretrained(
        cls: type[CaptionerT],
        name: str,
        *,
        config: CaptionConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        load: LoadOptions | None = None,
        runtime: RuntimeOptions | None = None,
    ) -> CaptionerT:
        """Load a BLIP or BLIP-2 captioner (an instance of ``cls``).

        Args:
            name: a Hub id (``Salesforce/blip-image-captioning-base``), a local folder in the
                Hub's layout, or ``tiny:blip`` / ``tiny:blip2``.
            config: generation settings used by :meth:`caption`.
            device: where the model runs.
            dtype: weight dtype (the pixels are cast to it).
            load: how to fetch the weights (offline, revision, cache folder).
            runtime: the speed tuning (see the constructor).

        Raises:
            ModelUnavailableError: the weights are neither local nor downloadable.
            ConfigError: the checkpoint is not a BLIP or BLIP-2 model (checked before any
                weights are loaded).
        """
        from transformers import AutoConfig

        options: dict[str, Any] = {
            "what": _WHAT,
            "flag": _FLAG,
            "load": load,
        }
        model_config = load_pretrained(AutoConfig.from_pretrained, name, **options)
        model_type = str(getattr(model_config, "model_type", None))
        if model_type not in _KINDS:
            raise ConfigError(_unsupported_message(model_type, name))
        model_class, processor_class = _model_classes(_KINDS[model_type])
        # the weights straight into dtype on device (freesegdiff.infra.weights)
        model = load_model(model_class.from_pretrained, name, dtype=dtype, device=device, **options)
        processor = load_pretrained(processor_class.from_pretrained, name, **options)
        return cls(model, processor, config=config, runtime=runtime)

    @property
    def kind(self) -> CaptionerKind:
        """``"blip"`` or ``"blip2"``."""
        return self._kind

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return torch.device(self.model.device)

    @property
    def dtype(self) -> torch.dtype:
        """The model's weight dtype."""
        dtype: torch.dtype = self.model.dtype
        return dtype

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """Describe each image in one sentence, with one batched ``generate`` call.

        Decoding follows :class:`~freesegdiff.config.CaptionConfig` (docs/method.md, step 1):
        by default LAVIS's ``generate()`` for BLIP base_coco, beam search with 3 beams, lengths
        10 to 30 counting the prompt's tokens, the prompt "a picture of " given to the decoder
        and cut off the returned caption (``strip_prompt``). With ``strip_prompt`` off the
        caption keeps the prompt, as transformers returns it (BLIP's BERT tokenizer lower-cases
        it); BLIP-2 is treated the same way, so both kinds agree.

        Args:
            images: ``N`` RGB images, each an ``(H, W, 3)`` ``uint8`` array of any size (the
                processor resizes to the model's input, e.g. 384x384 for BLIP base).

        Returns:
            ``N`` captions, stripped of special tokens and surrounding spaces, in input order.

        Raises:
            ImageReadError: an image is not an ``(H, W, 3)`` ``uint8`` array.
        """
        if not images:
            return []
        token_ids = self.generate(self.inputs(images))
        texts = self.processor.batch_decode(token_ids, skip_special_tokens=True)
        prompt = self.config.prompt
        return [_strip(text, prompt if self.config.strip_prompt else None) for text in texts]

    def inputs(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """The processor's model inputs for ``N`` images, on the model's device: pixels
        ``(N, 3, S, S)`` in the model's dtype and, with a prompt, its token ids and mask ``(N, L)``.

        Raises:
            ImageReadError: an image is not an ``(H, W, 3)`` ``uint8`` array.
        """
        pictures = [_check_image(image, index) for index, image in enumerate(images)]
        prompt = self.config.prompt
        text = None if prompt is None else [prompt] * len(pictures)
        inputs = self.processor(images=pictures, text=text, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        # pixels in the model's dtype; token ids and masks stay integer
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def generate(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One batched ``generate`` call with the configured decoding (:meth:`inputs` gives the
        inputs): ``(N, L)`` token ids, the prompt's (if any) followed by the generated ones.

        Beam search shares the work across beams as transformers runs it: the vision encoder
        runs once per image, its output is repeated per beam, the decoder keeps its key/value
        cache, and one decoder step advances every beam of every image (tests/test_captioner.py
        counts the calls).
        """
        options = (
            {}
            if self.generate_options is None
            else self.generate_options(self, int(inputs["pixel_values"].shape[0]))
        )
        with torch.inference_mode():
            token_ids: torch.Tensor = self.model.generate(
                **inputs, num_beams=self.config.num_beams, **self.length_arguments(), **options
            )
        return token_ids

    def length_arguments(self) -> dict[str, int]:
        """The length keywords for ``generate`` (docs/method.md, step 1).

        BLIP: ``max_length`` / ``min_length`` go to ``generate`` as they are: transformers
        counts the decoder's input ids (its start token and the prompt) in them, as LAVIS does.
        BLIP-2: they become new-token counts, as LAVIS's OPT captioner counts them.
        ``max_new_tokens`` / ``min_new_tokens``, when set, replace them.
        """
        config = self.config
        arguments: dict[str, int] = {}
        total = "max_length" if self._kind == "blip" else "max_new_tokens"
        floor = "min_length" if self._kind == "blip" else "min_new_tokens"
        if config.max_new_tokens is not None:
            arguments["max_new_tokens"] = config.max_new_tokens
        elif config.max_length is not None:
            arguments[total] = config.max_length
        if config.min_new_tokens is not None:
            arguments["min_new_tokens"] = config.min_new_tokens
        elif config.min_length is not None:
            arguments[floor] = config.min_length
        return arguments


def _strip(text: str, prompt: str | None) -> str:
    """The decoded caption without surrounding spaces and, if given, without the prompt.

    LAVIS cuts ``len(prompt)`` characters off the decoded text; the decoder was forced to start
    with the prompt, so the text starts with it (as the tokenizer writes it back) and the cut is
    the same. Should a tokenizer write the prompt back differently, nothing is cut.
    """
    text = text.strip()
    if prompt is not None and prompt.strip():
        written = prompt.strip()
        if text.lower().startswith(written.lower()):
            text = text[len(written) :].strip()
    return text


def _unsupported_message(model_type: str, name: str | None = None) -> str:
    """The error text for a checkpoint that is not a supported captioner."""
    which = f"{name!r} is" if name is not None else "the model is"
    return (
        f"{which} a {model_type!r} model, not a captioner; supported captioners are BLIP "
        "(model_type 'blip', e.g. Salesforce/blip-image-captioning-base) and BLIP-2 "
        f"(model_type 'blip-2', e.g. Salesforce/blip2-opt-2.7b). Pass one with {_FLAG}."
    )
