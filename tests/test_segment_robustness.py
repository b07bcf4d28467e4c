"""``freesegdiff segment`` never loses work and never collides (tiny preset, real photos).

Killed runs (SIGKILL at several moments) leave only complete files under final names, and
``--resume`` then gives the same bytes as an uninterrupted run; Ctrl-C finishes or abandons
the image being written and says how to go on; names never clash; the output folder is never
read as input; unreadable folders are failures, not silently skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

import freesegdiff.outputs as outputs
from freesegdiff.atomic import is_temporary, temporary_name
from freesegdiff.cli import main
from freesegdiff.image_io import iter_image_files

SMALL = (96, 64)  # width, height of the photos: a tiny-preset image takes well under a second
TINY = ["--preset", "tiny", "--no-progress"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    """Four real photos, small: two PNG, two JPEG."""
    folder = tmp_path_factory.mktemp("robust-photos")
    for name, suffix in (("astronaut", ".png"), ("chelsea", ".jpg"), ("coffee", ".png")):
        Image.fromarray(photos[name]).resize(SMALL).save(folder / f"{name}{suffix}")
    Image.fromarray(photos["rocket"]).resize(SMALL).save(folder / "rocket.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def reference(photo_dir, tmp_path_factory) -> Path:
    """An uninterrupted run over ``photo_dir`` (PNG + COCO): what every other run must equal."""
    pytest.importorskip("pycocotools", reason="COCO output needs pycocotools (the [eval] extra)")
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["segment", str(photo_dir), "-o", str(out), *TINY, "--format", "png,coco-rle"]) == 0
    return out


def final_files(folder: Path) -> list[str]:
    """Every file under ``folder`` but unfinished temporary ones, relative, sorted."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not is_temporary(path.name)
    )


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if is_temporary(path.name)]


def assert_all_complete(folder: Path) -> None:
    """No file under a final name is cut short: images decode whole, JSON parses."""
    for name in final_files(folder):
        path = folder / name
        if path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                image.load()  # a truncated PNG or JPEG raises here
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".html":
            assert path.read_text(encoding="utf-8").endswith("</html>\n"), name


def comparable(path: Path) -> object:
    """The file's bytes; for a JSON summary its content without ``"timings"``."""
    if path.suffix == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, dict):
            content.pop("timings", None)
        return content
    return path.read_bytes()


def assert_same_outputs(first: Path, second: Path) -> None:
    names = final_files(first)
    assert names == final_files(second)
    for name in names:
        assert comparable(first / name) == comparable(second / name), name


def segmented_count(text: str) -> tuple[int, int]:
    match = re.search(r"segmented (\d+) of (\d+) images", text)
    assert match, text
    return int(match.group(1)), int(match.group(2))


# -- the walk ---------------------------------------------------------------------------------


