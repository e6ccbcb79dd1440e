"""``python -m benchmarks.run [--quick]``: regenerate ``benchmarks/RESULTS.md`` and its plots.

Families: the layer against its dense-equivalent and the peer libraries (time, peak memory), where
the time goes (profile), sweeps over T/n/k, gate cost and sparse-gate scaling, local search
overhead, small models (an MMoE training step at the COMET paper's scale), the Hugging Face experts
backend (``hf``: a Mixtral experts module under eager, grouped_mm and sparsemoe), and shared experts
computed as one dense MLP vs fused into the routed grouped matmul (``shared``). ``--quick`` runs
small shapes with few rounds on one thread with the CPU clock (under a minute; it prints its own
duration) and writes to
``benchmarks/quick/`` so it never overwrites the committed full results. Every measurement checks
its spread and the machine's load, repeats rounds that are too spread, and flags what stays
uncertain (see ``timing.py``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import time
from pathlib import Path

import torch

from sparsemoe.atomic import atomic_write_text

from . import bench_gates, bench_profile, bench_search, hf_experts, layer, mmoe_small, shared_experts, timing
from .report import Section, table

HERE = Path(__file__).resolve().parent
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    By default every tensor above 32 MiB is a fresh ``mmap`` whose pages fault in on first touch,
    each step again; jemalloc/tcmalloc (which PyTorch's CPU tuning guide recommends) reuse freed
    memory instead. This does the same through ``mallopt``. Returns False where it is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) and libc.mallopt(M_MMAP_MAX, 0))
    except OSError:
        return False


FAMILIES = ("headline", "profile", "sweeps", "gates", "search", "small", "hf", "shared")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds (about a minute, for CI)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default benchmarks/, quick: benchmarks/quick/)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own; --quick: 1)")
    parser.add_argument(
        "--clock",
        choices=tuple(timing.CLOCKS),
        default=None,
        help="wall: elapsed time (default); cpu: process CPU time, immune to being descheduled "
        "on a shared machine (meaningful with --threads 1; the default of --quick)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=FAMILIES,
        help="run only these families",
    )
    return parser.parse_args(argv)


def header(args: argparse.Namespace, command: str, seconds: float, reused: bool, load: list[float]) -> str:
    info = timing.machine_info()
    busy = max(load) > 1.0
    load_line = (
        f"- Machine load (1-min load average ÷ cores) at start and end: {load[0]:.1f}, {load[-1]:.1f}"
        + (" — **loaded**: more runnable processes than cores, so wall-clock ratios are uncertain" if busy else "")
        + ". Ratios whose rounds spread by more than "
        f"±{50 * timing.MAX_SPREAD:.1f}% (interquartile range) after repeated rounds are marked *(noisy)*.\n"
    )
    return (
        "# sparsemoe benchmarks\n\n"
        f"Command: `{command}` (regenerates this file and the PNGs next to it).\n\n"
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; run took {seconds / 60:.1f} min\n"
        f"- Machine: {info['cpu']}, {info['cores']} cores (shared with other jobs: compare ratios, not times)\n"
        f"- torch {info['torch']}, {info['threads']} threads, Python {info['python']}; fp32, CPU\n"
        f"- Clock: {timing.CLOCK_LABELS[args.clock]}; allocator: glibc, "
        f"{'freed memory reused after the first headline (see Method)' if reused else 'default'}\n"
        "- Peers installed with `pip install -c constraints.txt -e '.[bench]'`; missing ones are skipped with a line.\n"
        + load_line
    )


METHOD = """## Method

- **Timing**: every candidate of a comparison is called in turn, round after round (A B C A B C ...),
  after one untimed warm-up round; a ratio is computed within each round and then summarised, so a
  slow stretch on this shared machine hits both sides. Numbers are *median [min–max]* over rounds.
- **Step**: gradients cleared with `set_to_none` (what `optimizer.zero_grad()` does), forward,
  backward from a fixed random upstream gradient, plus the layer's auxiliary loss where it has one.
- **Dense-equivalent**: `T·k` rows through one expert-sized network (`F.linear`, activation,
  `F.linear`): the expert FLOPs of the MoE and nothing else.
