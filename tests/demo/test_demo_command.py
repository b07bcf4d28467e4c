"""``freesegdiff demo``'s set-up checks: each reported with exit code 2 before any model loads."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from freesegdiff.cli import common, main
from freesegdiff.cli import demo as demo_command
from freesegdiff.errors import ConfigError
from freesegdiff.infra.extras import MissingExtraError


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as loading the pipeline."""

    def fail(args: Any) -> None:
        pytest.fail("the pipeline was loaded before the set-up error was reported")

    monkeypatch.setattr(common, "pipeline_from_args", fail)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.usefixtures("no_model_loads")
def test_a_missing_gradio_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ModuleNotFoundError
    assert main(["demo", "--preset", "tiny", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        'freesegdiff demo: error: the web demo needs gradio: pip install "freesegdiff[demo]"'
    )


@pytest.mark.usefixtures("no_model_loads")
def test_an_extra_the_settings_need_is_reported_before_the_models_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("gradio", reason="the web demo needs gradio")
    for name in [name for name in sys.modules if name.split(".")[0] == "pydensecrf"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # the paper preset's CRF
    assert main(["demo", "--preset", "paper", "--port", str(_free_port())]) == 2
    assert 'pip install "freesegdiff[crf-reference]"' in capsys.readouterr().err


def test_the_missing_extra_error_is_both_kinds() -> None:
    error = demo_command.MissingDemoExtraError(MissingExtraError("demo"))
    assert isinstance(error, MissingExtraError) and isinstance(error, ConfigError)
    assert (error.feature, error.extra) == ("demo", "demo")
    assert str(error) == str(MissingExtraError("demo"))


@pytest.mark.usefixtures("no_model_loads")
def test_a_port_in_use_is_reported_before_the_models_load(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("gradio", reason="the web demo needs gradio")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = main(["demo", "--preset", "tiny", "--host", "127.0.0.1", "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"freesegdiff demo: error: port {port} on 127.0.0.1 is in use: pass --port another or "
        "stop the other server"
    )


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-upload-mb", "0"], "--max-upload-mb must be positive, got 0.0"),
        (["--queue-size", "0"], "queue_size must be at least 1, got 0 (pass --queue-size 1"),
        (["--cache-minutes", "-1"], "--cache-minutes must be positive"),
        (["--max-pixels", "0"], "limits.max_pixels must be at least 1 or null (no limit), got 0"),
        (["--examples", "no-such-photo.jpg"], "example photo 'no-such-photo.jpg' does not exist"),
        (["--port", "0"], "--port must be between 1 and 65535"),
    ],
)
def test_options_that_cannot_work_are_reported_before_the_models_load(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("gradio", reason="the web demo needs gradio")
    argv = ["demo", "--preset", "tiny", "--port", str(_free_port()), *options]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.heavy
def test_sigterm_stops_the_demo_and_removes_its_files(tmp_path: Path) -> None:
    """docker, systemd and Slurm stop a server with SIGTERM: the demo stops as on Ctrl-C, its
    request folders (under the system temporary folder) and Gradio's cached uploads are
    removed, and it exits with 143."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    gradio_client = pytest.importorskip("gradio_client")
    system_tmp, cache = tmp_path / "tmp", tmp_path / "gradio-cache"
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp), "GRADIO_TEMP_DIR": str(cache)}
    port = _free_port()
    command = [sys.executable, "-m", "freesegdiff", "demo", "--preset", "tiny", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--examples"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "the demo did not answer within 180 s"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        photo = tmp_path / "cat.png"
        from freesegdiff.demo.app import bundled_examples

        photo.write_bytes(next(p for p in bundled_examples() if p.name == "cat.jpg").read_bytes())
        client = gradio_client.Client(
            url, verbose=False, analytics_enabled=False, download_files=False
        )
        outputs = client.predict(gradio_client.handle_file(str(photo)), "", api_name="/segment")
        client.close()
        assert len(outputs) == 6
        assert list(system_tmp.glob("freesegdiff-demo-*/request-*"))  # a request's files
        assert [path for path in cache.rglob("*") if path.is_file()]  # the upload, the outputs
        server.send_signal(signal.SIGTERM)
        log = server.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 143, log
    assert "Traceback" not in log
    assert not list(system_tmp.glob("freesegdiff-demo-*")), "request folders left behind"
    assert not [path for path in cache.rglob("*") if path.is_file()], "Gradio's cache left"
