"""Diffusion features: Stable Diffusion's UNet queries as dense image features.

docs/method.md, steps 3 to 7.

An image is resized to ``image_size`` squared, scaled to [-1, 1], encoded by the VAE (a posterior
sample times the scaling factor), noised to timestep ``t`` and passed once through the UNet with
the empty-prompt embedding. Forward hooks take the query projection ``attn2.to_q(hidden_states)``
of the first transformer block of the chosen attention layers (``features.kind``: ``"queries"``,
the released features; ``"hidden"``, the projection's input, i.e. the cross-attention's input
hidden states; ``"resnet"``, the outputs of chosen resnet blocks instead; ``"attention"``, the
released attention maps of the queries); the UNet stops right after the last of them (later
blocks would only cost time). Every map is resized bilinearly to ``feature_size`` squared and
the maps are concatenated along channels.

The models run as diffusers releases them. Speed and memory tuning (in-place ResNet forwards,
channels-last, heap buffers) lives in :mod:`freesegdiff.infra.tuning` and is used only when a
``runtime`` is given (:class:`FeatureRuntime`); it changes no float32 value (channels-last,
used in bfloat16 on the CPU, rounds bfloat16 differently: see that module).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from freesegdiff.config import FeatureConfig
from freesegdiff.errors import ConfigError
from freesegdiff.infra import timing
from freesegdiff.infra.devices import frozen, image_generators, randn_per_image
from freesegdiff.infra.hub import LoadOptions, load_pretrained
from freesegdiff.infra.timing import StageTimer
from freesegdiff.stages.features import images_to_tensor
from freesegdiff.stages.features.unet import (
    QUERY_SUFFIX,
    StopForward,
    UNetLayer,
    refuse_call,
    release_modules,
    select_layers,
)

logger = logging.getLogger(__name__)


class FeatureRuntime(Protocol):
    """The speed and memory tuning a :class:`DiffusionFeatures` may be given as ``runtime``.

    :class:`freesegdiff.infra.tuning.RuntimeOptions` is one. It changes how the models run (layouts,
    buffers, allocation), not what they compute (up to the rounding of another layout).
    """

    def tune_models(self, features: DiffusionFeatures) -> None:
        """Called once the VAE and UNet are frozen on their device, before anything runs."""

    def vae_input(self, features: DiffusionFeatures, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's input ``pixels`` (model dtype), laid out as the tuned VAE wants it."""

    def vae_buffers(
        self, features: DiffusionFeatures, pixels: torch.Tensor
    ) -> AbstractContextManager[None]:
        """Wraps each VAE encode of ``pixels``."""


