"""Serving the demo: the port check made before any model loads (:func:`ensure_port_free`),
and the server with every limit applied (:func:`serve_demo`)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freesegdiff.demo.app import Segmenter, build_demo
from freesegdiff.demo.limits import DemoLimits, RequestFolders
from freesegdiff.errors import ConfigError


@dataclass
class DemoServer:
    """A running demo: its Gradio app, address and request folders."""

    blocks: Any
    url: str
    folders: RequestFolders
    limits: DemoLimits

    def close(self) -> None:
        """Stop the server (Gradio empties its cache) and delete the request folders."""
        try:
            self.blocks.close(verbose=False)
        finally:
            self.folders.close()


def ensure_port_free(host: str, port: int) -> None:
    """Raise :class:`ConfigError` unless a server could listen on ``host``:``port`` now.

    Called before any model loads, so a port in use costs a second, not the loading time.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ConfigError(
            f"cannot listen on {host!r}: {error.strerror or error}; pass --host with an address "
            "of this machine (127.0.0.1, or 0.0.0.0 for every interface)"
        ) from error
    with socket.socket(family, kind, proto) as probe:
        if sys.platform != "win32":  # as uvicorn: a port in TIME_WAIT is free to listen on
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except PermissionError as error:
            raise ConfigError(
                f"not allowed to listen on port {port} on {host}: pass --port 1024 or above"
            ) from error
        except OSError as error:
            raise ConfigError(
                f"port {port} on {host} is in use: pass --port another or stop the other server"
                f" ({error.strerror or error})"
            ) from error


def serve_demo(
    pipe: Segmenter,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: Sequence[str | Path] | None = None,
    limits: DemoLimits | None = None,
    block: bool = True,
) -> DemoServer:
    """Build the app around ``pipe`` and serve it with every limit of ``limits`` applied.

    Args:
        pipe: see :func:`build_demo`.
        host, port: where to listen.
        examples: see :func:`build_demo`.
        limits: default: :class:`DemoLimits`'s.
        block: serve until interrupted (Ctrl-C) and then stop and clean up; False: return the
            running server at once (call :meth:`DemoServer.close` when done).

    Returns:
        the server (when ``block``, already closed).
    """
    limits = limits if limits is not None else DemoLimits()
    folders = RequestFolders(limits.keep_requests)
    try:
        demo = build_demo(pipe, examples=examples, limits=limits, folders=folders)
        demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
        launched = demo.launch(
            server_name=host,
            server_port=port,
            show_error=True,
            share=False,
            quiet=not block,
            prevent_thread_lock=True,
            max_file_size=limits.max_upload_bytes,
            state_session_capacity=limits.sessions,
        )
    except BaseException:
        folders.close()
        raise
    url = launched[1] if isinstance(launched, tuple) else f"http://{host}:{port}/"
    server = DemoServer(blocks=demo, url=url, folders=folders, limits=limits)
    if block:
        try:
            demo.block_thread()  # returns on Ctrl-C, having closed the server
        finally:
            server.close()
    return server
