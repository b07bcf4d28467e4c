"""Speed and memory tuning, all of it, switched on explicitly.

With every trick off the diffusers modules run as released and the process allocator is left as
the application set it: the same float32 values, only slower and with a higher peak on the CPU.
Every trick is bit-exact except channels-last, whose convolution kernels accumulate in another
order: in bfloat16 on the CPU (the only place :meth:`RuntimeOptions.fast` uses it) the features
move by about as much as bfloat16 itself moves them from float32 (tests/test_runtime.py). What
each trick gains was measured; the figures are in ``benchmarks/RESULTS.md`` ("Runtime tuning"),
not here.

The tricks (fields of :class:`RuntimeOptions`):

- ``allocator``: glibc's trim threshold is fixed before the models are loaded
  (:func:`tune_process`), so that their weights get their own mappings rather than interleaving
  with short-lived blocks in the heap, and the heap's free blocks (copies left behind by dtype
  and layout conversions, freed modules) are returned to the system after loading
  (:func:`after_loading`). Process-wide: which is why it is never done without being asked.
- ``inplace_resnets``: every plain diffusers ``ResnetBlock2D`` of the VAE and UNet runs an
  inference forward that reuses its own buffers (:func:`use_inplace_resnets`): the same
  operations in the same order, so the same values bit for bit.
- ``channels_last``: the VAE and UNet convolutions and the VAE input laid out channels-last;
  None: where that pays, bfloat16 on the CPU (oneDNN's bfloat16 convolutions).
- ``heap_buffers``: on the CPU, the VAE encoder's large activations come from the heap rather
  than a fresh ``mmap`` each (:func:`vae_buffers`), except on the first encode at an input shape.
- ``beam_cross_cache``: BLIP's beam search keeps one cross-attention key/value cache that it
  does not reorder after every step (:func:`beam_search_cache`). transformers reorders the
  whole cache by the chosen beams; but beams only ever come from the beams of the same image,
  whose cross-attention keys and values (of that image's embeddings, repeated per beam) are
  identical, so that reorder copies 2 x 12 tensors of 577 tokens per step to change nothing.
  The same tokens bit for bit (tests/test_runtime.py). Only used with ``fast_captioner`` off.
- ``fast_captioner``: BLIP's text decoder runs a forward of our own during ``generate``
  (:mod:`freesegdiff.infra.fast_captioner`): weights packed once for oneDNN's few-row kernel on the
  CPU, the image's cross-attention keys and values once per image instead of per beam, a static
  self-attention cache. transformers' beam search is unchanged; the logits agree to float32
  rounding and the tokens are the same (tests/infra/test_fast_captioner.py). Costs a packed copy of
  the decoder's weights on the CPU (about 0.5 GB in float32 for BLIP base).
- ``crf_processes``: the pydensecrf refinement (the released CRF, one per kept mask, in C++ that
  holds Python's lock) runs its masks side by side in that many worker processes
  (:class:`WorkerProcesses`, started on first use; each imports numpy and pydensecrf only,
  about 60 MB). The same calls, so the same masks. None: one per CPU this process may use
  (:func:`usable_cpus`: its CPU affinity, or the CPUs a Ray actor was given), less
  ``model_cpus`` (None: one on CUDA, none on the CPU). Calls from several threads share the
  workers (a streamed run refines several images at once).
- ``stream``: ``segment`` on folders, ``eval``, ``ablate`` and the Ray actors stream their
  batches through the stage groups (:mod:`freesegdiff.infra.stream`,
  :meth:`~freesegdiff.pipeline.FreeSegDiff.iter_segment`): the serial path's batches and
  results, byte for byte, with the groups of different batches overlapped. None: where the
  compute groups overlap (``overlap``). With ``allocator``, every thread allocates from the main
  heap (:func:`~freesegdiff.infra.memory.single_arena`, set by :func:`tune_process`): in a
  thread's own glibc arena the diffusion features took twice as long.
- ``overlap``: in a streamed run, the compute groups (caption, features, naming, refinement)
  each in a thread of their own, and images refined side by side in the CRF pool. None: on
  CUDA only; on the CPU the models' kernels already use every core, and the CRF processes beside
  them made a 2-core run 20 % slower, so there steps 1-12 run in one thread and only reading,
  composition and writing overlap them.

Use::

    options = RuntimeOptions.fast()
    tune_process(options)  # before loading anything
    features = DiffusionFeatures.from_pretrained(..., runtime=options)
    after_loading(options)  # once every model is built

or tune an already built :class:`~freesegdiff.stages.features.diffusion.DiffusionFeatures` with
:func:`tune_models`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from freesegdiff.infra import memory

if TYPE_CHECKING:
    from freesegdiff.stages.captioner import Captioner
    from freesegdiff.stages.features.diffusion import DiffusionFeatures

# VAE input shapes each tuned DiffusionFeatures has encoded once (see vae_buffers).
_encoded_shapes: weakref.WeakKeyDictionary[Any, set[tuple[int, ...]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RuntimeOptions:
    """Which speed and memory tricks to use; every one is on by default (:meth:`fast`).

    Also the hook :class:`~freesegdiff.stages.features.diffusion.DiffusionFeatures` calls when
    given one as ``runtime`` (:meth:`tune_models`, :meth:`vae_input`, :meth:`vae_buffers`).
    """

    allocator: bool = True  # retain freed memory before loading, trim it after
    inplace_resnets: bool = True  # ResnetBlock2D forwards that reuse their buffers
    channels_last: bool | None = None  # None: where it pays (bfloat16 on the CPU)
    heap_buffers: bool = True  # VAE activations from the heap on the CPU
    beam_cross_cache: bool = True  # BLIP beam search without reordering the image's keys
    fast_captioner: bool = True  # BLIP's decoder steps at their memory floor (fast_captioner.py)
    crf_processes: int | None = None  # pydensecrf worker processes; None: see crf_pool
    stream: bool | None = None  # runs streamed (infra/stream.py); None: where groups overlap
    overlap: bool | None = None  # streamed compute groups side by side; None: on CUDA only
    model_cpus: int | None = None  # CPUs kept for the model groups; None: 1 on CUDA, 0 on CPU

    @classmethod
    def fast(cls) -> RuntimeOptions:
        """Every trick on (channels-last where it pays): what the CLI and the bench use."""
        return cls()

    @classmethod
    def off(cls) -> RuntimeOptions:
        """Every trick off: the same as giving no runtime at all."""
        return cls(
            allocator=False,
            inplace_resnets=False,
            channels_last=False,
            heap_buffers=False,
            beam_cross_cache=False,
            fast_captioner=False,
            crf_processes=0,
            stream=False,
        )

    def uses_channels_last(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the VAE and UNet are laid out channels-last for ``device`` and ``dtype``."""
        if self.channels_last is None:
            return channels_last_pays(device, dtype)
        return self.channels_last

    def generate_options(self) -> Callable[[Any, int], dict[str, Any]] | None:
        """What a captioner built with these options adds to each ``generate`` call
        (``fast_captioner``: :func:`~freesegdiff.infra.fast_captioner.decoder_cache`, else
        ``beam_cross_cache``: :func:`beam_search_cache`), or None."""
        if self.fast_captioner:
            from freesegdiff.infra.fast_captioner import decoder_cache

            return decoder_cache
        return beam_search_cache if self.beam_cross_cache else None

    def streams(self, device: torch.device | str) -> bool:
        """Whether folder, eval and ablate runs on ``device`` are streamed (``stream``; None:
        where the compute groups overlap, :meth:`overlaps`: on the 2-core CPU a stream with one
        compute thread measured 0.76x the serial run)."""
        if self.stream is None:
            return self.overlaps(device)
        return self.stream

    def overlaps(self, device: torch.device | str) -> bool:
        """Whether a streamed run on ``device`` runs its compute groups side by side
        (``overlap``; None: on CUDA, where the models leave the CPU's cores to the CRF)."""
        if self.overlap is None:
            return torch.device(device).type == "cuda"
        return self.overlap

    def crf_pool(self, device: torch.device | str = "cpu") -> WorkerProcesses | None:
        """The worker processes a refiner with the released CRF runs its masks in, or None for
        fewer than two.

        ``crf_processes``; None: the CPUs this process may use (:func:`usable_cpus`: its
        affinity, or a Ray actor's share) minus those kept for the model groups
        (``model_cpus``; None: one on CUDA, whose thread launches the GPU's work, none on the
        CPU, where the refinement overlaps the models only in streamed runs)."""
        processes = self.crf_processes
        if processes is None:
            kept = self.model_cpus
            if kept is None:
                kept = 1 if torch.device(device).type == "cuda" else 0
            processes = usable_cpus() - kept
        return WorkerProcesses(processes) if processes > 1 else None

    # The hook DiffusionFeatures calls (freesegdiff.stages.features.diffusion.FeatureRuntime).
    def tune_models(self, features: DiffusionFeatures) -> None:
        """:func:`tune_models` with these options."""
        tune_models(features, self)

    def vae_input(self, features: DiffusionFeatures, pixels: torch.Tensor) -> torch.Tensor:
        """:func:`vae_input` with these options."""
        return vae_input(features, pixels, self)

    def vae_buffers(
        self, features: DiffusionFeatures, pixels: torch.Tensor
    ) -> contextlib.AbstractContextManager[None]:
        """:func:`vae_buffers` with these options."""
        return vae_buffers(features, pixels, self)


