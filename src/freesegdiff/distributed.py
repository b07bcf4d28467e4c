"""Runs past one process: the pipeline in a pool of Ray actors over Ray Data (the ``[ray]`` extra).

``freesegdiff segment ... --ray [ADDRESS]`` and ``freesegdiff eval ... --ray [ADDRESS]`` hand
their work items (one per image) to :func:`map_on_actors`: a Ray Data dataset of the items, a
``map`` stage of CPU tasks that read each image file's bytes, then one ``map_batches`` stage
over a pool of actors that each build their worker once (the models load once per actor) and
call it on batches of items, decoding the bytes exactly as a local run decodes the file
(:class:`~freesegdiff.io.images.EncodedImage`). One actor per GPU where the cluster has GPUs,
``RayOptions.actors`` CPU actors otherwise. An actor that dies is replaced (its models load
again) and its batch is redone; an item that fails inside a worker is that item's failure only,
reported as in a local run.

The workers are the local run's own code: ``segment``'s actors write each image's files with
the same atomic writes and names (the driver lists the files and plans names and ``--resume``
before any actor starts); ``eval``'s actors return class-id maps (:func:`ray_predictor`), which
the driver caches and scores in dataset order, so the numbers equal a single-process run's
exactly.

Nothing else in the package imports Ray.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freesegdiff.errors import ConfigError

if TYPE_CHECKING:
    from freesegdiff.evaluation.runner import Predictor

# A worker: items (dicts of plain values) -> one result dict per item, in order.
Worker = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
LOCAL = "local"  # --ray without an address: start a Ray instance on this machine
READ_CPUS = 0.25  # CPUs a file-reading task reserves (it waits on the disk, not the CPU)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run is.

    ``address``: ``"local"`` starts a Ray instance on this machine; ``"auto"`` or
    ``"ray://host:10001"`` / ``"host:6379"`` joins a running cluster. ``actors``: CPU actors when
    the cluster has no GPU (one per GPU otherwise). ``batch_size``: items per actor call.
    ``cpus_per_actor``: CPUs each CPU actor reserves (its torch threads).
    """

    address: str = LOCAL
    actors: int = 2
    batch_size: int = 1
    cpus_per_actor: float = 1.0
    progress: bool = True

    def check(self) -> None:
        """Raises :class:`ConfigError` for a setting that cannot work (before Ray starts)."""
        if self.actors < 1:
            raise ConfigError(f"--ray-actors must be at least 1, got {self.actors}")
        if self.batch_size < 1:
            raise ConfigError(f"--ray-batch-size must be at least 1, got {self.batch_size}")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"cpus per actor must be positive, got {self.cpus_per_actor}")


def require_ray() -> Any:
    """Import Ray (with Ray Data) and return ``ray``;
    :class:`~freesegdiff.infra.extras.MissingExtraError` naming the ``[ray]`` extra when it is
    not installed."""
    from freesegdiff.infra.extras import require

    require("ray")  # ray.data
    import ray

    return ray


def start(options: RayOptions) -> Any:
    """Start (``address`` ``"local"``) or join Ray; return the ``ray`` module."""
    ray = require_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
        if options.address == LOCAL:
            kwargs["include_dashboard"] = False
            # the actors' CPUs and one more for the reading tasks, on any machine
            needed = math.ceil(options.actors * options.cpus_per_actor) + 1
            kwargs["num_cpus"] = max(os.cpu_count() or 1, needed)
        else:
            kwargs["address"] = options.address
        ray.init(**kwargs)
    return ray


class _Actor:
    """One pool member: builds its worker once (``make_worker()``), then maps batches."""

    def __init__(self, make_worker: Callable[[], Worker]) -> None:
        self.worker = make_worker()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        keys = list(batch)
        items = [
            {key: _plain(batch[key][row]) for key in keys} for row in range(len(batch[keys[0]]))
        ]
        started = time.perf_counter()
        results = self.worker(items)
        seconds = (time.perf_counter() - started) / max(len(items), 1)
        if len(results) != len(items):
            raise RuntimeError(f"the worker gave {len(results)} results for {len(items)} items")
        columns: dict[str, Any] = {"actor": np.array([_to_arrow(self.name)] * len(items))}
        columns["actor_seconds"] = np.full(len(items), seconds)
        merged = [{**item, **result} for item, result in zip(items, results, strict=True)]
        for key in sorted({key for result in merged for key in result}):
            values = [_to_arrow(result.get(key)) for result in merged]
            array = np.empty(len(values), dtype=object)
            array[:] = values
            columns[key] = array
        return columns