- **Peak memory**: `torch.profiler(profile_memory=True)` records every allocation and free of
  PyTorch's CPU allocator with its size; the running sum of those events over one step, in time
  order, is the memory the step holds, and its maximum is the peak (it includes the new parameter
  gradients). This is the exact allocation peak of the op, unlike process RSS, which the C allocator's
  caching blurs.
- **Allocator**: with glibc's defaults, tensors above 32 MiB are fresh `mmap`s whose pages fault in
  on first touch at every step; the n× larger expert weight gradients make this cost more in the MoE
  than in its dense-equivalent. The first headline (ours and the dense-equivalent only) runs with the
  defaults, then `mallopt` makes glibc reuse freed memory (as jemalloc/tcmalloc do; PyTorch's CPU
  performance guide recommends them) for the second headline, with the peers, and everything after it.
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:  # a smoke run: two threads on a loaded machine took 4.4 min instead of 1
        args.threads = args.threads or 1
        args.clock = args.clock or "cpu"
    args.clock = args.clock or "wall"
    if args.threads:
        torch.set_num_threads(args.threads)
    timing.use_clock(args.clock)
    out = args.out or (HERE / "quick" if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    families = set(args.only or FAMILIES)
    layer_cfg = layer.QUICK if args.quick else layer.FULL
    gate_cfg = bench_gates.QUICK if args.quick else bench_gates.FULL
    start = time.perf_counter()
    load = [timing.load_per_core()]
    sections: list[Section] = []

    def run(name: str, fn, *fargs: object) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {name} ...", flush=True)
        sections.append(fn(*fargs))

    if "headline" in families:
        run(
            "headline (glibc default)",
            layer.headline,
            layer_cfg,
            "glibc malloc defaults",
            out,
            "layer_headline_default.png",
            False,  # the allocator's effect is about us vs the dense-equivalent; peers run once, below
        )
    reused = reuse_freed_memory()
    if "headline" in families and reused:
        run("headline (memory reused)", layer.headline, layer_cfg, "freed memory reused", out, "layer_headline.png")
    if "profile" in families:
        for kind in layer.KINDS:
            run(f"profile {kind}", bench_profile.breakdown, layer_cfg.shape, kind, layer_cfg.sweep_repeats + 2)
    if "sweeps" in families:
        run("sweeps", layer.sweeps, layer_cfg, out)
    if "gates" in families:
        run("gate cost", bench_gates.routing_cost, gate_cfg, out)
        run("sparse gates", bench_gates.sparse_gate_layers, gate_cfg, out)
    if "search" in families:
        run("local search", bench_search.local_search_overhead, layer_cfg.shape, layer_cfg.sweep_repeats, out)
    if "small" in families:
        small_cfg = mmoe_small.QUICK if args.quick else mmoe_small.FULL
        run("small models", mmoe_small.small_models, small_cfg)
        mix_shapes = mmoe_small.QUICK_MIX_SHAPES if args.quick else mmoe_small.MIX_SHAPES
        run("dense mix", mmoe_small.dense_mix_forms, small_cfg, mix_shapes)
    if "hf" in families:
        if importlib.util.find_spec("transformers") is None:
            print("hf experts backend: skipped (needs transformers: pip install 'sparsemoe[hf]')", flush=True)
        else:
            run("hf experts backend", hf_experts.hf_experts, hf_experts.QUICK if args.quick else hf_experts.FULL)
    if "shared" in families:
        run(
            "shared experts", shared_experts.shared_experts, shared_experts.QUICK if args.quick else shared_experts.FULL
        )
    load.append(timing.load_per_core())

    command = (
        "python -m benchmarks.run"
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (" --clock cpu" if args.clock == "cpu" else "")
    )
    targets = [row for s in sections for row in s.targets]
    text = header(args, command, time.perf_counter() - start, reused, load)
    text += "\nNotes on what was optimised, and why a target is missed where it is: [NOTES.md](NOTES.md).\n"
    if targets:
        text += "\n## Targets\n\n" + table(
            ["target", "where we land (median [min–max])", "status", "why, where missed"], targets
        )
    for s in sections:
        text += f"\n## {s.title}\n\n{s.body}"
    text += "\n" + METHOD
    atomic_write_text(out / "RESULTS.md", text)
    print(f"wrote {out / 'RESULTS.md'} in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
