"""The ``sparsemoe`` command line."""

from __future__ import annotations

import argparse
import sys

from . import experiments, gates


def _cmd_gates(args: argparse.Namespace) -> int:
    for name in gates.available():
        doc = (gates.gate_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {doc}")
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from .data.fetch import fetch

    print(f"wrote {fetch(args.name, args.root)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train every gate in an MMoE on two-task digits and tabulate")
    from .experiments import demo as demo_module

    demo_module.add_arguments(demo)
    demo.set_defaults(func=lambda a: demo_module.run(a) and 0)

    sub.add_parser("gates", help="list the available gates").set_defaults(func=_cmd_gates)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download a data set from its canonical source")
    fetch.add_argument("name", choices=["movielens-100k", "mnist-5k"])
    fetch.add_argument("--root", default=None, help="parent folder (default $SPARSEMOE_DATA_DIR)")
    fetch.set_defaults(func=_cmd_data_fetch)

    reproduce = sub.add_parser("reproduce", help="run a paper experiment end to end")
    names = reproduce.add_subparsers(dest="experiment", required=True, metavar="NAME")
    for name in sorted(experiments.EXPERIMENTS):
        module = experiments.load(name)
        exp = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(exp)
        exp.set_defaults(func=lambda a, m=module: m.run(a) and 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"sparsemoe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