def _plain(value: Any) -> Any:
    """A numpy scalar from a Ray Data batch as the Python value it was."""
    value = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
    return _from_arrow(value)


# Arrow (Ray Data's blocks) holds text as UTF-8, which a file name of undecodable bytes (PEP 383
# surrogates, freesegdiff.io.filenames) is not: every text crosses as UTF-8 with "%" written "%25"
# and each undecodable byte 0xNN written "%NN", and is turned back on the other side.
def _to_arrow(value: Any) -> Any:
    """A value of an item or a result as Ray Data may hold it (texts escaped)."""
    if not isinstance(value, str):
        return value
    escaped = value.replace("%", "%25")
    if escaped.isascii():
        return escaped
    return "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in escaped)


def _from_arrow(value: Any) -> Any:
    """The value :func:`_to_arrow` was given."""
    if not isinstance(value, str) or "%" not in value:
        return value
    return re.sub(
        r"%([0-9A-F]{2})",
        lambda match: "%" if match[1] == "25" else chr(0xDC00 + int(match[1], 16)),
        value,
    )


def _read_file(key: str, row: dict[str, Any]) -> dict[str, Any]:
    """A Ray Data CPU task: the bytes of the file ``row[key]`` names, as ``data``, or why they
    cannot be read, as ``read_error`` (the local run's message)."""
    from freesegdiff.errors import ImageReadError
    from freesegdiff.io.images import read_encoded

    try:
        return {**row, "data": read_encoded(_from_arrow(row[key])).data, "read_error": ""}
    except ImageReadError as error:
        return {**row, "data": b"", "read_error": _to_arrow(str(error))}


def encoded_image(item: dict[str, Any], key: str) -> Any:
    """The :class:`~freesegdiff.io.images.EncodedImage` a reading task made of ``item[key]``'s
    file, or the :class:`~freesegdiff.errors.ImageReadError` it met (for a worker)."""
    from freesegdiff.errors import ImageReadError
    from freesegdiff.io.images import EncodedImage

    if item.get("read_error"):
        return ImageReadError(item["read_error"])
    return EncodedImage(str(item[key]), item["data"])


@dataclass
class RaySummary:
    """What a Ray run did: items, wall seconds, and per actor its items and the seconds its
    worker spent on them."""

    items: int
    seconds: float
    per_actor: dict[str, int]
    actor_seconds: dict[str, float]

    def describe(self) -> str:
        """One line: images per second in all, and per actor (its images / its busy seconds)."""
        rate = self.items / self.seconds if self.seconds > 0 else 0.0
        actors = ", ".join(
            f"{name} {count} images at {_rate(count, self.actor_seconds.get(name, 0.0))}/s"
            for name, count in sorted(self.per_actor.items())
        )
        return (
            f"Ray: {self.items} images in {self.seconds:.1f} s, {rate:.3f} images/s in all; "
            f"{len(self.per_actor)} actors: {actors}"
        )


def print_summary(summary: RaySummary) -> None:
    """Print a run's :meth:`RaySummary.describe` line to stderr (an ``on_done`` for
    :func:`map_on_actors`)."""
    print(summary.describe(), file=sys.stderr)


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.3f}" if seconds > 0 else "-"


