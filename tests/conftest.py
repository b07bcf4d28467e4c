"""Shared fixtures: real photos and tiny random models saved in the real on-disk layouts.

The tiny models are built once per test session into a temporary folder and always loaded
back through ``from_pretrained`` from that folder, the code path of a user's real weights.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Tiny ``tiny:`` models built during the tests go to a throw-away cache, never the user's.
os.environ.setdefault("FREESEGDIFF_CACHE", str(Path(tempfile.gettempdir()) / "freesegdiff-tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker takes its share of the CPUs for torch's threads and those of the
# interpreters its tests start: two workers of two OpenMP threads each on two cores
# oversubscribe them (the main run took 364 s so, 217 s with one thread per worker). Set before
# torch is imported (its OpenMP reads the variable on loading), so not through
# freesegdiff.infra.tuning.usable_cpus, whose module imports torch.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (_CPUS or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real RGB photos bundled with scikit-image, by name."""
    from skimage import data

    return {name: getattr(data, name)() for name in ("chelsea", "astronaut", "coffee", "rocket")}


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion folder (model_index.json, unet, vae, ...)."""
    from freesegdiff.infra.tiny.diffusion import build_stable_diffusion

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_stable_diffusion(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP model + processor folder."""
    from freesegdiff.infra.tiny.clip import build_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    build_clip(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_blip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BLIP captioner folder."""
    from freesegdiff.infra.tiny.captioner import build_blip

    folder = tmp_path_factory.mktemp("tiny-blip")
    build_blip(folder, seed=0)
    return folder


# ------------------------------------------------------------------ optional test dependencies
# The plain install (the README's first command, plus pytest and hypothesis: see .ci/run) has
# none of the [test] extra's packages. A test that uses one of these fixtures is skipped, with
# the package named, when its package is missing; tests that import an optional package
# themselves use ``pytest.importorskip``.
FIXTURE_NEEDS: dict[str, str] = {"photos": "skimage"}  # fixture -> module it needs


# The files that take longest (measured in CI's durations), run first: pytest-xdist hands whole
# files to its workers in collection order (--dist loadfile), so a long file collected last
# would run alone at the end while the other worker idles.
LONGEST_FIRST = (  # seconds per file in one run of 2026-12-04, two workers
    "test_distributed.py",  # 101
    "test_fast_captioner.py",  # 68
    "test_segment_robustness.py",  # 60
    "test_pipeline.py",  # 57
    "test_demo_load.py",  # 39
    "test_huge_images.py",  # 32
    "test_tuning.py",  # 30
    "test_vit.py",  # 28
    "test_bench_runner.py",  # 23
    "test_paper_reproduction.py",  # 18
    "test_clustering.py",  # 17
    "test_bench_dtype.py",  # 15
    "test_ablation.py",  # 15
    "test_weights.py",  # 13
    "test_demo_command.py",  # 12
)


def pytest_configure(config: pytest.Config) -> None:
    """Keep LONGEST_FIRST's order under xdist: since 3.6 it sorts the files of ``--dist
    loadfile`` by their number of tests unless told not to, which put the few long tests of
    test_distributed.py last, alone on one worker."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the longest files first; skip the tests whose fixtures need a package that is not
    installed."""
    import importlib.util

    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept

    missing = {
        fixture: module
        for fixture, module in FIXTURE_NEEDS.items()
        if importlib.util.find_spec(module) is None
    }
    for item in items:
        for fixture in sorted(set(getattr(item, "fixturenames", ())) & set(missing)):
            module = missing[fixture]
            reason = f'the {fixture!r} fixture needs {module} (pip install -e ".[test]")'
            item.add_marker(pytest.mark.skip(reason=reason))