class DiffusionFeatures:
    """Dense features from a frozen Stable Diffusion (VAE, UNet, text encoder, scheduler).

    Build it with :meth:`from_pretrained`, or from already loaded diffusers/transformers modules.
    Calling it on a batch of images returns ``(B, C, feature_size, feature_size)`` float32.
    ``runtime``: speed and memory tuning (:class:`FeatureRuntime`); None runs the modules as
    diffusers releases them with the default allocation: the same float32 features.
    """

    def __init__(
        self,
        vae: Any,
        unet: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: Any,
        config: FeatureConfig,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        runtime: FeatureRuntime | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.vae = frozen(vae, device, dtype)
        self.unet = frozen(unet, device, dtype)
        self.text_encoder = frozen(text_encoder, device, dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.runtime = runtime
        if runtime is not None:
            runtime.tune_models(self)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if config.image_size % (self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)):
            raise ConfigError(
                f"features.image_size {config.image_size} must be a multiple of "
                f"{self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)} for this model"
            )
        self.layers = select_layers(
            self.unet,
            config.layers,
            config.resolutions,
            config.image_size,
            self.vae_scale,
            config.kind,
        )
        for name, value in (
            ("timestep", config.timestep),
            *(("timesteps", t) for t in config.timesteps or ()),
        ):
            if not 0 <= value < scheduler.config.num_train_timesteps:
                raise ConfigError(
                    f"features.{name} must be in [0, {scheduler.config.num_train_timesteps - 1}], "
                    f"got {value}"
                )
        self._empty_embedding: torch.Tensor | None = None
        self._class_keys: dict[str, torch.Tensor] | None = None
        # model -> modules freed by release_unused / release_text_encoder ("": all of it)
        self.released: dict[str, list[str]] = {}

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        config: FeatureConfig,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        load: LoadOptions | None = None,
        runtime: FeatureRuntime | None = None,
    ) -> DiffusionFeatures:
        """Load the four components of a diffusers Stable Diffusion (no safety checker), the
        weights straight into ``dtype`` on ``device``
        (:func:`freesegdiff.infra.weights.load_model`).

        ``name``: a Hub id, a local folder with ``model_index.json``, or ``tiny:stable-diffusion``.
        ``load``: how to fetch the weights (offline, revision, cache folder).
        ``runtime``: speed and memory tuning (:class:`freesegdiff.infra.tuning.RuntimeOptions`).
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from freesegdiff.infra.weights import load_model

        options: dict[str, Any] = {"what": "Stable Diffusion", "flag": "--diffusion-model"}
        options["load"] = load
        weights: dict[str, Any] = {"dtype": dtype, "device": device, **options}
        # diffusers names its dtype argument torch_dtype, transformers 5 dtype
        vae = load_model(
            AutoencoderKL.from_pretrained,
            name,
            subfolder="vae",
            dtype_keyword="torch_dtype",
            **weights,
        )
        unet = load_model(
            UNet2DConditionModel.from_pretrained,
            name,
            subfolder="unet",
            dtype_keyword="torch_dtype",
            **weights,
        )
        text_encoder = load_model(
            CLIPTextModel.from_pretrained, name, subfolder="text_encoder", **weights
        )
        tokenizer = load_pretrained(
            CLIPTokenizer.from_pretrained, name, subfolder="tokenizer", **options
        )
        # add_noise needs only the noise schedule, which every SD scheduler config carries.
        scheduler = load_pretrained(
            DDPMScheduler.from_pretrained, name, subfolder="scheduler", **options
        )
        return cls(
            vae, unet, text_encoder, tokenizer, scheduler, config, device, dtype, runtime=runtime
        )

    @property
    def channels(self) -> int:
        """Channels of the concatenated feature map (for SD 1.x with the paper's layers: 6400;
        times the number of timesteps when they are concatenated)."""
        per_timestep = 0
        if self.config.kind != "attention":
            per_timestep += sum(layer.channels for layer in self.layers)
        if self.scores:
            classes = len(self.attention_classes)
            per_timestep += sum(self._attention(layer).heads * classes for layer in self.layers)
        timesteps = self.config.timesteps
        if timesteps is not None and self.config.timestep_combine == "concat":
            return per_timestep * len(timesteps)
        return per_timestep

    def empty_prompt_embedding(self) -> torch.Tensor:
        """The text encoder's ``(1, 77, D)`` embedding of the empty prompt, computed once."""
        if self._empty_embedding is None:
            tokens = self.tokenizer(
                [""],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            with torch.inference_mode():
                output = self.text_encoder(tokens.input_ids.to(self.device))
            self._empty_embedding = output[0].to(self.dtype)
        return self._empty_embedding

    def text_embedder(self) -> Any:
        """The closed-vocabulary text embedder: this model's SD text encoder, mean over the
        77 positions (:func:`freesegdiff.stages.vocabulary.text_embedder`).

        Raises:
            ConfigError: the text encoder was freed (:meth:`release_text_encoder`).
        """
        if "text_encoder" in self.released:
            raise ConfigError(
                "this pipeline freed its text encoder for open-vocabulary runs "
                "(release_text_encoder), so it cannot match the caption against class names; "
                "build it again, or set vocabulary.prune_with_caption to false (--no-prune)"
            )
        from freesegdiff.stages.vocabulary import text_embedder

        return text_embedder(self.tokenizer, self.text_encoder, self.device, self.dtype)

    def release_text_encoder(self) -> None:
        """Embed the empty prompt (all the features need), then free the text encoder.

        For runs that never embed other texts (open vocabulary: no class list to match the
        caption against). SD 1.x's text encoder is 123 M parameters, 0.25 GB in bfloat16.
        """
        self.empty_prompt_embedding()
        if self.scores:
            self.class_keys()  # the attention features' keys, while the encoder is here
        self.text_encoder.to("meta")
        for module in self.text_encoder.modules():
            module.register_forward_pre_hook(refuse_call)
        self.released["text_encoder"] = [""]

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """``(B, 3, S, S)`` in [-1, 1] -> scaled latents ``(B, 4, S/8, S/8)`` in the model dtype."""
        pixels = pixels.to(self.dtype)
        if self.runtime is None:
            posterior = self.vae.encode(pixels).latent_dist
        else:
            pixels = self.runtime.vae_input(self, pixels)
            with self.runtime.vae_buffers(self, pixels):
                posterior = self.vae.encode(pixels).latent_dist
        if self.config.sample_latent:
            noise = randn_per_image(tuple(posterior.mean.shape[1:]), generators, self.device)
            latents = posterior.mean.float() + posterior.std.float() * noise
        else:
            latents = posterior.mean.float()
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    @torch.inference_mode()
    def add_noise(
        self,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        timestep: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scheduler's forward noising of ``latents`` to ``timestep`` (None:
        ``config.timestep``); ``noise``: the standard normal draw to use (None: drawn now from
        each image's generator), ``(B, 4, h, w)`` float32."""
        if noise is None:
            noise = randn_per_image(tuple(latents.shape[1:]), generators, self.device)
        timesteps = torch.full(
            (latents.shape[0],),
            self.config.timestep if timestep is None else timestep,
            dtype=torch.long,
            device=self.device,
        )
        noisy = self.scheduler.add_noise(latents.float(), noise, timesteps)
        return noisy.to(self.dtype)

    @torch.inference_mode()
    def unet_queries(
        self, latents: torch.Tensor, stop_early: bool = True, timestep: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the UNet on noisy latents; return what each hooked layer gives the features: its
        query ``(B, h*w, C)`` (``features.kind`` ``"hidden"``: the query projection's input;
        ``"resnet"``: the resnet block's output ``(B, C, h, w)``).

        With ``stop_early`` the pass ends right after the last hooked layer; otherwise the UNet
        runs to the end (used to prove the two give the same features).
        """
        if not stop_early and self.released.get("unet"):
            raise RuntimeError(
                "the UNet blocks after the last hooked layer were freed by release_unused(), so "
                "the full pass cannot run; build the DiffusionFeatures again without releasing"
            )
        captured: dict[str, torch.Tensor] = {}
        last = self.layers[-1].name
        handles = []

        take_input = self.config.kind == "hidden"

        def make_hook(layer_name: str) -> Any:
            def hook(_module: Any, inputs: Any, output: torch.Tensor) -> None:
                captured[layer_name] = inputs[0] if take_input else output
                if stop_early and layer_name == last:
                    raise StopForward

            return hook

        suffix = "" if self.config.kind == "resnet" else f".{QUERY_SUFFIX}"
        for layer in self.layers:
            module = self.unet.get_submodule(layer.name + suffix)
            handles.append(module.register_forward_hook(make_hook(layer.name)))
        batch = latents.shape[0]
        context = self.empty_prompt_embedding().expand(batch, -1, -1)
        step = self.config.timestep if timestep is None else timestep
        steps = torch.full((batch,), step, device=self.device)
        try:
            self.unet(latents, steps, encoder_hidden_states=context, return_dict=False)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [layer.name for layer in self.layers if layer.name not in captured]
        if missing:
            raise RuntimeError(f"the UNet pass never reached layers {missing}")
        return captured

    def release_unused(self) -> dict[str, list[str]]:
        """Free the weights of every VAE and UNet module the features never run.

        One trace pass at the smallest input the models take (a ``64x64`` image for SD 1.x)
        records which modules :meth:`encode` and an early-stopped :meth:`unet_queries` enter;
        every module outside that set (the VAE decoder; the UNet after the last hooked query
        projection: for SD 1.x and the paper's layers about a fifth of its weights) moves to
        the ``meta`` device, which frees its memory, and raises if it is ever called. Only the
        full pass (``stop_early=False``) is refused afterwards; the features are unchanged.

        Returns:
            model (``"vae"``, ``"unet"``) -> names of the freed modules (outermost only).
        """
        if self.scores:
            self.class_keys()  # the last layer's to_k never runs in a pass: take its keys first
        entered: dict[str, set[str]] = {"vae": set(), "unet": set()}
        handles = []
        for key, model in (("vae", self.vae), ("unet", self.unet)):
            for name, module in model.named_modules():
                handles.append(
                    module.register_forward_pre_hook(
                        lambda *_, seen=entered[key], name=name: seen.add(name)
                    )
                )
        levels = len(self.unet.config.block_out_channels)
        side = self.vae_scale * 2 ** (levels - 1)  # latent side 2^(levels-1): 1x1 at the bottom
        try:
            pixels = torch.zeros(1, 3, side, side, device=self.device)
            generators = image_generators(0, 1, self.device)
            self.unet_queries(self.add_noise(self.encode(pixels, generators), generators))
        finally:
            for handle in handles:
                handle.remove()
        for key, model in (("vae", self.vae), ("unet", self.unet)):
            self.released[key] = release_modules(model, entered[key])
        return self.released

    def assemble(self, queries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hooked outputs (:meth:`unet_queries`) -> ``(B, C, F, F)`` float32: each map on its
        square grid, resized bilinearly to ``feature_size`` and concatenated in layer order."""
        size = self.config.feature_size
        maps = []
        for layer in self.layers:
            grid = queries[layer.name].float()
            if grid.ndim == 3:  # tokens (B, h*w, C) of an attention layer
                batch, tokens, channels = grid.shape
                side = round(tokens**0.5)
                if side * side != tokens:
                    raise RuntimeError(f"layer {layer.name} gave {tokens} tokens, not a square map")
                grid = grid.transpose(1, 2).reshape(batch, channels, side, side)  # (B, C, h, w)
            if grid.shape[-2:] != (size, size):
                grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
            maps.append(grid)
        if not self.scores:
            return torch.cat(maps, dim=1)
        attention = self.attention_maps(queries)
        if self.config.kind == "attention":
            return attention
        return torch.cat([attention, *maps], dim=1)  # the released order: attention, queries

    def attention_maps(self, queries: dict[str, torch.Tensor]) -> torch.Tensor:
        """The released attention features of hooked ``queries``: ``(B, sum heads * L, F, F)``
        float32, per layer the heads x classes score maps
        (:func:`freesegdiff.stages.features.attention_maps.attention_score_maps`)."""
        from freesegdiff.stages.features.attention_maps import attention_score_maps

        keys = self.class_keys()
        maps = []
        for layer in self.layers:
            heads = self._attention(layer).heads
            maps.append(
                attention_score_maps(
                    queries[layer.name], keys[layer.name], heads, self.config.feature_size
                )
            )
        return torch.cat(maps, dim=1)

    @property
    def scores(self) -> bool:
        """Whether the features hold the released attention score maps (``features.kind``
        ``"attention"`` or ``"queries+attention"``)."""
        return self.config.kind in ("attention", "queries+attention")

    def _attention(self, layer: UNetLayer) -> Any:
        return self.unet.get_submodule(f"{layer.name}.{QUERY_SUFFIX.rsplit('.', 1)[0]}")

    @property
    def attention_classes(self) -> tuple[str, ...]:
        """The class names the attention features score against."""
        from freesegdiff.config import VOC19_NAMES

        return self.config.attention_classes or VOC19_NAMES

    def class_keys(self) -> dict[str, torch.Tensor]:
        """Each hooked layer's ``to_k`` of the pooled class embeddings: ``(L, C)``, computed once
        (:func:`freesegdiff.stages.features.attention_maps.pooled_prompt_embeddings`)."""
        if self._class_keys is None:
            from freesegdiff.stages.features.attention_maps import pooled_prompt_embeddings

            embeddings = pooled_prompt_embeddings(
                self.tokenizer, self.text_encoder, self.attention_classes, self.device
            ).to(self.dtype)
            with torch.inference_mode():
                self._class_keys = {
                    layer.name: self._attention(layer).to_k(embeddings) for layer in self.layers
                }
        return self._class_keys

    def __call__(
        self,
        images: Sequence[np.ndarray],
        seed: int | None = 0,
        stop_early: bool = True,
        timer: StageTimer | None = None,
    ) -> torch.Tensor:
        """Features of a batch of RGB uint8 images (any sizes).

        Args:
            seed: seeds each image's posterior sample and noise (None: random).
            stop_early: end the UNet after the last hooked layer (False: run it to the end).
            timer: records the stages ``vae``, ``unet`` and ``features`` (assembly).

        Returns:
            ``(B, C, feature_size, feature_size)`` float32 on the extractor's device.
        """
        timer = timer or StageTimer(self.device)
        generators = image_generators(seed, len(images), self.device)
        step = self.batch_step(len(images))
        parts = []
        for start in range(0, len(images), step):
            chunk, chunk_generators = images[start : start + step], generators[start : start + step]
            with timer(timing.VAE):
                pixels = images_to_tensor(
                    chunk, self.config.image_size, self.device, self.config.resize
                )
                latents = self.encode(pixels, chunk_generators)
            # one noise draw per image, noised to each timestep (features.timesteps, else
            # features.timestep), one UNet pass each
            with timer(timing.UNET):
                noise = randn_per_image(tuple(latents.shape[1:]), chunk_generators, self.device)
            maps = []
            for timestep in self.config.timesteps or (self.config.timestep,):
                with timer(timing.UNET):
                    noisy = self.add_noise(latents, chunk_generators, timestep, noise)
                    queries = self.unet_queries(noisy, stop_early, timestep)
                with timer(timing.FEATURES):
                    maps.append(self.assemble(queries))
            if len(maps) == 1:
                parts.append(maps[0])
                continue
            with timer(timing.FEATURES):
                combined = (
                    torch.stack(maps).mean(0)
                    if self.config.timestep_combine == "mean"
                    else torch.cat(maps, dim=1)
                )
                parts.append(combined)
        return torch.cat(parts)

    def batch_step(self, count: int) -> int:
        """How many images the VAE and UNet see at once out of a batch of ``count``.

        All of them, except in reduced precision on the CPU: there oneDNN picks its bfloat16
        convolution kernels by batch size, so a batch would round differently from single
        images (~1 % of the features, enough to move k-means boundaries). One image at a time
        keeps a batched run identical to single-image runs, at a small cost in VAE and UNet
        speed (benchmarks/RESULTS.md; the captioner and CLIP still batch). A correctness rule
        (a result must not depend on the batch it was computed in), not a speed trick: it holds
        with or without a runtime.
        """
        return 1 if self.device.type == "cpu" and self.dtype != torch.float32 else max(count, 1)
