"""The ``dynalens`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynalens", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_subparsers(dest="command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version or args.command is None:
        from dynalens._version import __version__

        print(f"dynalens {__version__}")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
