"""Loading weights into the target dtype without a second copy (freesegdiff.infra.weights).

The values are compared with each library's own conversion (``from_pretrained(dtype=...)``), the
memory is measured in fresh interpreters on a checkpoint of 170 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from freesegdiff.infra.hub import LoadOptions
from freesegdiff.infra.weights import (
    cast_in_place,
    checkpoint_mappings,
    float32_modules,
    load_model,
    release_pages,
)


def _same_state(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys()
    for key, value in other.items():
        assert mine[key].dtype == value.dtype, key
        assert torch.equal(mine[key], value), key


def _ties(model: torch.nn.Module) -> set[frozenset[str]]:
    """Groups of parameter names that share one tensor."""
    by_pointer: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_pointer.setdefault(parameter.data_ptr(), set()).add(name)
    return {frozenset(names) for names in by_pointer.values() if len(names) > 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unet_and_vae_equal_diffusers_own_conversion(
    tiny_sd_path: Path, dtype: torch.dtype
) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for loader, subfolder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        ours = load_model(
            loader.from_pretrained,
            str(tiny_sd_path),
            subfolder=subfolder,
            dtype=dtype,
            dtype_keyword="torch_dtype",
            what="SD",
            flag="--diffusion-model",
        )
        theirs = loader.from_pretrained(tiny_sd_path, subfolder=subfolder, torch_dtype=dtype)
        _same_state(ours, theirs)
        assert not any(p.requires_grad for p in ours.parameters())


def test_clip_and_blip_equal_transformers_own_conversion(
    tiny_clip_path: Path, tiny_blip_path: Path
) -> None:
    from transformers import BlipForConditionalGeneration, CLIPModel

    for loader, folder in (
        (CLIPModel, tiny_clip_path),
        (BlipForConditionalGeneration, tiny_blip_path),
    ):
        ours = load_model(
            loader.from_pretrained, str(folder), dtype=torch.bfloat16, what="x", flag="--x"
        )
        theirs = loader.from_pretrained(folder, dtype=torch.bfloat16)
        _same_state(ours, theirs)
        assert _ties(ours) == _ties(theirs)
        assert ours.config.dtype == torch.bfloat16
    assert _ties(ours), "the tiny BLIP ties its decoder's embeddings: the check must see a tie"


def test_blip2_keeps_transformers_float32_modules(tmp_path: Path) -> None:
    """In float16 transformers keeps BLIP-2's Q-Former and query tokens in float32; so do we."""
    from transformers import Blip2ForConditionalGeneration

    from freesegdiff.infra.tiny.captioner import build_blip2

    build_blip2(tmp_path)
    loader = Blip2ForConditionalGeneration.from_pretrained
    ours = load_model(loader, str(tmp_path), dtype=torch.float16, what="x", flag="--x")
    theirs = loader(tmp_path, dtype=torch.float16)
    _same_state(ours, theirs)
    assert ours.query_tokens.dtype == torch.float32
    assert ours.language_model.get_input_embeddings().weight.dtype == torch.float16
    assert float32_modules(ours, torch.bfloat16) == ()  # not strict: bfloat16 casts everything


def test_fp16_variant_loads_the_fp16_files(tmp_path: Path) -> None:
    """``variant="fp16"`` reads ``*.fp16.safetensors`` (stored float16, mapped as such) and casts
    from there; the float32 files are not read."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from freesegdiff.infra.tiny.diffusion import build_stable_diffusion

    build_stable_diffusion(tmp_path, seed=0)
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    unet.half().save_pretrained(tmp_path / "unet", variant="fp16")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # only the variant left
    ours = load_model(
        UNet2DConditionModel.from_pretrained,
        str(tmp_path),
        subfolder="unet",
        dtype=torch.bfloat16,
        dtype_keyword="torch_dtype",
        load=LoadOptions(variant="fp16"),
        what="SD",
        flag="--diffusion-model",
    )
    stored = load_file(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    state = ours.state_dict()
    assert all(value.dtype == torch.float16 for value in stored.values())
    for key, value in stored.items():
        assert torch.equal(state[key], value.to(torch.bfloat16)), key


def test_pages_of_a_file_mapping_are_released_and_read_again(tmp_path: Path) -> None:
    """The pages of a mapped checkpoint go back to the system; the bytes are read from the file
    again if anything still reads them. Memory outside checkpoint mappings is never touched."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the page release is Linux-only")
    values = torch.arange(4 * 2**20, dtype=torch.float32)  # 16 MB
    path = tmp_path / "weights.safetensors"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)
    assert torch.equal(mapped, values)  # every page read: resident
    mappings = checkpoint_mappings()
    assert any(low <= mapped.data_ptr() < high for low, high in mappings)
    assert release_pages(mapped, mappings)
    assert torch.equal(mapped, values)  # read from the file again
    anonymous = values.clone()
    assert not release_pages(anonymous, mappings)
    assert torch.equal(anonymous, values)


def test_cast_keeps_ties_and_integer_buffers() -> None:
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = torch.nn.Sequential(embedding, head)
    model.register_buffer("ids", torch.arange(5))
    cast_in_place(model, torch.bfloat16, torch.device("cpu"))
    assert model[0].weight is model[1].weight
    assert model[0].weight.dtype == torch.bfloat16 and model.ids.dtype == torch.int64


_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import CLIPTextModel
    from freesegdiff.infra.weights import load_model

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    folder, how = sys.argv[1], sys.argv[2]
    before = hwm()
    if how == "ours":
        load_model(CLIPTextModel.from_pretrained, folder, dtype=torch.bfloat16, what="x", flag="x")
    else:
        CLIPTextModel.from_pretrained(folder, dtype=torch.bfloat16)
    print(json.dumps({"growth": hwm() - before}))
    """
)


def test_loading_in_bfloat16_does_not_hold_the_float32_file(tmp_path: Path) -> None:
    """Peak growth while loading a 170 MB float32 checkpoint in bfloat16: transformers' own path
    holds the file's pages and the converted copy (about 1.5x the file); ours the converted
    weights and one tensor (about 0.5x)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM is Linux's")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=6
    )
    CLIPTextModel(config).save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    growth = {}
    for how in ("ours", "transformers"):
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(tmp_path), how],
            capture_output=True,
            text=True,
            check=True,
        )
        growth[how] = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    assert growth["transformers"] > 1.2 * size, (growth, size)  # the doubling is measurable
    assert growth["ours"] < 0.8 * size, (growth, size)
