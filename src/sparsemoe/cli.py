"""sparsemoe: sparse Mixture-of-Experts for PyTorch.

Run the demo, reproduce a paper's experiments, classify sentences with a converted model, list the
gates, or download a data set. Each command's --help lists its options.
"""

# Experiments (sparsemoe demo, sparsemoe reproduce NAME) get their options from their module's Config
# dataclass: one --option per field, with the field's help text, type and bounds. Argument parsing and
# process-wide settings (the number of torch threads) live here and nowhere else. An experiment module
# is imported only when its command runs or its --help is asked for, so the top-level --help is fast.

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .data._paths import LAYOUT
from .experiments import EXPERIMENTS
from .experiments.config import ConfigError, FieldType, bounds_text, field_type, help_text

DEMO_MODULE = "sparsemoe.experiments.demo"

#: RST/Sphinx markup that must not reach a terminal: ``code``, :role:`target`, `title`
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_TITLE = re.compile(r"`([^`]+)`")


def plain(text: str) -> str:
    """``text`` with reStructuredText markup removed (``x``, :class:`x`, `x` all become x)."""
    return _TITLE.sub(r"\1", _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text)))


def _escape(text: str) -> str:
    """argparse %-formats help strings: a literal % must be doubled."""
    return text.replace("%", "%%")


