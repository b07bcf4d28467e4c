"""Load for the demo's load test, run in its own process: N gradio_client clients at once.

    python load_clients.py URL PHOTO SECONDS CLIENTS

Each client thread sends Segment requests one after another until SECONDS have passed, each from
a new Client (a new session, as a new visitor), and sorts every outcome: ``answered`` (all six
outputs came back), ``busy`` (Gradio's queue-full refusal) or ``unexpected`` (anything else,
with its text). After a refusal it waits a moment before trying again, as a person would. The
counts are printed as one JSON line on stdout.

A separate process, so that the server's memory, measured by the test, holds only the server.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

REQUEST_TIMEOUT_S = 120.0  # one request waits at most this long for its answer
BACKOFF_S = 1.0  # after a busy refusal


def one_request(url: str, photo: str, classes: str) -> str:
    """One request from a new session: ``answered``, ``busy`` or ``unexpected: <text>``."""
    client = Client(
        url,
        verbose=False,
        analytics_enabled=False,
        download_files=False,  # the outputs stay on the server: nothing left in /tmp here
        httpx_kwargs={"timeout": REQUEST_TIMEOUT_S},
    )
    try:
        job = client.submit(handle_file(photo), classes, api_name="/segment")
        outputs: Any = job.result(timeout=REQUEST_TIMEOUT_S)
    except QueueError as error:
        return "busy" if "queue is full" in str(error).lower() else f"unexpected: {error!r}"
    except AppError as error:
        return f"unexpected: the app refused a good request: {error}"
    except Exception as error:  # any other failure is the test's to report
        return f"unexpected: {type(error).__name__}: {error}"
    finally:
        client.close()
    if not (isinstance(outputs, tuple) and len(outputs) == 6 and isinstance(outputs[1], str)):
        return f"unexpected: outputs {outputs!r:.300}"
    return "answered"


def main(argv: list[str]) -> int:
    """Run the load described by ``argv`` (see the module docstring); print the counts."""
    url, photo, seconds, clients = argv[0], argv[1], float(argv[2]), int(argv[3])
    deadline = time.monotonic() + seconds
    counts = {"answered": 0, "busy": 0}
    unexpected: list[str] = []
    lock = threading.Lock()

    def work(index: int) -> None:
        number = 0
        while time.monotonic() < deadline:
            number += 1
            outcome = one_request(url, photo, "cat, sofa" if (index + number) % 2 else "")
            with lock:
                if outcome in counts:
                    counts[outcome] += 1
                else:
                    unexpected.append(outcome)
            if outcome == "busy":
                time.sleep(BACKOFF_S)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({**counts, "unexpected": unexpected}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
