"""Runs past one process: the pipeline in a pool of Ray actors over Ray Data (the ``[ray]`` extra).

``freesegdiff segment ... --ray [ADDRESS]`` and ``freesegdiff eval ... --ray [ADDRESS]`` hand
their work items (one per image) to :func:`map_on_actors`: a Ray Data dataset of the items, one
``map_batches`` stage over a pool of actors that each build their worker once (the models load
once per actor) and call it on batches of items. One actor per GPU where the cluster has GPUs,
``RayOptions.actors`` CPU actors otherwise. An actor that dies is replaced (its models load
again) and its batch is redone; an item that fails inside a worker is that item's failure only,
reported as in a local run.

The workers are the local run's own code: ``segment``'s actors write each image's files with
the same atomic writes and names (the driver plans names and ``--resume`` before any actor
starts); ``eval``'s actors return class-id maps, which the driver caches and scores in dataset
order, so the numbers equal a single-process run's exactly.

Nothing else in the package imports Ray.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from freesegdiff.errors import ConfigError

# A worker: items (dicts of plain values) -> one result dict per item, in order.
Worker = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
LOCAL = "local"  # --ray without an address: start a Ray instance on this machine


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
    """Import Ray (with Ray Data), or say which extra installs it."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ConfigError(
            f"--ray needs Ray Data ({error}); install the extra: pip install 'freesegdiff[ray]'"
        ) from error
    return ray


def start(options: RayOptions) -> Any:
    """Start (``address`` ``"local"``) or join Ray; return the ``ray`` module."""
    ray = require_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
        if options.address == LOCAL:
            kwargs["include_dashboard"] = False
            kwargs["num_cpus"] = max(
                os.cpu_count() or 1, int(options.actors * options.cpus_per_actor)
            )
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
        columns: dict[str, Any] = {"actor": np.array([self.name] * len(items))}
        columns["actor_seconds"] = np.full(len(items), seconds)
        merged = [{**item, **result} for item, result in zip(items, results, strict=True)]
        for key in sorted({key for result in merged for key in result}):
            values = [result.get(key) for result in merged]
            array = np.empty(len(values), dtype=object)
            array[:] = values
            columns[key] = array
        return columns


def _plain(value: Any) -> Any:
    """A numpy scalar from a Ray Data batch as the Python value it was."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


@dataclass
class RaySummary:
    """What a Ray run did: items, wall seconds, and items per actor."""

    items: int
    seconds: float
    per_actor: dict[str, int]

    def describe(self) -> str:
        rate = self.items / self.seconds if self.seconds > 0 else 0.0
        actors = ", ".join(f"{name} {count}" for name, count in sorted(self.per_actor.items()))
        per = rate / max(len(self.per_actor), 1)
        return (
            f"Ray: {self.items} images in {self.seconds:.1f} s, {rate:.3f} images/s in all, "
            f"{per:.3f} per actor ({len(self.per_actor)} actors: {actors})"
        )


def map_on_actors(
    items: list[dict[str, Any]],
    make_worker: Callable[[], Worker],
    options: RayOptions,
    summary: list[RaySummary] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run ``make_worker()``'s worker over ``items`` on a Ray actor pool; yield the results in
    the items' order (each with the item's keys, the worker's, and ``actor``).

    Args:
        items: one dict of plain values (str, int, float) per unit of work.
        make_worker: builds one worker; called once in each actor (and again in a replacement).
        options: where to run and how wide (:class:`RayOptions`).
        summary: when given, a :class:`RaySummary` is appended once every result is out.
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
    indexed = [{**item, "_index": index} for index, item in enumerate(items)]
    dataset = ray.data.from_items(indexed, override_num_blocks=max(1, len(items)))
    results = dataset.map_batches(
        _Actor,
        fn_constructor_args=(make_worker,),
        batch_size=options.batch_size,
        batch_format="numpy",
        concurrency=min(width, len(items)),
        max_restarts=-1,  # a dead actor is replaced
        max_task_retries=-1,  # and its batch is redone
        **resources,
    )
    started = time.perf_counter()
    counts: Counter[str] = Counter()
    done = 0
    for row in results.iter_rows():
        row = {key: _plain(value) for key, value in row.items()}
        row.pop("_index", None)
        counts[str(row["actor"])] += 1
        done += 1
        yield row
    if summary is not None:
        summary.append(RaySummary(done, time.perf_counter() - started, dict(counts)))
