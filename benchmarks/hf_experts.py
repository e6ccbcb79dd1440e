"""``python -m benchmarks.hf_experts``: a Hugging Face experts module under each experts implementation.

Times the experts of one Mixtral layer (``forward`` and ``forward + backward``) with transformers'
``eager`` and ``grouped_mm`` and with ``sparsemoe`` (:mod:`sparsemoe.hf.backend`), on the same
weights, hidden states and router choice, interleaved round by round (:mod:`benchmarks.timing`).
Prints a markdown table: milliseconds per call (median [min-max]) and the ratio to ``eager``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.timing import interleaved

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_experts", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modules = experts_modules(args.d_model, args.d_hidden, args.experts)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(args.tokens, args.d_model, generator=generator)
    logits = torch.randn(args.tokens, args.experts, generator=generator)
    weights, index = torch.softmax(logits, -1).topk(args.k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    outputs = {name: m(hidden, index, weights).detach() for name, m in modules.items()}
    for name, out in outputs.items():
        diff = (out - outputs["eager"]).abs().max().item()
        print(f"max |{name} - eager| = {diff:.2e}")

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

    print(
        f"\n| implementation | forward ms | vs eager | forward+backward ms | vs eager |  "
        f"(T={args.tokens}, d={args.d_model}, h={args.d_hidden}, n={args.experts}, k={args.k}, "
        f"{args.threads} thread(s), CPU)"
    )
    print("|---|---|---|---|---|")
    fwd = interleaved({n: forward(m) for n, m in modules.items()}, repeats=args.repeats, min_time=0.05)
    bwd = interleaved({n: train_step(m) for n, m in modules.items()}, repeats=args.repeats, min_time=0.05)
    for name in IMPLEMENTATIONS:
        cells = []
        for timings in (fwd, bwd):
            flag = timings.flag(name, "eager")
            cells += [
                timings.stat(name).fmt(1e3),
                f"{timings.ratio(name, 'eager').median:.2f}×{' ' + flag if flag else ''}",
            ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