class _LazyParser(argparse.ArgumentParser):
    """A subcommand parser whose options are added on first use (parsing or help).

    ``sparsemoe --help`` then lists every experiment without importing any of them.
    """

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ensure_populated(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(  # type: ignore[override]  # reason: argparse's overloads differ across Pythons
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._ensure_populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._ensure_populated()
        return super().format_help()

    def format_usage(self) -> str:
        self._ensure_populated()
        return super().format_usage()


def module_docstring(module: str) -> str:
    """The docstring of ``module`` (plain text), read from its source without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"experiment module {module!r} is not importable; check its register() call")
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or module
    return plain(doc)


def _default_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _field_default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"Config field {field.name!r} has no default; every option needs one")


#: names the command line itself puts in the parsed namespace (--threads and the subcommand plumbing)
_RESERVED = frozenset({"threads", "func", "command", "experiment", "data_command"})


def option_name(field_name: str) -> str:
    """The command-line spelling of a Config field: ``num_experts`` -> ``--num-experts``."""
    return "--" + field_name.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One ``--option`` per field of the dataclass ``config_cls`` (see ``sparsemoe.experiments.config``).

    Options the user does not give are left out of the namespace, so the Config's own defaults apply.
    """
    for field in dataclasses.fields(config_cls):
        if field.name in _RESERVED:
            raise TypeError(
                f"{config_cls.__qualname__}.{field.name}: the command line uses this name; rename the field"
            )
        kind: FieldType = field_type(config_cls, field)
        default = _field_default(field)
        notes = []
        if default is not None and kind.scalar is not bool:
            notes.append(f"default: {_default_text(default)}")
        if bounds := bounds_text(field):
            notes.append(bounds)
        text = plain(help_text(field)) + (f" ({', '.join(notes)})" if notes else "")
        common: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": _escape(text)}
        if kind.scalar is bool and not kind.many:
            action = "store_true" if default is False else argparse.BooleanOptionalAction
            parser.add_argument(option_name(field.name), action=action, **common)
            continue
        if kind.many:
            common["nargs"] = "+"
        if kind.choices is not None:
            common["choices"] = kind.choices
        parser.add_argument(option_name(field.name), type=kind.scalar, **common)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """Build the Config from the parsed options; a bad value becomes an error naming its option."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    try:
        return config_cls(**given)
    except ConfigError as err:
        raise ValueError(f"argument {option_name(err.field)}: {err.problem}") from None


def _check_threads(value: int) -> int:
    if value < 1:
        raise ValueError(f"argument --threads: must be at least 1 (got {value})")
    return value


def check_out(config: Any) -> None:
    """A one-line ``ValueError`` naming ``--out`` when the output folder (or a parent of it) is a file."""
    out = getattr(config, "out", None)
    if out is None:
        return
    path = Path(out)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"argument --out: {existing} is a file, not a folder; pass another --out")


def _run_experiment(module: ModuleType, args: argparse.Namespace) -> int:
    import torch

    config = config_from_args(module.Config, args)
    check_out(config)
    torch.set_num_threads(_check_threads(args.threads))
    module.run(config)
    return 0


def _experiment_populator(module_name: str) -> Callable[[argparse.ArgumentParser], None]:
    """A callback that imports the experiment module and adds its options to ``parser``."""

    def populate(parser: argparse.ArgumentParser) -> None:
        module = importlib.import_module(module_name)
        add_config_options(parser, module.Config)
        parser.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch CPU threads (default: 1; the models are small, so more threads mostly add overhead)",
        )
        parser.set_defaults(func=lambda args: _run_experiment(module, args))

    return populate


def _cmd_gates(args: argparse.Namespace) -> int:
    from . import gates

    for name in gates.available():
        doc = plain((gates.gate_class(name).__doc__ or "").strip().splitlines()[0])
        print(f"{name:14s} {doc}")
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from .data.fetch import fetch

    print(f"wrote {fetch(args.name, args.root)}")
    return 0


def _add_experiment(sub: Any, name: str, module: str) -> None:
    doc = module_docstring(module)
    sub.add_parser(
        name,
        help=_escape(doc.splitlines()[0]),
        description=doc,  # argparse %-formats descriptions only when they contain %(prog)
        formatter_class=argparse.RawDescriptionHelpFormatter,
        populate=_experiment_populator(module),
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _cmd_predict(args: argparse.Namespace) -> int:
    from .hf.predict import predict

    for sentence, (label, probability) in zip(
        args.sentences, predict(args.model, args.sentences, max_length=args.max_length), strict=True
    ):
        print(f"{label}\t{probability:.4f}\t{sentence}")
    return 0


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from .hf.generate import upcycle_folder

    options = {
        "num_experts": args.experts, "k": args.k, "gate": args.gate, "layers": args.layers, "init": args.init,
        "drop_ratio": args.drop_ratio, "granularity": args.granularity, "scaling": args.scaling, "seed": args.seed,
        "router_bias": not args.no_router_bias,
    }  # fmt: skip
    print(upcycle_folder(args.model, args.out, **options))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .hf.generate import generate_text

    print(generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, sample=args.sample))
    return 0


def _add_causal_lm_commands(sub: Any) -> None:
    """``sparsemoe upcycle`` and ``sparsemoe generate`` (:mod:`sparsemoe.hf.generate`)."""
    up = sub.add_parser("upcycle", help="turn a causal LM's MLPs into sparse MoEs (sparsemoe.hf.upcycle) and save it")
    up.add_argument("model", type=Path, help="model folder (save_pretrained) or .gguf file (llm extra)")
    up.add_argument("--out", required=True, type=Path, help="folder to write (safetensors + sparsemoe.json)")
    up.add_argument("--experts", type=_positive_int, default=8, help="experts per layer (default 8)")
    up.add_argument("--k", type=_positive_int, default=2, help="experts per token (default 2)")
    up.add_argument("--gate", default="topk", help="gate spec (default topk; see `sparsemoe gates`)")
    up.add_argument("--layers", type=int, nargs="+", default=None, help="MLP block indices to convert (default all)")
    up.add_argument("--init", choices=["copy", "drop"], default="copy", help="expert initialisation (default copy)")
    up.add_argument("--drop-ratio", type=float, default=0.5, help="neurons re-drawn per expert by --init drop")
    up.add_argument("--granularity", type=_positive_int, default=1, help="shards per MLP (fine-grained experts)")
    up.add_argument("--scaling", choices=["down", "megatron"], default="down", help="fine-grained expert scaling")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--no-router-bias", action="store_true", help="bias-free router (for export_mixtral)")
    up.set_defaults(func=_cmd_upcycle)
    gen = sub.add_parser("generate", help="continue a prompt with a saved causal LM (dense, upcycled or GGUF)")
    gen.add_argument("--model", required=True, type=Path, help="folder written by sparsemoe upcycle, or any causal LM")
    gen.add_argument("prompt", help="text to continue")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=32)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.set_defaults(func=_cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsemoe`` parser; experiment options are added when their command is parsed."""
    parser = argparse.ArgumentParser(
        prog="sparsemoe", description=plain(__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_LazyParser)

    _add_experiment(sub, "demo", DEMO_MODULE)
    sub.add_parser("gates", help="list the available gates").set_defaults(func=_cmd_gates)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download a data set from its canonical source")
    fetch.add_argument("name", choices=sorted(LAYOUT), help="the data set")
    fetch.add_argument(
        "--root", default=None, help="parent folder (default: $SPARSEMOE_DATA_DIR, else ~/.cache/sparsemoe/data)"
    )
    fetch.set_defaults(func=_cmd_data_fetch)

    predict = sub.add_parser("predict", help="classify sentences with a saved model (sparsemoe.hf.save_moefied)")
    predict.add_argument("--model", required=True, type=Path, help="folder written by save_moefied or save_pretrained")
    predict.add_argument("sentences", nargs="+", help="sentences to classify")
    predict.add_argument(
        "--max-length", type=_positive_int, default=64, help="truncate sentences to this many tokens (default 64)"
    )
    predict.set_defaults(func=_cmd_predict)
    _add_causal_lm_commands(sub)

    reproduce = sub.add_parser("reproduce", help="run a paper experiment end to end")
    names = reproduce.add_subparsers(dest="experiment", required=True, metavar="NAME", parser_class=_LazyParser)
    for name in sorted(EXPERIMENTS):
        _add_experiment(names, name, EXPERIMENTS[name])
    return parser


def run_resumable(call: Callable[[], object], command: str) -> int:
    """Run ``call``; Ctrl-C prints one line saying how to continue and gives exit status 130.

    Experiments save each finished run (and tuning studies rerun an interrupted trial), so running
    ``command`` again continues where this one stopped: a traceback would only hide that. Returns
    ``call``'s result if it is an exit status (an ``int``), else 0.
    """
    try:
        status = call()
        return status if isinstance(status, int) else 0
    except KeyboardInterrupt:
        print(f"sparsemoe: interrupted; finished runs are saved. Continue with: {command}", file=sys.stderr, flush=True)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad argument, as argparse)."""
    args = build_parser().parse_args(argv)
    command = shlex.join(["sparsemoe", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_resumable(lambda: args.func(args), command)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"sparsemoe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
