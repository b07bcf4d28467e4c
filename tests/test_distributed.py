"""``segment --ray`` and ``eval --ray``: a local Ray instance with 2 CPU actors writes the files
and scores a local run does, also when an actor dies mid-run (skipped where the [ray] extra is
not installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

RAY = ["--ray", "--ray-actors", "2"]
# The runs start Ray and load the tiny models in every actor: heavy, and only with the extra.
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="the [ray] extra is not installed"
)


def test_texts_cross_arrow_as_utf8_and_come_back_exact():
    from freesegdiff.distributed import _from_arrow, _to_arrow

    for text in [ODD, "plain", "100%", "%25 and %FF", "/x/café \udce9.jpg", "%"]:
        crossed = _to_arrow(text)
        crossed.encode("utf-8")  # Arrow can hold it
        assert _from_arrow(crossed) == text
    assert _to_arrow(ODD) == "caf%E9 %FF" and _to_arrow(3) == 3


@pytest.mark.parametrize("command", ["segment", "eval"])
def test_ray_settings_and_the_extra_are_checked_before_anything_runs(
    command, tmp_path, monkeypatch, capsys
):
    from freesegdiff.cli import main

    target = ["x.png"] if command == "segment" else ["--dataset", "voc21", "--data-root", "x"]
    args = [command, *target, "--preset", "tiny", "-o", str(tmp_path / "out")]
    assert main([*args, "--ray", "--ray-actors", "0"]) == 2
    assert "--ray-actors must be at least 1, got 0" in capsys.readouterr().err
    assert main([*args, "--ray", "--ray-batch-size", "0"]) == 2
    assert "--ray-batch-size must be at least 1, got 0" in capsys.readouterr().err
    for name in [name for name in sys.modules if name == "ray" or name.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main([*args, "--ray"]) == 2
    assert 'pip install "freesegdiff[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was made


def _assert_same_files(
    ours: Path, theirs: Path, timed: tuple[str, ...] = ("timings",), skip: tuple[str, ...] = ()
) -> int:
    """Every file under ``theirs`` is under ``ours`` with the same bytes; JSON files with the
    same content but the ``timed`` keys; files named in ``skip`` only present in both.
    Returns the number of files."""
    mine = sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
    local = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    assert mine == local
    for relative in local:
        if relative.name in skip:
            continue
        a, b = ours / relative, theirs / relative
        if relative.suffix == ".json" and relative.name != "failures.json":
            first, second = json.loads(a.read_text()), json.loads(b.read_text())
            for key in timed:
                first.pop(key, None)
                second.pop(key, None)
            assert first == second, relative
        else:
            assert a.read_bytes() == b.read_bytes(), relative
    return len(local)


# A file name that is not UTF-8: Arrow (Ray Data's blocks) holds only UTF-8 text, so the name
# crosses escaped (distributed._to_arrow) and must come back as the exact file.
ODD = os.fsdecode(b"caf\xe9 \xff")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """Three real photos (one in a subfolder, named in bytes that are not UTF-8) and a file
    that is not an image."""
    from PIL import Image

    inputs = tmp_path_factory.mktemp("in")
    (inputs / "more").mkdir()
    Image.fromarray(photos["astronaut"]).save(inputs / "astronaut.png")
    Image.fromarray(photos["coffee"]).save(inputs / "coffee.jpg", quality=90)
    Image.fromarray(photos["chelsea"]).save(inputs / "more" / f"{ODD}.png")
    (inputs / "broken.jpg").write_bytes(b"not an image at all")
    return inputs


@pytest.fixture(scope="module")
def local_run(folder, tmp_path_factory):
    from freesegdiff.cli import main

    out = tmp_path_factory.mktemp("local")
    assert main(["segment", str(folder), "--preset", "tiny", "--no-progress", "-o", str(out)]) == 1
    return out


class _DiesOnce:
    """A worker factory whose worker kills its actor's process the first time it is given the
    image ``victim`` (a marker file says it happened), then works as ``inner``'s."""

    def __init__(self, inner, marker: str, victim: str) -> None:
        self.inner, self.marker, self.victim = inner, marker, victim

    def __call__(self):
        work = self.inner()

        def dying(items):
            mine = any(item["stem"] == self.victim for item in items)
            if mine and not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(1)  # the actor dies mid-batch, nothing written
            return work(items)

        return dying