def test_the_walk_skips_the_output_folder_and_temporaries_and_reports_unreadable_folders(
    tmp_path, monkeypatch
):
    for name in ("a.png", "out/a.png", "out/thumbnails/a.jpg", "sub/b.jpg", "locked/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / temporary_name("d.png")).write_bytes(b"half a png")
    (tmp_path / ".e.png.tmp").write_bytes(b"another program's temporary")
    real_scandir = os.scandir

    def scandir(path):  # as chmod 000 does for a user other than root
        if Path(path) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    errors: dict[str, str] = {}
    # the output folder is recognised however it is named
    found = iter_image_files([tmp_path], exclude=[tmp_path / "sub" / ".." / "out"], errors=errors)
    assert [path.relative_to(tmp_path).as_posix() for path in found] == ["a.png", "sub/b.jpg"]
    assert list(errors) == [str(tmp_path / "locked")]
    assert "Permission denied" in errors[str(tmp_path / "locked")]
    assert "chmod" in errors[str(tmp_path / "locked")]
    with pytest.raises(OSError, match="cannot read the folder"):  # no errors dict: raise
        list(iter_image_files([tmp_path]))


# -- names ------------------------------------------------------------------------------------


def test_names_mirror_the_input_tree_and_never_clash(photos, tmp_path):
    """x.jpg beside x.png, y.png beside y_overlay.jpg, the same name from two inputs: each
    image gets its own files, and its JSON names them (more cases: test_outputs.py)."""
    folder, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    sizes = {}  # every image its own size: a file overwritten by another image would show
    for index, name in enumerate(["x.jpg", "x.png", "y.png", "y_overlay.jpg", "sub/x.png"]):
        size = (40 + 8 * index, 32 + 4 * index)
        Image.fromarray(photos["chelsea"]).resize(size).save(folder / name)
        sizes[str(folder / name)] = size
    Image.fromarray(photos["coffee"]).resize((30, 20)).save(elsewhere / "x.png")
    sizes[str(elsewhere / "x.png")] = (30, 20)
    out = tmp_path / "out"
    code = main(["segment", str(folder), str(elsewhere / "x.png"), "-o", str(out), *TINY])
    assert code == 0
    expected = {
        "x.jpg.json": "in/x.jpg",
        "x.png.json": "in/x.png",
        "y.png.json": "in/y.png",
        "y_overlay.jpg.json": "in/y_overlay.jpg",
        "sub/x.json": "in/sub/x.png",  # alone in its folder: the plain stem
        "x.png-2.json": "elsewhere/x.png",  # the same name from a second input, after it
    }
    summaries = sorted(name for name in final_files(out) if name.endswith(".json"))
    assert summaries == sorted(expected)
    for json_name, source in expected.items():
        summary = json.loads((out / json_name).read_text())
        assert summary["image"] == str(tmp_path / source)
        stem = json_name[: -len(".json")].split("/")[-1]
        assert summary["files"] == {"png": f"{stem}.png", "overlay": f"{stem}_overlay.png"}
        parent = (out / json_name).parent
        with Image.open(parent / summary["files"]["png"]) as label_map:
            assert label_map.size == sizes[str(tmp_path / source)]
        assert (parent / summary["files"]["overlay"]).is_file()
    assert not (out / "failures.json").exists()  # nothing failed


# -- the output folder ------------------------------------------------------------------------


def test_an_output_folder_inside_the_input_is_never_read(photo_dir, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("astronaut.png", "chelsea.jpg"):
        (work / name).write_bytes((photo_dir / name).read_bytes())
    monkeypatch.chdir(work)
    assert main(["segment", ".", "--output", "out", *TINY]) == 0
    first = segmented_count(capsys.readouterr().out)
    # a killed run's leftover, and a hidden temporary among the inputs: both never inputs
    leftover = Path("out") / temporary_name("astronaut.png")
    leftover.write_bytes(b"\x89PNG half")
    (work / temporary_name("chelsea.png")).write_bytes(b"\x89PNG half")
    assert main(["segment", ".", "--output", "out", *TINY]) == 0
    second = segmented_count(capsys.readouterr().out)
    assert first == second == (2, 2)
    assert not leftover.exists()  # cleaned up
    assert not list(Path("out").glob("*_overlay_overlay.png"))
    assert_all_complete(Path("out"))


def test_an_output_that_is_a_file_stops_before_any_model_loads(
    photo_dir, tmp_path, monkeypatch, capsys
):
    import freesegdiff.commands.segment as segment

    def no_models(*args, **kwargs):
        pytest.fail("a model was loaded although the output folder cannot be used")

    monkeypatch.setattr(segment, "pipeline_from_args", no_models)
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    assert main(["segment", str(photo_dir), "-o", str(taken), *TINY]) == 2
    error = capsys.readouterr().err
    assert "is a file" in error and "Traceback" not in error
    assert error.count("\n") == 1  # one clear message
    assert taken.read_text() == "a file, not a folder"

    def read_only(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(outputs, "open", read_only, raising=False)  # the write probe fails
    assert main(["segment", str(photo_dir), "-o", str(tmp_path / "ro"), *TINY]) == 2
    error = capsys.readouterr().err
    assert "cannot write in the output folder" in error and "Permission denied" in error


# -- failures ---------------------------------------------------------------------------------


def _unreadable_folder_run(photo_dir, tmp_path, capsys, lock, unlock):
    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    (folder / "astronaut.png").write_bytes((photo_dir / "astronaut.png").read_bytes())
    (folder / "locked" / "coffee.png").write_bytes((photo_dir / "coffee.png").read_bytes())
    out = tmp_path / "out"
    lock(folder / "locked")
    try:
        code = main(["segment", str(folder), "-o", str(out), *TINY])
    finally:
        unlock(folder / "locked")
    printed = capsys.readouterr().out
    assert code == 1
    assert "1 failed" in printed and str(folder / "locked") in printed
    failures = json.loads((out / "failures.json").read_text())
    assert failures["count"] == 1 and list(failures["failed"]) == [str(folder / "locked")]
    assert "cannot read the folder" in failures["failed"][str(folder / "locked")]
    assert (out / "astronaut.json").is_file()
    assert "cannot read the folder" in (out / "index.html").read_text()
    # readable again: the rest is done, and the stale failures.json goes
    assert main(["segment", str(folder), "-o", str(out), *TINY, "--resume"]) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert (out / "locked" / "coffee.json").is_file()
    assert not (out / "failures.json").exists()


def test_an_unreadable_subfolder_is_a_failure_not_skipped(photo_dir, tmp_path, capsys, monkeypatch):
    """Simulated (chmod 000 does not stop root): listing the folder raises PermissionError."""
    blocked: set[Path] = set()
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) in blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    _unreadable_folder_run(photo_dir, tmp_path, capsys, blocked.add, blocked.discard)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="chmod 000 stops reading only for a user other than root",
)
def test_a_chmod_000_subfolder_is_a_failure(photo_dir, tmp_path, capsys):
    _unreadable_folder_run(
        photo_dir, tmp_path, capsys, lambda path: path.chmod(0), lambda path: path.chmod(0o755)
    )


# -- determinism ------------------------------------------------------------------------------


def test_two_runs_write_the_same_bytes(photo_dir, tmp_path):
    """Every PNG (explain figures included), the thumbnails and index.html are identical; the
    JSON summaries differ only in their timings."""
    pytest.importorskip("matplotlib", reason="the explain figure needs matplotlib")
    inputs = [str(photo_dir / "chelsea.jpg"), str(photo_dir / "coffee.png")]
    for name in ("first", "second"):
        assert main(["segment", *inputs, "-o", str(tmp_path / name), *TINY, "--explain"]) == 0
    assert "chelsea_explain.png" in final_files(tmp_path / "first")
    assert_same_outputs(tmp_path / "first", tmp_path / "second")
    for name in final_files(tmp_path / "first"):
        if name.endswith(".png"):
            assert (tmp_path / "first" / name).read_bytes() == (
                tmp_path / "second" / name
            ).read_bytes()


# -- Ctrl-C -----------------------------------------------------------------------------------


def _interrupt_at_overlay(monkeypatch, call: int, action: Callable[[], None]) -> None:
    """Run ``action`` when the ``call``-th overlay is drawn (the middle of an image's writes)."""
    real = outputs.render_overlay
    calls = []

    def render_overlay(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "render_overlay", render_overlay)


def test_ctrl_c_finishes_or_abandons_the_image_and_resume_completes_the_run(
    photo_dir, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    command = ["segment", str(photo_dir), "-o", str(out), *TINY, "--format", "png,coco-rle"]
    # 1. Ctrl-C (a real SIGINT) while the second image is written: that image is finished
    _interrupt_at_overlay(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert main(command) == 130
    captured = capsys.readouterr()
    assert "--resume" in captured.err and "interrupted" in captured.err
    assert segmented_count(captured.out) == (2, 4)
    assert (out / "astronaut.json").is_file() and (out / "chelsea.json").is_file()
    assert not (out / "coffee.png").exists()
    assert "chelsea_overlay" in (out / "index.html").read_text()  # written for what was done
    assert len(json.loads((out / "coco_results.json").read_text())) > 0
    # 2. a KeyboardInterrupt raised in the middle of the next image's writes: it is abandoned,
    # its label map (already written) removed again
    monkeypatch.undo()

    def interrupt():
        raise KeyboardInterrupt

    _interrupt_at_overlay(monkeypatch, 1, interrupt)
    assert main([*command, "--resume"]) == 130
    captured = capsys.readouterr()
    assert "2 skipped" in captured.out and "--resume" in captured.err
    assert not (out / "coffee.png").exists() and not (out / "coffee.json").exists()
    assert not temporaries(out)
    assert_all_complete(out)
    # 3. resumed: the same files as an uninterrupted run
    monkeypatch.undo()
    assert main([*command, "--resume"]) == 0
    assert segmented_count(capsys.readouterr().out) == (2, 4)
    assert_same_outputs(reference, out)


# -- SIGKILL ----------------------------------------------------------------------------------


def _run_and_kill(command: list[str], kill_now: Callable[[], bool], timeout: float = 180) -> None:
    """Start ``command``; SIGKILL it as soon as ``kill_now()`` (polled every ~2 ms) is true."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if kill_now():
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            errors = process.stderr.read().decode(errors="replace")
            process.stderr.close()
    assert process.returncode == -signal.SIGKILL, f"the run was not killed:\n{errors}"


def _count(folder: Path, pattern: str) -> int:
    try:
        return sum(1 for _ in folder.rglob(pattern))
    except OSError:
        return 0


@pytest.mark.heavy
def test_sigkill_at_any_moment_leaves_complete_files_and_resume_finishes(
    photo_dir, reference, tmp_path
):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "freesegdiff", "segment", str(photo_dir), "-o", str(out)]
    command += [*TINY, "--format", "png,coco-rle"]
    rng = random.Random(20240601)
    # 1. half a second in: still importing or loading
    started = time.monotonic()
    _run_and_kill(command, lambda: time.monotonic() - started > 0.5)
    if out.exists():
        assert_all_complete(out)
    # 2. the moment the first image is complete
    _run_and_kill(command, lambda: _count(out, "*.json") >= 1)
    assert_all_complete(out)
    before = _count(out, "*.json")
    # 3. resumed, then killed while a file is being written, or at a random moment (fixed seed)
    # in the writes of the images after the first new one
    delay = rng.uniform(0.0, 0.15)  # two images are left to segment: more than that
    seen: dict[str, float] = {}

    def mid_write() -> bool:
        if _count(out, "*.json") > before:
            seen.setdefault("json", time.monotonic())
        if "json" not in seen:
            return False
        return bool(temporaries(out)) or time.monotonic() - seen["json"] > delay

    _run_and_kill([*command, "--resume"], mid_write)
    assert_all_complete(out)
    complete = _count(out, "*.json")
    assert before < complete < 4
    # a write cut short by a kill: ignored, and removed by the next run
    stale = out / temporary_name("rocket.png")
    stale.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    resume = ["segment", str(photo_dir), "-o", str(out), *TINY, "--format", "png,coco-rle"]
    assert main([*resume, "--resume"]) == 0
    assert not temporaries(out)
    assert_same_outputs(reference, out)
