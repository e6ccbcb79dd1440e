"""``python -m benchmarks.hf_experts``: a Hugging Face experts module under each experts implementation.

Times the experts of one Mixtral layer (``forward`` and ``forward + backward``) with transformers'
``eager`` and ``grouped_mm`` and with ``sparsemoe`` (:mod:`sparsemoe.hf.backend`), on the same
weights, hidden states and router choice, interleaved round by round (:mod:`benchmarks.timing`).
Writes ``benchmarks/RESULTS-hf-experts.md`` (and prints it): milliseconds per call (median [min-max])
and the ratio to ``eager``, on the process CPU clock by default; ``python -m benchmarks.run`` includes the
same table (family ``hf``, needs transformers).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import timing
from benchmarks.report import Section, ms, table, write_results
from benchmarks.timing import interleaved

HERE = Path(__file__).resolve().parent
IMPLEMENTATIONS = ("eager", "grouped_mm", "sparsemoe")


def experts_modules(d: int, h: int, n: int) -> dict[str, Any]:
    """One Mixtral experts module per implementation, all with the same weights."""
    import transformers

    import sparsemoe.hf  # noqa: F401  (registers "sparsemoe")

    config = transformers.MixtralConfig(
        vocab_size=32, hidden_size=d, intermediate_size=h, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=n,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.MixtralForCausalLM(config)
    modules = {}
    for name in IMPLEMENTATIONS:
        model = copy.deepcopy(base)
        model.set_experts_implementation(name)
        modules[name] = model.model.layers[0].mlp.experts
    return modules


@dataclass(frozen=True)
class HFExpertsConfig:
    """One Mixtral experts module's shape and the timing rounds."""

    tokens: int = 2048
    d_model: int = 256
    d_hidden: int = 512
    experts: int = 8
    k: int = 2
    repeats: int = 5
    min_time: float = 0.05


FULL = HFExpertsConfig()
QUICK = HFExpertsConfig(tokens=512, d_model=64, d_hidden=128, repeats=3, min_time=0.02)


def hf_experts(cfg: HFExpertsConfig) -> Section:
    """The benchmark's section of RESULTS.md (see :func:`measure`)."""
    return measure(cfg)[0]


def measure(cfg: HFExpertsConfig) -> tuple[Section, dict[str, float]]:
    """Forward and forward+backward time of each experts implementation, and its ratio to ``eager``;
    and each implementation's max abs output difference from eager's (also in the table)."""
    modules = experts_modules(cfg.d_model, cfg.d_hidden, cfg.experts)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(cfg.tokens, cfg.d_model, generator=generator)
    logits = torch.randn(cfg.tokens, cfg.experts, generator=generator)
    weights, index = torch.softmax(logits, -1).topk(cfg.k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    outputs = {name: m(hidden, index, weights).detach() for name, m in modules.items()}
    diffs = {name: (out - outputs["eager"]).abs().max().item() for name, out in outputs.items()}

    def forward(m: Any) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(hidden, index, weights)

        return run

    def train_step(m: Any) -> Callable[[], object]:
        x = hidden.clone().requires_grad_()

        def run() -> object:
            m.zero_grad(set_to_none=True)
            m(x, index, weights).square().mean().backward()
            return None

        return run

    fwd = interleaved({n: forward(m) for n, m in modules.items()}, repeats=cfg.repeats, min_time=cfg.min_time)
    bwd = interleaved({n: train_step(m) for n, m in modules.items()}, repeats=cfg.repeats, min_time=cfg.min_time)
    rows = []
    for name in IMPLEMENTATIONS:
        cells: list[object] = [name]
        for timings in (fwd, bwd):
            flag = timings.flag(name, "eager")
            cells += [ms(timings.stat(name)), f"{timings.ratio(name, 'eager').median:.2f}×{' ' + flag if flag else ''}"]
        cells.append(f"{diffs[name]:.1e}")
        rows.append(cells)
    body = (
        f"The experts of one Mixtral layer (T={cfg.tokens}, d={cfg.d_model}, h={cfg.d_hidden}, n={cfg.experts}, "
        f"k={cfg.k}) under each transformers experts implementation, on the same weights, inputs and router "
        "choice (`python -m benchmarks.hf_experts`; `sparsemoe` is registered by `import sparsemoe.hf`).\n\n"
        + table(
            [
                "implementation",
                "forward ms",
                "vs eager",
                "forward+backward ms",
                "vs eager",
                "max abs difference from eager",
            ],
            rows,
        )
    )
    return Section("Hugging Face experts backend", body), diffs


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_experts", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=FULL.tokens)
    parser.add_argument("--d-model", type=int, default=FULL.d_model)
    parser.add_argument("--d-hidden", type=int, default=FULL.d_hidden)
    parser.add_argument("--experts", type=int, default=FULL.experts)
    parser.add_argument("--k", type=int, default=FULL.k)
    parser.add_argument("--repeats", type=int, default=FULL.repeats)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=tuple(timing.CLOCKS), default="cpu", help="cpu: process CPU time (default)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-hf-experts.md", help="the markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timing.use_clock(args.clock)
    cfg = HFExpertsConfig(args.tokens, args.d_model, args.d_hidden, args.experts, args.k, args.repeats)
    diffs: dict[str, float] = {}

    def run() -> Section:
        section, found = measure(cfg)
        diffs.update(found)
        return section

    shape = (
        f"--tokens {cfg.tokens} --d-model {cfg.d_model} --d-hidden {cfg.d_hidden} --experts {cfg.experts} --k {cfg.k}"
    )
    command = (
        f"python -m benchmarks.hf_experts {shape} --repeats {cfg.repeats} --threads {args.threads} --clock {args.clock}"
    )
    text = write_results(args.out, run, command=command, threads=args.threads, repeats=cfg.repeats)
    for name, diff in diffs.items():
        print(f"max |{name} - eager| = {diff:.2e}")
    print("\n" + text)
    return args.out


if __name__ == "__main__":
    main()
