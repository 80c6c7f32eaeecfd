"""The ``dynalens`` command line.

Each subcommand is one ``add_<name>(subparsers)`` function that builds its parser
and sets ``func``, the function ``main`` calls with the parsed arguments; to add
a subcommand, write one and list it in ``SUBCOMMANDS``. A subcommand that sets a
``passthrough`` default receives its unparsed arguments there (``train``). Heavy imports stay
inside the ``func`` so ``dynalens --help`` answers at once.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

#: Token ids of the short forward pass that measures hook shapes.
N_SHAPE_TOKENS = 4


def run_models(args: argparse.Namespace) -> int:
    """Print the models ``dynalens.load`` knows by name."""
    from dynalens.models.loading import list_models

    rows = [(r.name, r.architecture, r.size, r.description) for r in list_models()]
    print(_table(("name", "architecture", "parameters", "description"), rows))
    return 0


def run_hooks(args: argparse.Namespace) -> int:
    """Print a model's hook names with their shapes on one short sequence."""
    import torch

    from dynalens.models.loading import load

    model = load(args.model)
    names = [n for n in model.hook_dict if args.filter in n]
    if not names:
        print(f"no hook name of {args.model} contains {args.filter!r}", file=sys.stderr)
        return 1
    n_ctx = getattr(model.cfg, "n_ctx", None) or N_SHAPE_TOKENS
    tokens = torch.arange(min(N_SHAPE_TOKENS, n_ctx))[None] % model.cfg.d_vocab
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: args.filter in n)
    shapes = {name: list(value.shape) for name, value in cache.items()}
    rows = [(n, str(shapes[n]) if n in shapes else "(not fired)") for n in sorted(names, key=_natural)]
    print(f"# shapes for batch=1, pos={tokens.shape[1]}")
    print(_table(("hook", "shape"), rows))
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard with waitress."""
    from dynalens.dashboard.app import run

    limit = {} if args.cache_bytes is None else {"cache_bytes": args.cache_bytes or None}  # 0: no limit
    run(model=args.model, host=args.host, port=args.port, threads=args.threads, **limit)
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Train a zoo model (``dynalens train --help`` lists the options)."""
    from dynalens.models.train import main as train_main

    return train_main(args.passthrough)


def run_sweep(args: argparse.Namespace) -> int:
    """Run a sweep file's grid on Ray (or here with --local), streaming into its store."""
    from dynalens.probes.sweep import Sweep, read_sweep_file, sweep

    spec = read_sweep_file(args.file)
    finished = len(Sweep(spec["store"]).finished())
    if finished and not args.resume:
        print(
            f"{spec['store']} already holds {finished} finished cells: pass --resume to skip them "
            "and run the rest, or name another store",
            file=sys.stderr,
        )
        return 2
    done = sweep(**spec, ray=not args.local, address=args.address, workers=args.workers)
    counts = done.frame()["status"].value_counts().to_dict()
    print(f"{spec['store']}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return 0 if counts.get("failed", 0) == 0 else 1


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in and zoo models")
    p.set_defaults(func=run_models)


def add_hooks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hooks", help="list the hook names of a model, with shapes")
    p.add_argument("model", metavar="NAME_OR_PATH", help="built-in or zoo name, folder or .gguf file")
    p.add_argument("--filter", default="", metavar="SUBSTR", help="only names containing SUBSTR")
    p.set_defaults(func=run_hooks)


def add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="serve the dashboard (waitress, this machine only by default)")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH", help="model to open first")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--threads", type=_int_at_least(1), default=16, help="request threads (default 16)")
    p.add_argument("--cache-bytes", type=_int_at_least(0), default=None, metavar="BYTES",
                   help="size limit of the results cache, least recently used dropped first "
                        "(default 2 GiB; 0: no limit)")  # fmt: skip
    p.set_defaults(func=run_dashboard)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a zoo model", add_help=False)
    p.set_defaults(func=run_train, passthrough=[])  # main hands it every later argument


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a grid of models x prompt sets x analyses from a TOML file")
    p.add_argument("file", metavar="FILE", help="the sweep file (see dynalens.probes.sweep.read_sweep_file)")
    p.add_argument("--address", default=None, help="a running Ray cluster ('auto', 'ray://host:port')")
    p.add_argument("--workers", type=int, default=None, help="local Ray workers (default: one per core)")
    p.add_argument("--resume", action="store_true", help="skip the cells the store already holds")
    p.add_argument("--local", action="store_true", help="run the cells in this process, without Ray")
    p.set_defaults(func=run_sweep)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_models,
    add_hooks,
    add_dashboard,
    add_train,
    add_sweep,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynalens", description="Interpretability workbench for transformers, Mamba and RNNs."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not hasattr(args, "passthrough"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if hasattr(args, "passthrough"):
        args.passthrough = rest
    if args.version:
        from dynalens._version import __version__

        print(f"dynalens {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, the last one unpadded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join([str(c).ljust(w) for c, w in zip(row[:-1], widths)] + [str(row[-1])])
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _natural(name: str) -> list:
    """Sort key that puts ``blocks.10`` after ``blocks.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


if __name__ == "__main__":
    sys.exit(main())
