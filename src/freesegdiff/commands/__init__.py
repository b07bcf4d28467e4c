"""CLI subcommands: each module has ``add_parser(subparsers)`` and ``run(args) -> int``.

``COMMANDS`` lists them in the order ``freesegdiff --help`` shows them.
"""

COMMANDS = ("segment", "eval", "ablate", "bench", "demo")
