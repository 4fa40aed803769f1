"""The ``dpo-lit`` command. ``dpo-lit`` and ``dpo-lit --help`` answer at once; a subcommand loads
the CLI (:mod:`dpo_lit.cli`: torch, Lightning and transformers take seconds to import) and runs."""

from __future__ import annotations

import sys

from dpo_lit.commands import USAGE


def main() -> None:
    """Console entry point: the usage without importing torch, anything else through
    :func:`dpo_lit.cli.main` (one line and exit 2 for a user's mistake)."""
    if sys.argv[1:2] in ([], ["-h"], ["--help"]):
        print(USAGE)
        return
    from dpo_lit.cli import main as cli_main

    cli_main()
