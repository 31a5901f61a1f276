"""``python -m columnformer.sdm ...``: the ``sdm`` commands without the main CLI."""

from __future__ import annotations

import argparse
import sys

from .cli import register


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as ``sdm <command> ...`` arguments and run the handler."""
    parser = argparse.ArgumentParser(prog="python -m columnformer.sdm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sdm", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
