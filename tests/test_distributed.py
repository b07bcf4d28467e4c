"""``segment --ray``: a local Ray instance with 2 CPU actors writes the files a local run does
(skipped where the [ray] extra is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray.data")


def _without_timings(path: Path) -> dict:
    record = json.loads(path.read_text())
    record.pop("timings", None)
    return record


@pytest.mark.heavy  # starts Ray and two actors
def test_segment_on_two_ray_actors_writes_the_local_runs_files(tmp_path, photos):
    from PIL import Image

    from freesegdiff.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(photos[name]).save(inputs / f"{name}.png")
    common = [str(inputs), "--preset", "tiny", "--no-progress"]
    assert main(["segment", *common, "--output", str(tmp_path / "local")]) == 0
    ray_args = ["--ray", "--ray-actors", "2"]
    assert main(["segment", *common, "--output", str(tmp_path / "ray"), *ray_args]) == 0
    local = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.*"))
    on_ray = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.*"))
    assert local == on_ray and len(local) >= 9
    for relative in local:
        ours, theirs = tmp_path / "ray" / relative, tmp_path / "local" / relative
        if relative.suffix == ".json" and relative.name != "failures.json":
            assert _without_timings(ours) == _without_timings(theirs), relative
        else:
            assert ours.read_bytes() == theirs.read_bytes(), relative
