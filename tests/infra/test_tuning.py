"""The speed and memory tuning (freesegdiff.infra.tuning): opt-in, and the same features with it.

Every trick but channels-last is bit-exact in both precisions. Channels-last runs other
convolution kernels, which accumulate in another order: in float32 that moves the features by
~4e-5 of their scale (so ``RuntimeOptions.fast()`` leaves float32 in the default layout, where
channels-last is no faster); in bfloat16, where it is on, by ~1.3 % (relative L2), as much as
bfloat16 itself moves them from float32, and no further from float32 than the default layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from freesegdiff.config import FeatureConfig
from freesegdiff.infra import memory
from freesegdiff.infra import tuning as runtime
from freesegdiff.infra.tuning import RuntimeOptions, tune_models, use_inplace_resnets
from freesegdiff.stages.features.diffusion import DiffusionFeatures

CPU = torch.device("cpu")


def build(path, dtype=torch.float32, options: RuntimeOptions | None = None) -> DiffusionFeatures:
    return DiffusionFeatures.from_pretrained(
        str(path), config=FeatureConfig(image_size=256), device=CPU, dtype=dtype, runtime=options
    )


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def images(photos):
    return [photos["chelsea"], photos["coffee"], photos["astronaut"]]


@pytest.fixture(scope="module")
def plain(tiny_sd_path, images) -> dict[torch.dtype, torch.Tensor]:
    """Features of the untuned models, in each precision."""
    dtypes = (torch.float32, torch.bfloat16)
    return {dtype: build(tiny_sd_path, dtype)(images, seed=0) for dtype in dtypes}


@pytest.fixture
def heap_calls(monkeypatch) -> list[int]:
    """Counts the VAE encodes run with their buffers from the heap."""
    calls: list[int] = []
    real = memory.large_buffers_from_heap

    def recording():
        calls.append(1)
        return real()

    monkeypatch.setattr(memory, "large_buffers_from_heap", recording)
    return calls


def test_every_trick_gives_the_same_float32_features_bit_for_bit(
    tiny_sd_path, images, plain, heap_calls
):
    fast = build(tiny_sd_path, options=RuntimeOptions.fast())
    assert fast.runtime == RuntimeOptions.fast()
    assert not fast.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    patched = [block for block in fast.unet.modules() if "forward" in vars(block)]
    assert len(patched) == 22  # the tiny UNet's ResNet blocks run the in-place forward
    first = fast(images, seed=0)  # the first encode at this shape: fresh mappings
    assert heap_calls == []
    again = fast(images, seed=0)  # from the heap from now on
    assert heap_calls == [1]
    assert torch.equal(first, plain[torch.float32])
    assert torch.equal(again, plain[torch.float32])


def test_without_a_runtime_the_modules_run_as_diffusers_releases_them(tiny_sd_path, heap_calls):
    features = build(tiny_sd_path)
    assert features.runtime is None
    assert not [block for block in features.unet.modules() if "forward" in vars(block)]
    features([np.zeros((64, 64, 3), np.uint8)] * 2)
    features([np.zeros((64, 64, 3), np.uint8)] * 2)
    assert heap_calls == []


def test_every_trick_off_is_no_runtime(tiny_sd_path, images, plain, heap_calls):
    off = build(tiny_sd_path, options=RuntimeOptions.off())
    assert not [block for block in off.unet.modules() if "forward" in vars(block)]
    assert torch.equal(off(images, seed=0), plain[torch.float32])
    assert torch.equal(off(images, seed=0), plain[torch.float32])
    assert heap_calls == []


def test_bfloat16_features_are_bit_exact_with_every_trick_but_channels_last(
    tiny_sd_path, images, plain
):
    tuned = build(tiny_sd_path, torch.bfloat16, RuntimeOptions(channels_last=False))
    assert torch.equal(tuned(images, seed=0), plain[torch.bfloat16])
    assert torch.equal(tuned(images, seed=0), plain[torch.bfloat16])


def test_channels_last_rounds_bfloat16_within_bfloat16_error(tiny_sd_path, images, plain):
    """``fast()`` is channels-last in bfloat16 on the CPU: other kernels, other rounding."""
    fast = build(tiny_sd_path, torch.bfloat16, RuntimeOptions.fast())
    assert fast.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    tuned = fast(images, seed=0)
    assert torch.equal(fast(images, seed=0), tuned)  # deterministic
    reference, untuned = plain[torch.float32], plain[torch.bfloat16]
    # measured: 1.3 % against each other, 1.26 % (untuned) and 1.27 % (tuned) from float32
    assert relative(tuned, untuned) < 0.03
    assert relative(tuned, reference) < 0.03
    assert relative(tuned, reference) < 1.2 * relative(untuned, reference)


def test_channels_last_in_float32_is_close_but_not_bit_exact(tiny_sd_path, images, plain):
    """Why ``fast()`` keeps float32 in the default layout (where it was no faster either)."""
    forced = build(tiny_sd_path, options=RuntimeOptions(channels_last=True))(images, seed=0)
    reference = plain[torch.float32]
    scale = float(reference.abs().max())
    assert torch.allclose(forced, reference, rtol=0, atol=2e-4 * scale)  # measured: 3.6e-5


def test_tuning_a_built_extractor_is_what_building_it_tuned_does(tiny_sd_path, images, plain):
    features = build(tiny_sd_path)
    features.release_unused()  # as a pipeline has done before the segment CLI tunes it
    options = RuntimeOptions.fast()
    tune_models(features, options)
    assert features.runtime is options
    assert use_inplace_resnets(features.unet) == 0  # already tuned: nothing is wrapped twice
    tune_models(features, options)
    assert torch.equal(features(images, seed=0), plain[torch.float32])


def test_inplace_resnets_give_the_same_values_bit_for_bit(tiny_sd_path):
    from diffusers.models.resnet import ResnetBlock2D

    extractor = build(tiny_sd_path, options=RuntimeOptions.fast())
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for model in (extractor.vae.encoder, extractor.unet):  # what the features run
        for block in model.modules():
            if not isinstance(block, ResnetBlock2D):
                continue
            assert "forward" in vars(block)  # every block has the in-place forward
            x = torch.randn(2, block.norm1.num_channels, 8, 8, generator=generator)
            temb = None
            if block.time_emb_proj is not None:
                temb = torch.randn(2, block.time_emb_proj.in_features, generator=generator)
            with torch.inference_mode():
                fast = block(x, temb)
                plain = ResnetBlock2D.forward(block, x, temb)
            assert torch.equal(fast, plain)
            checked += 1
    assert checked == 6 + 22  # tiny SD: the VAE encoder's and the UNet's ResNet blocks


class RecordingLibc:
    """Stands in for glibc: records every allocator call instead of making it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def mallopt(self, *args: int) -> int:
        self.calls.append("mallopt")
        return 1

    def malloc_trim(self, *args: int) -> int:
        self.calls.append("malloc_trim")
        return 0