@pytest.mark.heavy
@needs_ray
def test_segment_on_two_ray_actors_writes_the_local_runs_files_even_when_one_dies(
    folder, local_run, tmp_path, capsys, monkeypatch
):
    """Two actors write exactly the files of a local run, although one of them dies mid-run
    (os._exit on its first batch holding "coffee") and is replaced, its images redone; a run
    killed and started again with --resume does only what is missing."""
    from ray import cloudpickle  # Ray's own copy

    from freesegdiff import distributed
    from freesegdiff.cli import main

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import tests
    marker = tmp_path / "killed"
    real = distributed.SegmentWorker
    monkeypatch.setattr(
        distributed, "SegmentWorker", lambda *args: _DiesOnce(real(*args), str(marker), "coffee")
    )
    out = tmp_path / "ray"
    common = ["segment", str(folder), "--preset", "tiny", "--no-progress", "-o", str(out)]
    assert main([*common, *RAY]) == 1  # only broken.jpg fails, as locally
    assert marker.is_file()  # an actor did die
    summary = capsys.readouterr().err
    assert "Ray: 4 images in" in summary and "images/s in all;" in summary
    # 3 images x (png, overlay, json, thumbnail) + index.html + failures.json + the manifest
    assert _assert_same_files(out, local_run) == 15
    failures = json.loads((out / "failures.json").read_text())["failed"]
    assert list(failures) == [str(folder / "broken.jpg")]
    assert "cannot identify image file" in failures[str(folder / "broken.jpg")]

    # A run killed and restarted resumes: an image whose JSON is gone is done again, alone
    # (by one actor: one image needs no more, and an actor's start-up is most of this run).
    (out / "more" / f"{ODD}.json").unlink()
    assert main([*common, "--ray", "--ray-actors", "1", "--resume"]) == 1
    assert "segmented 1 of 4 images" in capsys.readouterr().out
    _assert_same_files(out, local_run)


@pytest.mark.heavy
@needs_ray
def test_eval_on_two_ray_actors_scores_and_caches_as_a_local_run(tmp_path, capsys):
    from freesegdiff.cli import main
    from freesegdiff.evaluation.synthetic import write_synthetic_dataset

    write_synthetic_dataset("voc21", tmp_path / "data", num_images=4, size=(64, 48), seed=3)
    broken = sorted((tmp_path / "data").rglob("*.jpg"))[1]
    broken.write_bytes(b"not an image at all")  # fails its image, in both runs alike
    common = ["eval", "--dataset", "voc21", "--data-root", str(tmp_path / "data")]
    common += ["--preset", "tiny", "--no-progress"]
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main([*common, "-o", str(local)]) == 1
    assert main([*common, "-o", str(on_ray), *RAY]) == 1
    assert "Ray: 4 images in" in capsys.readouterr().err
    results = json.loads((on_ray / "results.json").read_text())
    assert results["predicted_now"] == 3 and list(results["failed"]) == [broken.stem]
    for protocol in ("standard", "paper"):  # the paper protocol: re-scored from the caches
        if protocol == "paper":
            assert main([*common, "--protocol", protocol, "-o", str(local)]) == 1
            assert main([*common, "--protocol", protocol, "-o", str(on_ray), *RAY]) == 1
        # predictions, settings, results.md and confusion.png byte for byte; seconds aside
        seconds = {folder: (folder / "predictions" / "seconds.tsv") for folder in (local, on_ray)}
        assert [len(path.read_text().splitlines()) for path in seconds.values()] == [3, 3]
        for folder in (local, on_ray):
            markdown = (folder / "results.md").read_text().splitlines()
            (folder / "results.md").write_text("\n".join(markdown[:4] + markdown[7:]))
        _assert_same_files(on_ray, local, timed=("seconds_per_image",), skip=("seconds.tsv",))