def map_on_actors(
    items: list[dict[str, Any]],
    make_worker: Callable[[], Worker],
    options: RayOptions,
    read: str | None = None,
    on_done: Callable[[RaySummary], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run ``make_worker()``'s worker over ``items`` on a Ray actor pool; yield the results in
    the items' order (each with the item's keys, the worker's, ``actor`` and ``actor_seconds``).

    Args:
        items: one dict of plain values (str, int, float) per unit of work.
        make_worker: builds one worker; called once in each actor (and again in a replacement).
        options: where to run and how wide (:class:`RayOptions`).
        read: an item key holding a file path: CPU tasks read each file first, and the worker
            gets its bytes as ``data`` (``read_error`` the reason when it could not be read;
            :func:`encoded_image`).
        on_done: called with a :class:`RaySummary` once every result is out.
    """
    options.check()
    if not items:
        return
    ray = start(options)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = options.progress
    gpus = int(ray.cluster_resources().get("GPU", 0))
    width = gpus if gpus else options.actors
    resources: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": options.cpus_per_actor}
    indexed = [
        {**{key: _to_arrow(value) for key, value in item.items()}, "_index": index}
        for index, item in enumerate(items)
    ]
    dataset = ray.data.from_items(indexed, override_num_blocks=max(1, len(items)))
    if read is not None:
        dataset = dataset.map(partial(_read_file, read), num_cpus=READ_CPUS)
    results = dataset.map_batches(
        _Actor,
        fn_constructor_args=(make_worker,),
        batch_size=options.batch_size,
        batch_format="numpy",
        # Ray Data's actor pools replace a dead actor and redo its batch (max_restarts and
        # max_task_retries are -1 unless set: tests/test_distributed.py kills one)
        compute=ray.data.ActorPoolStrategy(size=min(width, len(items))),
        **resources,
    )
    started = time.perf_counter()
    counts: Counter[str] = Counter()
    busy: dict[str, float] = {}
    done = 0
    for row in results.iter_rows():
        row = {key: _plain(value) for key, value in row.items() if key not in _INTERNAL}
        actor = str(row["actor"])
        counts[actor] += 1
        busy[actor] = busy.get(actor, 0.0) + float(row["actor_seconds"])
        done += 1
        yield row
    if on_done is not None:
        on_done(RaySummary(done, time.perf_counter() - started, dict(counts), dict(busy)))


_INTERNAL = ("_index", "data")  # not handed back: the order key, a file's bytes


def ray_predictor(make_predictor: Callable[[], Predictor], options: RayOptions) -> Predictor:
    """An evaluation :data:`~freesegdiff.evaluation.runner.Predictor` that predicts on a Ray
    actor pool: each actor builds ``make_predictor()`` once and predicts the images it is given
    (read by CPU tasks); the class-id maps come back in the samples' order.

    For :func:`~freesegdiff.evaluation.runner.evaluate`, which then caches and scores them in
    dataset order as it does a local predictor's, so the numbers are a single-process run's:
    ``evaluate(dataset, out, lambda: ray_predictor(make_predictor, RayOptions(actors=2)))``.
    The ground truths stay in the driver (compressed while their predictions are made); an
    actor gets each image's path, id and ground-truth size.
    """

    def predict(samples: Iterable[Any]) -> Iterator[Any]:
        import zlib

        import numpy as np

        from freesegdiff.errors import FreeSegDiffError

        waiting = []  # (sample without its ground truth, the ground truth compressed)
        items = []
        for sample in samples:
            label_map = np.ascontiguousarray(sample.label_map)
            packed = (zlib.compress(label_map.tobytes(), 1), label_map.shape, label_map.dtype)
            waiting.append((replace(sample, label_map=np.zeros((0, 0), np.uint8)), packed))
            height, width = label_map.shape
            items.append(
                {
                    "image_id": sample.image_id,
                    "path": str(sample.image_path),
                    "height": int(height),
                    "width": int(width),
                }
            )
        rows = map_on_actors(
            items, _PredictWorker(make_predictor), options, read="path", on_done=print_summary
        )
        for (sample, (data, shape, dtype)), row in zip(waiting, rows, strict=True):
            label_map = np.frombuffer(zlib.decompress(data), dtype=dtype).reshape(shape)
            sample = replace(sample, label_map=label_map)
            if row["error"]:
                yield sample, FreeSegDiffError(row["error"]), None
            else:
                prediction = np.frombuffer(row["prediction"], dtype=np.uint8)
                yield sample, prediction.reshape(shape).copy(), row["seconds"]

    return predict


@dataclass(frozen=True)
class _PredictWorker:
    """Builds one actor's worker for :func:`ray_predictor`."""

    make_predictor: Callable[[], Predictor]

    def __call__(self) -> Worker:
        import numpy as np

        from freesegdiff.evaluation.datasets import Sample

        share_actor_cpus()
        predict = self.make_predictor()

        def work(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            results: list[dict[str, Any]] = [{} for _ in items]
            readable: list[tuple[int, Sample]] = []  # (index in items, sample to predict)
            for index, item in enumerate(items):
                image = encoded_image(item, "path")
                if isinstance(image, Exception):  # the local run's message for this file
                    results[index]["error"] = str(image)
                    continue
                shape = (int(item["height"]), int(item["width"]))
                sample = Sample(item["image_id"], Path(item["path"]), np.zeros(shape, np.uint8))
                readable.append((index, replace(sample, encoded=image)))
            predictions = predict(sample for _, sample in readable)
            for (index, _), (_, outcome, seconds) in zip(readable, predictions, strict=True):
                if isinstance(outcome, Exception):
                    results[index]["error"] = str(outcome)
                else:
                    results[index].update(
                        error="",
                        prediction=np.ascontiguousarray(outcome, dtype=np.uint8).tobytes(),
                        seconds=seconds,
                    )
            return results

        return work


def share_actor_cpus() -> int | None:
    """Size this Ray actor's worker pools (the released CRF's processes) from the CPUs Ray gave
    it, not from the whole node's (:func:`freesegdiff.infra.tuning.share_cpus`); returns them,
    or None outside a Ray actor or for an actor given no CPU (a GPU actor: the node's share)."""
    import ray

    from freesegdiff.infra.tuning import share_cpus

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    share_cpus(int(cpus) if cpus else None)
    return int(cpus) if cpus else None


@dataclass(frozen=True)
class SegmentWorker:
    """Builds one Ray actor's worker for ``segment --ray``: the run's pipeline, loaded once,
    writing the files of the images it is given with the local run's code
    (:func:`freesegdiff.cli.folder.segment_and_write`)."""

    args: argparse.Namespace
    settings: Any  # freesegdiff.cli.folder.WriteSettings

    def __call__(self) -> Worker:
        from freesegdiff.cli.common import load_pipeline
        from freesegdiff.cli.folder import Job, segment_and_write

        share_actor_cpus()
        pipe = load_pipeline(self.args, self.settings.classes)

        def work(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            errors: dict[str, str] = {}
            jobs, images = [], []
            for item in items:
                image = encoded_image(item, "source")  # the bytes a CPU task read
                if isinstance(image, Exception):  # the local run's message for this file
                    errors[item["image_id"]] = str(image)
                    continue
                jobs.append(
                    Job(Path(item["source"]), Path(item["folder"]), item["stem"], item["image_id"])
                )
                images.append(image)
            for job, error in segment_and_write(pipe, self.settings, jobs, None, images):
                errors[job.image_id] = error or ""
            return [{"error": errors.get(i["image_id"], "not segmented")} for i in items]

        return work


# ------------------------------------------------------------------ command-line options
def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--ray-actors``, ``--ray-batch-size``
    (:mod:`freesegdiff.distributed`)."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on a pool of Ray actors over Ray Data (the [ray] extra), each loading the "
        "models once: without ADDRESS on a Ray instance started on this machine; with one "
        "('auto', 'HOST:6379' or 'ray://HOST:10001') on that cluster, one actor per GPU. "
        "Models must be in a cache or folder every node can read (HF_HOME on shared storage, "
        "or local paths that exist on every node), and so must the images (read by Ray tasks "
        "on any node); segment's files are written by the actors, so its --output must be "
        "shared storage too (eval's are written by this process)",
    )
    parser.add_argument(
        "--ray-actors",
        type=int,
        default=2,
        metavar="N",
        help="CPU actors where the cluster has no GPU (default: 2)",
    )
    parser.add_argument(
        "--ray-batch-size",
        type=int,
        default=1,
        metavar="N",
        help="images per actor call (default: 1)",
    )


def check_ray_arguments(args: argparse.Namespace) -> None:
    """With ``--ray``: Ray Data is installed and the pool settings can work (before any model
    loads); raises :class:`ConfigError` otherwise."""
    if getattr(args, "ray", None) is None:
        return
    ray_options(args).check()
    require_ray()


def ray_options(args: argparse.Namespace) -> Any:
    """The :class:`~freesegdiff.distributed.RayOptions` of ``--ray`` and its companions."""
    return RayOptions(
        address=args.ray,
        actors=args.ray_actors,
        batch_size=args.ray_batch_size,
        progress=not args.no_progress,
    )
