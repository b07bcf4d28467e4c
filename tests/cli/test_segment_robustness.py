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
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

import freesegdiff.io.outputs as outputs
from freesegdiff.cli import main
from freesegdiff.io.atomic import is_temporary, temporary_name
from freesegdiff.io.images import iter_image_files

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
    """An uninterrupted run over ``photo_dir`` (PNG + COCO), batch after batch (``--no-stream``):
    what every other run, streamed as the CLI runs by default, killed and resumed, must equal."""
    pytest.importorskip("pycocotools", reason="COCO output needs pycocotools (the [eval] extra)")
    out = tmp_path_factory.mktemp("reference") / "out"
    command = ["segment", str(photo_dir), "-o", str(out), *TINY, "--format", "png,coco-rle"]
    assert main([*command, "--no-stream"]) == 0
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
    assert summaries == sorted([*expected, "freesegdiff-run.json"])
    summaries.remove("freesegdiff-run.json")
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
    from freesegdiff.cli import common

    def no_models(*args, **kwargs):
        pytest.fail("a model was loaded although the output folder cannot be used")

    monkeypatch.setattr(common, "pipeline_from_args", no_models)
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


def test_a_streamed_run_equals_the_serial_one_with_a_failing_image(
    photo_dir, tmp_path, monkeypatch
):
    """Batches of two with an unreadable file among the photos and an image whose features
    fail: the streamed run retries that batch image by image as the serial run does, and
    both write the same files (failures.json included) byte for byte, timings aside."""
    from freesegdiff.pipeline import FreeSegDiff

    folder = tmp_path / "in"
    shutil.copytree(photo_dir, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    extract = FreeSegDiff._extract

    def failing(self, batch):
        if any(str(source).endswith("coffee.png") for source in batch.sources):
            raise RuntimeError("features failed on purpose")
        return extract(self, batch)

    monkeypatch.setattr(FreeSegDiff, "_extract", failing)
    runs = {}
    for name, flags in (("serial", ["--no-stream"]), ("streamed", [])):
        runs[name] = tmp_path / name
        command = ["segment", str(folder), "-o", str(runs[name]), *TINY, "--batch-size", "2"]
        assert main([*command, *flags]) == 1  # two failures
    assert_same_outputs(runs["serial"], runs["streamed"])
    failures = json.loads((runs["streamed"] / "failures.json").read_text(encoding="utf-8"))
    assert failures["count"] == 2
    assert sorted(Path(name).name for name in failures["failed"]) == ["broken.png", "coffee.png"]
    assert "features failed on purpose" in str(failures["failed"])
    assert len(final_files(runs["streamed"])) > 6  # the other three photos were written


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


# -- hostile names ----------------------------------------------------------------------------

ODD = os.fsdecode(b"caf\xe9 \xff")  # a stem that is not UTF-8 (Latin-1 bytes, a stray 0xFF)


def test_a_file_name_that_is_not_utf8_is_written_listed_and_resumed(photo_dir, tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / f"{ODD}.png").write_bytes((photo_dir / "coffee.png").read_bytes())
    (folder / "chelsea.jpg").write_bytes((photo_dir / "chelsea.jpg").read_bytes())
    assert main(["segment", str(folder), "-o", str(out), *TINY]) == 0
    assert segmented_count(capsys.readouterr().out) == (2, 2)
    # JSON: ASCII escapes of the surrogates, which Python reads back to the exact file
    raw = (out / f"{ODD}.json").read_bytes()
    assert b'caf\\udce9 \\udcff.png"' in raw and raw.isascii()
    summary = json.loads(raw)
    assert summary["image"] == str(folder / f"{ODD}.png")
    assert os.fsencode(summary["image"]).endswith(b"caf\xe9 \xff.png")
    assert summary["files"] == {"png": f"{ODD}.png", "overlay": f"{ODD}_overlay.png"}
    # the page: valid UTF-8, the name shown with \xNN, linked by its bytes
    page = (out / "index.html").read_bytes().decode("utf-8")  # strict: fails on a surrogate
    assert "<b>caf\\xe9 \\xff</b>" in page
    assert 'href="caf%E9%20%FF_overlay.png"' in page
    assert (out / "thumbnails" / f"{ODD}.jpg").is_file()
    # every later run into the folder works: --resume, and a failing file of such a name
    broken = folder / os.fsdecode(b"broken-\xfe.jpg")
    broken.write_bytes(b"not an image at all")
    assert main(["segment", str(folder), "-o", str(out), *TINY, "--resume"]) == 1
    printed = capsys.readouterr().out
    assert "2 skipped, already complete" in printed and "broken-\\xfe.jpg" in printed
    failures = json.loads((out / "failures.json").read_text())["failed"]
    assert list(failures) == [str(broken)] and "cannot read" in failures[str(broken)]
    page = (out / "index.html").read_bytes().decode("utf-8")
    assert "broken-\\xfe.jpg" in page and "failed" in page
    assert_all_complete(out)


def test_long_names_are_written_and_names_too_long_for_the_folder_are_shortened(
    photo_dir, tmp_path, capsys
):
    """A 230-byte stem's longest file (``_overlay.png``) takes 242 bytes: written as is (the
    temporary name is 33 bytes whatever the final one). A 250-byte stem's would take 262, more
    than a folder holds: its stem is cut and tagged with a hash, and the JSON names its files."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    long_stem, longest_stem = "l" * 230, "é" * 125  # 230 and 250 bytes
    for stem, photo in ((long_stem, "coffee.png"), (longest_stem, "astronaut.png")):
        (folder / f"{stem}.png").write_bytes((photo_dir / photo).read_bytes())
    assert main(["segment", str(folder), "-o", str(out), *TINY]) == 0
    assert (out / f"{long_stem}_overlay.png").is_file() and (out / f"{long_stem}.json").is_file()
    (cut,) = [path for path in out.glob("é*.json")]
    assert len(cut.name.encode()) <= 255 - len("_overlay.png") + len(".json")
    summary = json.loads(cut.read_text())
    assert summary["image"] == str(folder / f"{longest_stem}.png")
    stem = cut.name[: -len(".json")]
    assert re.fullmatch("é+~[0-9a-f]{8}", stem)
    assert summary["files"] == {"png": f"{stem}.png", "overlay": f"{stem}_overlay.png"}
    assert all(len(name.encode()) <= 255 for name in os.listdir(out))
    capsys.readouterr()
    assert main(["segment", str(folder), "-o", str(out), *TINY, "--resume"]) == 0
    assert "2 skipped" in capsys.readouterr().out


# -- inputs that are no image file --------------------------------------------------------------


def test_inputs_that_cannot_be_read_fail_alone_and_odd_entries_are_counted(
    photo_dir, tmp_path, capsys
):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes((photo_dir / "chelsea.jpg").read_bytes())
    os.mkfifo(folder / "pipe.png")
    deleted = tmp_path / "deleted.png"
    (folder / "gone.png").symlink_to(deleted)
    (folder / "photo.avif").write_bytes(b"an AVIF")
    (folder / "logo.svg").write_text("<svg/>")
    out = tmp_path / "out"
    missing = tmp_path / "missing.jpg"
    named = [missing, folder / "ok.jpg", folder / "gone.png", folder / "pipe.png", "/dev/zero"]
    assert main(["segment", *map(str, named), "-o", str(out), *TINY]) == 1
    assert segmented_count(capsys.readouterr().out) == (1, 1)
    assert json.loads((out / "failures.json").read_text())["failed"] == {
        str(missing): "the input does not exist",
        str(folder / "gone.png"): f"the input is a broken symbolic link (to '{deleted}')",
        str(folder / "pipe.png"): "the input is a FIFO (named pipe), not a regular file",
        "/dev/zero": "the input is a character device, not a regular file",
    }
    assert (out / "ok.json").is_file()
    # in a folder, such entries are not inputs: counted in the summary, and the run succeeds
    assert main(["segment", str(folder), "-o", str(tmp_path / "out2"), *TINY]) == 0
    printed = capsys.readouterr().out
    assert (
        "4 folder entries skipped: other extensions 2 (.avif 1, .svg 1), FIFO (named pipe) 1, "
        "broken symbolic link 1; images are read from .jpg .jpeg .png" in printed
    )
    # nothing at all can run: a usage error (exit 2), said once, no folder made
    assert main(["segment", str(missing), "-o", str(tmp_path / "out3"), *TINY]) == 2
    error = capsys.readouterr().err
    assert f"nothing to segment: '{missing}': the input does not exist" in error
    assert not (tmp_path / "out3").exists()


# -- resume and settings ----------------------------------------------------------------------


def test_results_of_other_settings_are_never_resumed_nor_mixed(
    photo_dir, tmp_path, capsys, monkeypatch
):
    from freesegdiff.cli import common

    out = tmp_path / "out"
    both = [str(photo_dir / "chelsea.jpg"), str(photo_dir / "coffee.png")]
    assert main(["segment", *both, "-o", str(out), *TINY]) == 0
    manifest = json.loads((out / "freesegdiff-run.json").read_text())
    assert manifest["preset"] == "tiny" and manifest["classes"] is None
    assert (
        manifest["models"]["clip"] == "tiny:clip" and manifest["settings"]["clustering"]["k"] == 4
    )
    first = {name: (out / name).read_bytes() for name in final_files(out)}
    assert json.loads(first["coffee.json"])["settings_id"] == manifest["settings_id"]

    def no_models(*args, **kwargs):
        pytest.fail("a model was loaded for a run that is refused")

    monkeypatch.setattr(common, "pipeline_from_args", no_models)
    for options, difference in [
        (["--classes", "cat,dog", *TINY], "classes: None then, ['cat', 'dog'] now"),
        (["--k", "3", *TINY], "settings.clustering.k: 4 then, 3 now"),
        (["--preset", "paper", "--no-progress"], "settings.models.diffusion: 'tiny:stable-"),
    ]:
        for resume in ([], ["--resume"]):
            assert main(["segment", *both, "-o", str(out), *options, *resume]) == 2
            error = capsys.readouterr().err
            assert "were made with other settings" in error and difference in error
            assert "--overwrite" in error and "another --output" in error
            assert error.count("\n") == 1
    assert {name: (out / name).read_bytes() for name in final_files(out)} == first
    monkeypatch.undo()
    # what does not change outputs (the batch size, the device) resumes
    assert main(["segment", *both, "-o", str(out), *TINY, "--batch-size", "2", "--resume"]) == 0
    assert "2 skipped, already complete" in capsys.readouterr().out
    # --overwrite: this run's settings replace the folder's; an image of the old settings that
    # this run does not segment is deleted, not left beside the new results
    command = ["segment", both[0], "-o", str(out), *TINY, "--k", "3", "--overwrite"]
    assert main(command) == 0
    assert "files of other settings deleted" in capsys.readouterr().err
    manifest = json.loads((out / "freesegdiff-run.json").read_text())
    assert manifest["settings"]["clustering"]["k"] == 3
    assert json.loads((out / "chelsea.json").read_text())["settings_id"] == manifest["settings_id"]
    assert not any(name.startswith(("coffee", "thumbnails/coffee")) for name in final_files(out))
    assert "coffee" not in (out / "index.html").read_text()


# -- a full disk ------------------------------------------------------------------------------


class FullDisk:
    """``os.write`` in the atomic writer on a disk with ``room`` bytes left: a short write,
    then ENOSPC; ``room`` can be raised again (space freed)."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __call__(self, descriptor: int, data) -> int:
        count = min(len(data), self.room)
        if count == 0:
            raise OSError(28, "No space left on device")
        self.room -= count
        return os.write(descriptor, bytes(memoryview(data)[:count]))


class DiskOs:
    """The ``os`` module as the atomic writer sees it, its ``write`` replaced by ``disk``."""

    def __init__(self, disk) -> None:
        self.write = disk

    def __getattr__(self, name: str):
        return getattr(os, name)


def test_a_disk_that_fills_mid_run_fails_the_images_it_stops_and_resume_finishes(
    photo_dir, reference, tmp_path, monkeypatch, capsys
):
    """Room for the manifest and the first image's files and a little more: the next image's
    files are cut by ENOSPC, every later file too. Each image that could not be written is a
    failure with a clear message, the run files' failures are said in one line each, no file
    is published short, and after space is freed --resume gives the uninterrupted run's files."""
    import freesegdiff.io.atomic as atomic

    first = ["freesegdiff-run.json", "astronaut.png", "astronaut_overlay.png", "astronaut.json"]
    room = sum((reference / name).stat().st_size for name in first) + 2000
    out = tmp_path / "out"
    command = ["segment", str(photo_dir), "-o", str(out), *TINY, "--format", "png,coco-rle"]
    monkeypatch.setattr(atomic, "os", DiskOs(FullDisk(room)))
    assert main(command) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert segmented_count(captured.out) == (1, 4)
    assert captured.out.count("no space left on device: free some space, then run the same") == 3
    for name in ("coco_results.json", "index.html"):
        assert f"{out / name}: writing it failed: no space left on device" in captured.err
    assert "failures.json could not be written (no space left on device" in captured.err
    assert not temporaries(out)
    assert_all_complete(out)
    assert [name for name in final_files(out) if name.endswith(".json")] == first[3:] + first[:1]
    monkeypatch.undo()  # space freed
    assert main([*command, "--resume"]) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert_same_outputs(reference, out)


def _tmpfs_shell() -> list[str] | None:
    """A command prefix that runs a shell in a mount namespace of its own (where a tmpfs can be
    mounted): as root, or through a user namespace; None where neither is allowed."""
    import shutil

    if shutil.which("unshare") is None or sys.platform != "linux":
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run(
            [*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return prefix
    return None


@pytest.mark.heavy
def test_a_real_small_file_system_fills_and_resume_finishes(photo_dir, reference, tmp_path):
    """The tester's case: the output on a small tmpfs. Mounted in a mount namespace of the
    test's own: the run fills it, its files are copied out, the tmpfs is grown and the run
    resumed, all inside; then both copies are checked here."""
    prefix = _tmpfs_shell()
    if prefix is None:
        pytest.skip("no mount namespace here (unshare --mount needs root or user namespaces)")
    mount, full, resumed = tmp_path / "mount", tmp_path / "full", tmp_path / "resumed"
    for folder in (mount, full, resumed):
        folder.mkdir()
    room = sum(path.stat().st_size for path in reference.glob("astronaut*")) + 16 * 1024
    segment = [sys.executable, "-m", "freesegdiff", "segment", str(photo_dir), "-o", str(mount)]
    segment += [*TINY, "--format", "png,coco-rle"]
    script = (
        f"mount -t tmpfs -o size={room} tmpfs {mount} || exit 90; "
        f"{' '.join(segment)} > {tmp_path}/first.out 2> {tmp_path}/first.err; "
        f"echo $? > {tmp_path}/first.code; cp -a {mount}/. {full}/; "
        f"mount -o remount,size=64m {mount} || exit 91; "
        f"{' '.join(segment)} --resume > {tmp_path}/second.out 2>&1; "
        f"echo $? > {tmp_path}/second.code; cp -a {mount}/. {resumed}/"
    )
    done = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    first_err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.code").read_text().strip() == "1", first_err
    assert "Traceback" not in first_err
    assert "no space left on device" in (tmp_path / "first.out").read_text() + first_err
    assert not temporaries(full)
    assert_all_complete(full)  # nothing published short: every PNG, JPEG and JSON whole
    assert (tmp_path / "second.code").read_text().strip() == "0"
    assert_same_outputs(reference, resumed)


# -- SIGTERM ----------------------------------------------------------------------------------


@pytest.mark.heavy
def test_sigterm_is_handled_as_ctrl_c(photo_dir, reference, tmp_path):
    """What timeout, docker, systemd and Slurm send: the image in hand is finished or
    abandoned, index.html written, the resume command printed, no temporary file left, exit
    143; the resumed run equals an uninterrupted one."""
    out = tmp_path / "out"
    options = [*TINY, "--format", "png,coco-rle"]
    command = [sys.executable, "-m", "freesegdiff", "segment", str(photo_dir), "-o", str(out)]
    process = subprocess.Popen([*command, *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while _count(out, "*.json") < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # (the manifest, then the first image: three images left to do)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    errors = stderr.decode(errors="replace")
    assert process.returncode == 143, errors
    assert "terminated (SIGTERM)" in errors and "--resume" in errors and "Traceback" not in errors
    done, total = segmented_count(stdout.decode())
    assert 1 <= done < total == 4
    assert not temporaries(out)
    assert_all_complete(out)
    assert (out / "index.html").is_file() and not (out / "failures.json").exists()
    assert main(["segment", str(photo_dir), "-o", str(out), *options, "--resume"]) == 0
    assert_same_outputs(reference, out)