_CPU_SHARE: list[int] = []  # set by a Ray actor: the CPUs Ray gave it


def share_cpus(cpus: int | None) -> None:
    """Tell this process it has ``cpus`` CPUs of its machine to itself (a Ray actor given
    ``num_cpus``; freesegdiff.distributed calls it); None: forget it."""
    _CPU_SHARE.clear()
    if cpus is not None:
        _CPU_SHARE.append(max(1, int(cpus)))


def usable_cpus() -> int:
    """The CPUs this process may use: its share (:func:`share_cpus`), else its CPU affinity
    (``taskset``, a container's cpuset), else every CPU of the machine."""
    if _CPU_SHARE:
        return _CPU_SHARE[0]
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def channels_last_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the VAE and UNet convolutions run faster channels-last: bfloat16 on the CPU."""
    return device.type == "cpu" and dtype == torch.bfloat16


# ------------------------------------------------------------------------------ process
def tune_process(options: RuntimeOptions) -> None:
    """Before loading any model: keep freed memory at the top of the heap (``allocator``).

    Also fixes glibc's threshold for serving a block by ``mmap`` (it otherwise grows with the
    largest block freed), so weights loaded afterwards get their own mappings, and makes every
    thread started from now on allocate from the main heap (:func:`memory.single_arena`: the
    reader, a stream's groups). That must come before those threads exist: glibc hands a new
    thread the arena of one that ended before any other, whatever the limit says then.
    Process-wide; a no-op off glibc.
    """
    if options.allocator:
        memory.fix_trim_threshold()
        memory.single_arena()


def after_loading(options: RuntimeOptions) -> bool:
    """Once the models are built: return the heap's free blocks to the system (``allocator``).

    Returns True if anything was returned.
    """
    return memory.return_freed_memory() if options.allocator else False


# ------------------------------------------------------------------------------- models
def tune_models(features: DiffusionFeatures, options: RuntimeOptions) -> None:
    """Tune a built :class:`~freesegdiff.stages.features.diffusion.DiffusionFeatures`, and make
    it call ``options``.

    In-place ResNet forwards and the channels-last layout on its VAE and UNet, as ``options``
    asks; from then on its VAE encodes go through :func:`vae_input` and :func:`vae_buffers`.
    What ``DiffusionFeatures(..., runtime=options)`` does when it is built; calling it again
    changes nothing more.
    """
    if options.uses_channels_last(features.device, features.dtype):
        features.vae.to(memory_format=torch.channels_last)
        features.unet.to(memory_format=torch.channels_last)
    if options.inplace_resnets:
        use_inplace_resnets(features.vae)
        use_inplace_resnets(features.unet)
    features.runtime = options


def vae_input(
    features: DiffusionFeatures, pixels: torch.Tensor, options: RuntimeOptions
) -> torch.Tensor:
    """``pixels`` laid out as the tuned VAE wants them (channels-last when its weights are)."""
    if options.uses_channels_last(features.device, features.dtype):
        return pixels.contiguous(memory_format=torch.channels_last)
    return pixels


@contextlib.contextmanager
def vae_buffers(
    features: DiffusionFeatures, pixels: torch.Tensor, options: RuntimeOptions
) -> Iterator[None]:
    """Wraps one VAE encode of ``pixels``: its large activations from the heap (``heap_buffers``).

    On the CPU only, and not on the first encode at a shape: that call's one-off allocations
    (oneDNN's kernels for the shape) would stay pinned inside the heap region and fragment it.
    A no-op unless ``options.heap_buffers``.
    """
    if not options.heap_buffers or features.device.type != "cpu":
        yield
        return
    seen = _encoded_shapes.setdefault(features, set())
    shape = tuple(pixels.shape)
    if shape not in seen:
        seen.add(shape)
        yield
        return
    with memory.large_buffers_from_heap():
        yield


# -------------------------------------------------------------------- in-place ResNets
def _inplace_resnet_forward(block: Any) -> Any:
    """An inference forward for a diffusers ``ResnetBlock2D`` that reuses its own buffers.

    The same operations as ``ResnetBlock2D.forward`` in the same order, so the same values bit
    for bit, but the SiLUs act in place on the fresh group-norm outputs, the time embedding and
    the shortcut are added in place to the fresh convolution outputs, and the division by an
    ``output_scale_factor`` of 1 is skipped: four fewer activation-sized buffers per block.
    With gradients on, or extra arguments, the block's own forward runs.
    """
    original = block.forward

    def forward(input_tensor: torch.Tensor, temb: Any = None, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() or args or kwargs:
            return original(input_tensor, temb, *args, **kwargs)
        hidden = F.silu(block.norm1(input_tensor), inplace=True)
        hidden = block.conv1(hidden)
        if block.time_emb_proj is not None:
            if not block.skip_time_act:
                temb = F.silu(temb)  # not in place: one embedding feeds every block
            hidden.add_(block.time_emb_proj(temb)[:, :, None, None])
        hidden = F.silu(block.norm2(hidden), inplace=True)
        hidden = block.conv2(block.dropout(hidden))
        shortcut = (
            input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
        )
        hidden.add_(shortcut)
        if block.output_scale_factor != 1.0:
            hidden.div_(block.output_scale_factor)
        return hidden

    return forward


def use_inplace_resnets(model: torch.nn.Module) -> int:
    """Give every plain ``ResnetBlock2D`` of ``model`` the in-place inference forward.

    Plain: no up- or down-sampling inside the block, the default time-embedding merge and a
    SiLU nonlinearity (every block of the SD 1.x VAE and UNet). A block whose forward was
    already replaced (by this or anything else) is left alone. Returns how many were changed.
    """
    from diffusers.models.resnet import ResnetBlock2D

    changed = 0
    for module in model.modules():
        if (
            type(module) is ResnetBlock2D
            and "forward" not in vars(module)
            and module.upsample is None
            and module.downsample is None
            and module.time_embedding_norm == "default"
            and isinstance(module.nonlinearity, torch.nn.SiLU)
            and isinstance(module.dropout, torch.nn.Dropout)
        ):
            module.forward = _inplace_resnet_forward(module)
            changed += 1
    return changed


# ------------------------------------------------------------------------ beam search
def beam_search_cache(captioner: Captioner, batch: int) -> dict[str, Any]:
    """Generate keywords for one batch of ``batch`` images: for BLIP with beams, a key/value
    cache whose cross-attention half is not reordered between steps (``beam_cross_cache``).

    Exact: transformers' beam search picks each image's next beams among that image's beams
    only, and the cross-attention keys and values of one image are the same for all its beams
    (computed from its embeddings repeated per beam), so reordering them changes no value.
    Nothing for BLIP-2 (its OPT decoder has no cross-attention) or greedy decoding.
    """
    if captioner.kind != "blip" or captioner.config.num_beams < 2:
        return {}
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    class _SharedCrossAttentionCache(EncoderDecoderCache):
        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    from freesegdiff.infra.fast_captioner import cache_keyword

    config = captioner.model.config.text_config
    cache = _SharedCrossAttentionCache(DynamicCache(config=config), DynamicCache(config=config))
    return {cache_keyword(captioner.model.text_decoder): cache}


# ----------------------------------------------------------------------- worker processes
class WorkerProcesses:
    """Worker processes for CPU-bound calls that hold Python's lock (pydensecrf's inference).

    Each worker is ``python -m freesegdiff.infra.workers`` (:mod:`freesegdiff.infra.workers`),
    started on the first :meth:`map` with this interpreter and this package on its path; it
    imports only what the calls need (numpy and pydensecrf: about 60 MB each) and never the
    parent's ``__main__``. Calls go to idle workers one at a time, so a large reply never waits on a
    large request. Several threads may call :meth:`map` at once: they share the workers, each
    call taking a worker as one comes free (a streamed run refines several images so). Should a
    worker die or a call fail there, that call and every later one run in the calling process (a
    genuine error is raised from there): slower, never lost. POSIX only; elsewhere every call
    runs in the calling process.
    """

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._workers: list[subprocess.Popen[bytes]] = []
        self._idle: queue.Queue[subprocess.Popen[bytes]] = queue.Queue()
        self._lock = threading.Lock()
        self._broken = os.name != "posix"
        weakref.finalize(self, _stop_workers, self._workers)

    def map(self, function: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        """``[function(*items) for items in zip(*iterables)]``, in the workers, in order.

        ``function`` must be importable by name (a module-level function)."""
        calls = list(zip(*iterables, strict=True))
        if not self._broken and len(calls) > 1:
            try:
                return self._run(function, calls)
            except (OSError, EOFError, ValueError, pickle.PickleError, _WorkerFailed):
                self._broken = True
                self.close()
        return [function(*arguments) for arguments in calls]

    def _run(self, function: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        import select

        self._start()
        results: list[Any] = [None] * len(calls)
        sent = 0
        busy: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            while sent < len(calls) or busy:
                # take idle workers for the calls not yet sent; wait for one only when none of
                # this call's is busy (another thread holds them all)
                while sent < len(calls):
                    try:
                        worker = self._idle.get(block=not busy, timeout=None if busy else 1.0)
                    except queue.Empty:
                        if busy or self._broken:
                            break
                        continue
                    assert worker.stdin is not None and worker.stdout is not None
                    pickle.dump(
                        (function, calls[sent]), worker.stdin, protocol=pickle.HIGHEST_PROTOCOL
                    )
                    worker.stdin.flush()
                    busy[worker.stdout.fileno()] = (worker, sent)
                    sent += 1
                if self._broken and not busy:
                    raise _WorkerFailed("the workers were stopped")
                if not busy:
                    continue
                # wake now and then to take workers other threads give back
                timeout = 0.05 if sent < len(calls) else None
                ready, _, _ = select.select(list(busy), [], [], timeout)
                for descriptor in ready:
                    worker, index = busy.pop(descriptor)
                    assert worker.stdout is not None
                    status, value = pickle.load(worker.stdout)
                    self._idle.put(worker)
                    if status != "ok":
                        raise _WorkerFailed(value)
                    results[index] = value
        except BaseException:
            for worker, _ in busy.values():  # mid-call: its reply would confuse the next caller
                worker.kill()
            raise
        return results

    def _start(self) -> None:
        import freesegdiff

        with self._lock:
            dead = [worker for worker in self._workers if worker.poll() is not None]
            if dead:  # killed from outside: replaced, and no longer handed out
                self._workers[:] = [worker for worker in self._workers if worker not in dead]
                idle = []
                while not self._idle.empty():
                    idle.append(self._idle.get_nowait())
                for worker in idle:
                    if worker not in dead:
                        self._idle.put(worker)
            if len(self._workers) >= self.processes:
                return
            package_root = os.path.dirname(os.path.dirname(os.path.abspath(freesegdiff.__file__)))
            environment = dict(os.environ)
            path = environment.get("PYTHONPATH")
            environment["PYTHONPATH"] = package_root + (os.pathsep + path if path else "")
            while len(self._workers) < self.processes:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "freesegdiff.infra.workers"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=environment,
                )
                self._workers.append(worker)
                self._idle.put(worker)

    def close(self) -> None:
        """Stop the workers (they are started again on the next :meth:`map`)."""
        with self._lock:
            _stop_workers(self._workers)
            self._idle = queue.Queue()


class _WorkerFailed(Exception):
    """A call raised in a worker (it is run again in the parent, to raise it there)."""


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.stdin is not None:
            with contextlib.suppress(OSError):
                worker.stdin.close()  # the worker's input ends: it returns
    for worker in workers:
        try:
            worker.wait(timeout=2)
        except subprocess.TimeoutExpired:
            worker.kill()
        if worker.stdout is not None:
            worker.stdout.close()
    workers.clear()