def test_the_allocator_is_changed_only_when_asked(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    runtime.tune_process(RuntimeOptions(allocator=False))
    assert runtime.after_loading(RuntimeOptions(allocator=False)) is False
    assert libc.calls == []
    runtime.tune_process(RuntimeOptions.fast())
    runtime.after_loading(RuntimeOptions.fast())
    assert libc.calls == ["mallopt", "mallopt", "malloc_trim"]  # trim threshold, arenas; trim


# Run in a fresh interpreter: glibc stood in for by a recorder before anything is imported.
ALLOCATOR_SCRIPT = """
import json
from importlib import resources

from freesegdiff.infra import memory

calls = []


class Recorder:
    def mallopt(self, *args):
        calls.append(["mallopt", *args])
        return 1

    def malloc_trim(self, *args):
        calls.append(["malloc_trim", *args])
        return 0


memory._libc = lambda: Recorder()
import freesegdiff

pipe = freesegdiff.FreeSegDiff.from_preset("tiny")
pipe(str(resources.files("freesegdiff") / "data" / "examples" / "cat.jpg"))
pipeline_calls = list(calls)
from freesegdiff.infra.tuning import RuntimeOptions, after_loading, tune_process

tune_process(RuntimeOptions.fast())  # the control: the recorder does see the runtime's calls
after_loading(RuntimeOptions.fast())
print(json.dumps({"pipeline": pipeline_calls, "runtime": calls[len(pipeline_calls):]}))
"""


def test_building_and_running_a_pipeline_leaves_the_process_allocator_alone():
    """``FreeSegDiff.from_preset('tiny')`` and a segmentation make no ``mallopt`` or
    ``malloc_trim`` call: an application that builds a pipeline keeps its allocator."""
    done = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["pipeline"] == []
    assert [call[0] for call in seen["runtime"]] == ["mallopt", "mallopt", "malloc_trim"]
    assert seen["runtime"][1] == ["mallopt", -8, 1]  # M_ARENA_MAX = 1: one heap for all threads


def test_the_bench_tunes_by_default_and_can_run_untuned():
    from freesegdiff.bench.runner import BenchSettings, run_bench

    assert BenchSettings().runtime == RuntimeOptions.fast()
    report = run_bench(BenchSettings(preset="tiny", images=1, size=(64, 48), runtime=None))
    assert report.settings["runtime"] is None
    assert report.seconds_per_image > 0


@pytest.mark.parametrize("flags", [[], ["--no-runtime-tuning"]])
def test_the_segment_command_tunes_unless_told_not_to(flags, tmp_path, photos, monkeypatch):
    from PIL import Image

    from freesegdiff.cli import common, main

    built = []
    build = common.pipeline_from_args
    monkeypatch.setattr(
        "freesegdiff.cli.common.pipeline_from_args",
        lambda args, runtime=None: built.append(build(args, runtime)) or built[-1],
    )
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    photo = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(photo)
    args = ["segment", str(photo), "-o", str(tmp_path / "out"), "--preset", "tiny"]
    assert main([*args, "--no-progress", *flags]) == 0
    (pipe,) = built
    if flags:
        assert pipe.features.runtime is None
        assert libc.calls == []
    else:
        assert pipe.features.runtime == RuntimeOptions.fast()
        assert libc.calls[:1] == ["mallopt"] and "malloc_trim" in libc.calls


def test_beam_search_without_reordering_the_image_keys_gives_the_same_tokens(
    tiny_blip_path, photos
):
    """``beam_cross_cache``: the same token ids as transformers' own beam search, for several
    images (beams must never be mixed across images), with the reorder of the cross-attention
    cache gone (counted: half the index_select calls, the self-attention ones)."""
    from freesegdiff.config import CaptionConfig
    from freesegdiff.stages.captioner import Captioner

    config = CaptionConfig(num_beams=3, max_length=14, min_length=14)
    captioner = Captioner.from_pretrained(str(tiny_blip_path), config=config)
    inputs = captioner.inputs([photos["chelsea"], photos["astronaut"], photos["coffee"]])
    reorders: list[int] = []
    original = torch.Tensor.index_select

    def counting(self, *args, **kwargs):
        reorders.append(1)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "index_select", counting)
        plain = captioner.generate(inputs)
        plain_reorders = len(reorders)
        # the same model, built with the tuning
        fast = Captioner(
            captioner.model,
            captioner.processor,
            config=config,
            runtime=RuntimeOptions(fast_captioner=False),  # this trick alone
        )
        reorders.clear()
        tuned = fast.generate(inputs)
    assert torch.equal(tuned, plain)
    # per step and layer: self-attention keys and values only, not the cross-attention ones too
    assert plain_reorders > 0 and len(reorders) * 2 == plain_reorders, (
        len(reorders),
        plain_reorders,
    )
    assert runtime.beam_search_cache(captioner, 3)
    greedy = Captioner.from_pretrained(
        str(tiny_blip_path), config=CaptionConfig(num_beams=1, max_length=14)
    )
    assert runtime.beam_search_cache(greedy, 3) == {}  # nothing to share without beams


