"""The ``freesegdiff`` command line: a thin dispatcher over the commands of this package.

Each command is a module here with ``add_parser(subparsers)`` and ``run(args) -> int``;
``common.py`` holds the options and helpers they share. ``COMMANDS`` lists them in the order
``freesegdiff --help`` shows them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from freesegdiff import __version__
from freesegdiff.errors import ConfigError, FreeSegDiffError, ModelUnavailableError
from freesegdiff.infra.extras import MissingExtraError
from freesegdiff.infra.interrupts import Terminated, exit_code, signals_as_interrupts

COMMANDS = ("segment", "eval", "ablate", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per available command."""
    parser = argparse.ArgumentParser(
        prog="freesegdiff",
        description=(
            "Training-free open-vocabulary semantic segmentation with diffusion features "
            "(FreeSeg-Diff): caption -> entities, Stable Diffusion features -> k-means masks, "
            "CLIP names each mask, a dense CRF sharpens the edges."
        ),
    )
    parser.add_argument("--version", action="version", version=f"freesegdiff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"freesegdiff.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"freesegdiff.cli.{name}":
                continue  # a command not part of this install
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code.

    0: all done; 1: some work failed (the command says which); 2: a usage or set-up error
    (a setting that cannot work, a missing model or extra), reported before any work; 130:
    Ctrl-C; 143: SIGTERM (handled as Ctrl-C is: :mod:`freesegdiff.infra.interrupts`).
    """
    # A file name that is not UTF-8 (PEP 383 surrogates) must never stop a print: its bytes are
    # shown as \xNN (stderr does this already).
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        # The libraries' notices (no torchvision, deprecated arguments, weight-loading bars)
        # say nothing a user of this command can act on.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # the per-model "Loading weights" bars
        except ImportError:
            pass
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with signals_as_interrupts() as signals:
            code: int = args.run(args)
        # a command whose library swallowed the SIGTERM (the demo's server loop) still says so
        return exit_code(Terminated()) if signals.terminated and code == 0 else code
    except (ConfigError, ModelUnavailableError, MissingExtraError) as error:  # nothing ran
        print(f"freesegdiff {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FreeSegDiffError as error:
        print(f"freesegdiff {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM (Terminated)
        print("terminated" if isinstance(error, Terminated) else "interrupted", file=sys.stderr)
        return exit_code(error)
