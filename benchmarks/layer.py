"""The layer against its compute floor: our MoE vs the dense-equivalent, and vs the peers.

Dense-equivalent: ``T·k`` rows through one expert-sized network as plain GEMMs, i.e. exactly the
expert FLOPs of a top-k layer with nothing else. A ratio of 1.0 means routing, sorting, gathering,
combining and the per-expert split cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import report
from .cases import Case, dense_case, sparsemoe_case
from .peers import PEERS
from .report import Section
from .timing import Stat, interleaved, peak_allocated_bytes

KINDS = ("mlp", "swiglu")


@dataclass(frozen=True)
class Shape:
    tokens: int = 4096
    d: int = 512
    h: int = 2048
    n: int = 16
    k: int = 2

    def replace(self, **kw: int) -> Shape:
        return Shape(**{**self.__dict__, **kw})

    def __str__(self) -> str:
        return f"T={self.tokens}, d={self.d}, h={self.h}, n={self.n}, k={self.k}"


@dataclass(frozen=True)
class LayerConfig:
    shape: Shape
    repeats: int
    sweep_repeats: int
    sweep_tokens: tuple[int, ...]
    sweep_experts: tuple[int, ...]
    sweep_k: tuple[int, ...]


FULL = LayerConfig(Shape(), 7, 5, (512, 1024, 2048, 4096, 8192, 16384), (4, 8, 16, 32, 64, 128), (1, 2, 3, 4))
QUICK = LayerConfig(Shape(512, 128, 512, 8, 2), 3, 2, (256, 1024), (4, 16), (1, 2))


TIME_WHY = (
    "the n per-expert GEMMs cost ≈1.05× one big GEMM in MKL, plus the gate and the dispatch (see *Where the time goes*)"
)
PAGE_FAULT_WHY = "; with glibc defaults also the page faults of the n× larger weight gradients (see Method)"
HF_WHY = "our default gate computes noise and a balance loss that HF's router does not (see the like-for-like row)"
MEMORY_WHY = "the n experts' weight gradients (n× the dense-equivalent's); the activations peak lower than dense"


def _memory_row(case: Case, dense_peak: int, dense_grads: int) -> tuple[int, int, str, str]:
    peak = peak_allocated_bytes(case.step)
    grads = case.param_grad_bytes()
    activations = (peak - grads) / max(dense_peak - dense_grads, 1)
    return peak, grads, f"{peak / dense_peak:.2f}", f"{activations:.2f}"


def headline(cfg: LayerConfig, label: str, out_dir: Path, figure: str, peers: bool = True) -> Section:
    """Time and peak memory of one training step at the headline shape, per expert kind (peers optional)."""
    shape = cfg.shape
    lines, targets = [], []
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(KINDS), figsize=(13, 4))
    headers = [
        "layer",
        "fwd+bwd ms, median [min–max]",
        "÷ dense-equivalent",
        "÷ ours",
        "peak MiB",
        "peak ÷ dense",
        "(peak − param grads) ÷ dense",
    ]
    for kind in KINDS:
        cases = [
            dense_case(shape.tokens, shape.d, shape.h, shape.k, kind),
            sparsemoe_case(shape.tokens, shape.d, shape.h, shape.n, shape.k, kind),
        ]
        if peers:  # like for like with the peers' routers: plain softmax top-k, no noise, no aux loss
            plain = {"noisy": False, "balance_weight": 0.0}
            cases.append(sparsemoe_case(shape.tokens, shape.d, shape.h, shape.n, shape.k, kind, **plain))
        skipped = []
        for name, build in PEERS.items() if peers else ():
            peer = build(shape.tokens, shape.d, shape.h, shape.n, shape.k, kind)
            (skipped.append(f"- {name}: skipped, {peer}") if isinstance(peer, str) else cases.append(peer))
        dense, ours = cases[0].name, cases[1].name
        timings = interleaved({c.name: c.step for c in cases}, repeats=cfg.repeats)
        dense_peak = peak_allocated_bytes(cases[0].step)
        dense_grads = cases[0].param_grad_bytes()
        rows = []
        for case in cases:
            peak, _, peak_ratio, act_ratio = _memory_row(case, dense_peak, dense_grads)
            rows.append(
                [
                    case.name,
                    report.ms(timings.stat(case.name)),
                    report.ratio(timings.ratio(case.name, dense)),
                    report.ratio(timings.ratio(case.name, ours)),
                    report.mib(peak),
                    peak_ratio,
                    act_ratio,
                ]
            )
            if case.name == ours:
                ours_time, ours_peak, ours_act = timings.ratio(ours, dense), float(peak_ratio), float(act_ratio)
        ax = axes[KINDS.index(kind)]
        ratios = [timings.ratio(c.name, dense) for c in cases]
        ax.barh(
            [c.name for c in cases],
            [r.median for r in ratios],
            xerr=[[r.median - r.low for r in ratios], [r.high - r.median for r in ratios]],
            capsize=3,
        )
        ax.axvline(1.10, color="tab:red", linestyle="--", label="target 1.10")
        ax.set_xlabel("fwd+bwd time ÷ dense-equivalent (median, min–max)")
        ax.set_title(f"{kind} experts")
        ax.invert_yaxis()
        ax.legend()
        lines.append(f"**{kind}** experts ({shape}, fp32):\n\n" + report.table(headers, rows))
        lines += [*skipped, ""] if skipped else []
        targets.append(
            [
                f"{label}: fwd+bwd ≤ 1.10× dense-equivalent ({kind})",
                report.ratio(ours_time),
                report.verdict(ours_time.median <= 1.10, ours_time),
                "" if ours_time.median <= 1.10 else TIME_WHY + (PAGE_FAULT_WHY if "glibc" in label else ""),
            ]
        )
        hf = "HF Mixtral block (grouped_mm)"
        for mine in [c.name for c in cases[1:] if c.name.startswith("sparsemoe")] if hf in timings.samples else ():
            vs_hf = timings.ratio(mine, hf)
            targets.append(
                [
                    f"{label}: faster than HF grouped_mm block ({mine.removeprefix('sparsemoe (')}",
                    f"ours ÷ HF = {report.ratio(vs_hf)}",
                    report.verdict(vs_hf.median < 1.0, vs_hf),
                    "" if vs_hf.median < 1.0 else HF_WHY,
                ]
            )
        memory_note = "met" if ours_peak <= 1.3 else f"**missed**; {report.verdict(ours_act <= 1.3)} without grads"
        targets.append(
            [
                f"{label}: peak memory ≤ 1.3× dense-equivalent ({kind})",
                f"{ours_peak:.2f} (without parameter gradients: {ours_act:.2f})",
                memory_note,
                "" if ours_peak <= 1.3 else MEMORY_WHY,
            ]
        )
    body = (
        "One training step: gradients cleared, forward, backward with a fixed dense upstream gradient "
        "(plus the layer's auxiliary loss where it has one). Times interleaved round by round; ratios "
        "are per round, then median [min–max]. Peak memory: bytes allocated by the step, from "
        "`torch.profiler` allocation events (see *Method*). The parameter gradients of n experts are n× "
        "those of the one dense-equivalent network, so the last column subtracts each side's own.\n\n"
        + "\n".join(lines)
    )
    fig.suptitle(f"{shape}, fp32 — {label}")
    name = report.save(fig, out_dir, figure)
    body += f"\n![headline]({name})\n"
    return Section(f"Layer vs dense-equivalent and peers — {label}", body, [name], targets)


def _sweep(cfg: LayerConfig, param: str, values: tuple[int, ...]) -> list[tuple[int, Stat, Stat, Stat]]:
    points = []
    for value in values:
        s = cfg.shape.replace(**{param: value})
        dense = dense_case(s.tokens, s.d, s.h, s.k, "mlp")
        ours = sparsemoe_case(s.tokens, s.d, s.h, s.n, s.k, "mlp")
        t = interleaved({"dense": dense.step, "ours": ours.step}, repeats=cfg.sweep_repeats)
        points.append((value, t.ratio("ours", "dense"), t.stat("ours"), t.stat("dense")))
    return points


def sweeps(cfg: LayerConfig, out_dir: Path) -> Section:
    """Ratio to the dense-equivalent over T, n and k (``mlp`` experts, the other sizes at the headline shape)."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    parts = []
    for ax, (param, label, values) in zip(
        axes,
        (("tokens", "T (tokens)", cfg.sweep_tokens), ("n", "n (experts)", cfg.sweep_experts), ("k", "k", cfg.sweep_k)),
        strict=True,
    ):
        points = _sweep(cfg, param, values)
        rows = [[v, report.ms(o), report.ms(d), report.ratio(r)] for v, r, o, d in points]
        parts.append(f"Sweep over {label}:\n\n" + report.table([label, "ours ms", "dense ms", "ours ÷ dense"], rows))
        report.errorbar(ax, [p[0] for p in points], [p[1] for p in points], "ours ÷ dense-equivalent")
        ax.axhline(1.10, color="tab:red", linestyle="--", label="target 1.10")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("fwd+bwd time ratio")
        ax.legend()
    fig.suptitle(f"MoE (mlp) ÷ dense-equivalent, other sizes at {cfg.shape}")
    name = report.save(fig, out_dir, "layer_sweeps.png")
    body = (
        f"`mlp` experts; each point is a median of {cfg.sweep_repeats} interleaved rounds [min–max]; the other "
        f"sizes stay at {cfg.shape}.\n\n" + "\n".join(parts) + f"\n![sweeps]({name})\n"
    )
    return Section("Sweeps over T, n and k", body, [name])