def test_crf_processes_give_the_masks_of_the_serial_crf_and_survive_a_killed_worker(photos):
    """``crf_processes``: the released CRF of each mask in worker processes, the same masks;
    killed workers are replaced; a call that fails in a worker is run here and raises here."""
    pytest.importorskip("pydensecrf")
    from freesegdiff.stages.refine.densecrf_reference import pydensecrf_refine

    image = np.ascontiguousarray(photos["chelsea"][::2, ::2])
    height, width = image.shape[:2]
    masks = np.zeros((3, height, width), dtype=bool)
    masks[0, : height // 2] = True
    masks[1, :, : width // 3] = True
    masks[2, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
    serial = pydensecrf_refine(image, masks)
    assert (serial != masks).any()  # the CRF moved the blocky masks
    pool = runtime.WorkerProcesses(2)
    try:
        assert np.array_equal(pydensecrf_refine(image, masks, pool=pool), serial)
        assert len(pool._workers) == 2
        killed = {process.pid for process in pool._workers}
        for process in pool._workers:
            process.kill()
            process.wait()
        assert np.array_equal(pydensecrf_refine(image, masks, pool=pool), serial)
        assert not killed & {process.pid for process in pool._workers}  # new workers
        assert pool.map(int, ["1", "2", "3"]) == [1, 2, 3]
        with pytest.raises(ValueError, match="invalid literal"):
            pool.map(int, ["1", "x"])  # failed in a worker, run again here: the real error
        assert pool._broken and pool.map(int, ["4", "5"]) == [4, 5]
    finally:
        pool.close()


def test_the_refiner_gets_crf_processes_only_for_pydensecrf():
    from freesegdiff.config import RefineConfig
    from freesegdiff.stages.refine import Refiner

    options = RuntimeOptions(crf_processes=2)  # given when the stage is built
    released = Refiner(RefineConfig(backend="pydensecrf"), runtime=options)
    torch_crf = Refiner(RefineConfig(backend="torch"), runtime=options)
    assert isinstance(released.pool, runtime.WorkerProcesses) and torch_crf.pool is None
    released.pool.close()
    single = Refiner(RefineConfig(backend="pydensecrf"), runtime=RuntimeOptions(crf_processes=1))
    assert single.pool is None and Refiner(RefineConfig()).pool is None  # untuned


def test_resnet_features_are_untouched_by_the_inplace_resnets(tiny_sd_path, images):
    """features.kind "resnet" hooks the blocks the runtime rewrites: their outputs stay exact."""
    config = FeatureConfig(image_size=256, kind="resnet", resolutions=(8, 16))
    make = partial(DiffusionFeatures.from_pretrained, str(tiny_sd_path), config=config, device=CPU)
    tuned = make(runtime=RuntimeOptions.fast())
    assert any("forward" in vars(block) for block in tuned.unet.modules())
    assert torch.equal(tuned(images, seed=0), make()(images, seed=0))


def test_the_crf_pool_is_sized_from_the_cpus_this_process_may_use(monkeypatch):
    """One worker per CPU of the process's share (a Ray actor's num_cpus), else of its CPU
    affinity, less the CPUs kept for the model groups (one on CUDA by default); none for a
    single CPU (the masks then run in the process)."""
    from types import SimpleNamespace

    from freesegdiff import distributed
    from freesegdiff.infra import tuning

    try:
        tuning.share_cpus(3)
        assert tuning.usable_cpus() == 3 and RuntimeOptions().crf_pool().processes == 3
        tuning.share_cpus(1)
        assert RuntimeOptions().crf_pool() is None
        tuning.share_cpus(16)
        assert RuntimeOptions().crf_pool().processes == 16  # the models have the CPU too
        assert RuntimeOptions().crf_pool("cuda").processes == 15  # one launches GPU work
        assert RuntimeOptions(model_cpus=4).crf_pool("cuda").processes == 12
        assert RuntimeOptions(crf_processes=2).crf_pool().processes == 2  # asked for: as asked
        # in a Ray actor: what Ray assigned to it, not the node's CPUs
        assigned = {"CPU": 2.0}
        context = SimpleNamespace(get_assigned_resources=lambda: assigned)
        fake_ray = SimpleNamespace(get_runtime_context=lambda: context)
        monkeypatch.setitem(sys.modules, "ray", fake_ray)
        assert distributed.share_actor_cpus() == 2 and tuning.usable_cpus() == 2
        assigned = {"GPU": 1.0}  # a GPU actor: no CPU share, the process's affinity again
        assert distributed.share_actor_cpus() is None
    finally:
        tuning.share_cpus(None)
    child = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from freesegdiff.infra.tuning import usable_cpus; print(usable_cpus())"
    )
    if hasattr(os, "sched_setaffinity"):
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
        assert done.stdout.strip() == "1", done.stderr


def test_worker_processes_serve_several_threads_at_once():
    """Three threads map at once over two workers (a streamed run refining three images): each
    gets its own results in order, and the workers were shared, not broken."""
    import threading

    pool = runtime.WorkerProcesses(2)
    results: dict[int, list[int]] = {}

    def run(key: int) -> None:
        results[key] = pool.map(int, [str(key * 100 + n) for n in range(25)])

    try:
        threads = [threading.Thread(target=run, args=(key,)) for key in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert results == {key: [key * 100 + n for n in range(25)] for key in range(3)}
        assert not pool._broken and len(pool._workers) == 2
    finally:
        pool.close()
