"""router-lm's summary, verdict, table and plots (read from the saved runs alone).

``c``: the study's ``Config`` (not imported: the study imports this module).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import fmt, fmt_value, markdown_table, mean_std, pyplot, save_figure, seed_style, system_colours

#: the keys of each system's entry in summary.json
SUMMARY_KEYS = (
    "val_ppl",
    "val_ppl_std",
    "seeds",
    "maxvio_global",
    "maxvio_batch",
    "dead_experts",
    "tokens_per_second",
    "params",
    "active_params_per_token",
)
#: the loss-free systems the claim is about, each against the auxiliary-loss baseline
CLAIM_PAIRS = (("topk_lossfree", "topk_aux"), ("sigmoid_lossfree", "topk_aux"))


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean, or ``None`` where nothing was measured (dense models have no routing)."""
    present = [v for v in values if v is not None]
    return mean_std(present)["mean"] if present else None


def summary(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{system: {val_ppl, val_ppl_std, seeds, maxvio_global, ...}}``: means over the seeds (std of the perplexity).

    Holds :data:`SUMMARY_KEYS` (summary.json) and ``experts_per_token`` (measured, for the table).
    """
    out: dict[str, dict[str, Any]] = {}
    for system in dict.fromkeys(r["system"] for r in runs):
        rs = sorted((r for r in runs if r["system"] == system), key=lambda r: r["seed"])
        ppl = mean_std([r["val_ppl"] for r in rs])
        out[system] = {
            "val_ppl": ppl["mean"],
            "val_ppl_std": ppl["std"],
            "seeds": [r["seed"] for r in rs],
            "maxvio_global": _mean([r["maxvio_global"] for r in rs]),
            "maxvio_batch": _mean([r["maxvio_batch"] for r in rs]),
            "dead_experts": _mean([r["dead_experts"] for r in rs]),
            "experts_per_token": _mean([r["experts_per_token"] for r in rs]),
            "tokens_per_second": _mean([r["tokens_per_second"] for r in rs]),
            "params": rs[0]["params"],
            "active_params_per_token": rs[0]["active_params_per_token"],
        }
    return out


def verdict(summary_: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each loss-free system vs ``topk_aux``: better balance (lower global MaxVio) and lower perplexity?

    The perplexity difference counts when it exceeds twice its standard error (seed std over
    ``sqrt(seeds)`` of each side combined): ``confirmed`` when balance is better and perplexity lower
    beyond that, ``not confirmed`` when either is worse (perplexity beyond the spread), ``inconclusive``
    otherwise (fewer than 2 seeds, or a perplexity difference within the spread).
    """
    out: dict[str, dict[str, Any]] = {}
    for free, aux in CLAIM_PAIRS:
        if free not in summary_ or aux not in summary_:
            continue
        a, b = summary_[free], summary_[aux]
        diff = a["val_ppl"] - b["val_ppl"]  # negative: loss-free is better
        na, nb = len(a["seeds"]), len(b["seeds"])
        seeds = min(na, nb)
        spread = 2 * math.sqrt(a["val_ppl_std"] ** 2 / na + b["val_ppl_std"] ** 2 / nb)
        balance_better = a["maxvio_global"] < b["maxvio_global"]
        if seeds < 2:
            reading = "inconclusive"
        elif not balance_better or diff > spread:
            reading = "not confirmed"
        elif diff < -spread:
            reading = "confirmed"
        else:
            reading = "inconclusive"
        out[f"{free} vs {aux}"] = {
            "verdict": reading,
            "ppl_difference": diff,
            "ppl_spread_2se": spread,
            "seeds": seeds,
            "maxvio_global": [a["maxvio_global"], b["maxvio_global"]],
            "balance_better": balance_better,
        }
    return out


def table(c: Any, summary_: dict[str, dict[str, Any]], verdicts: dict[str, Any], corpus: dict[str, Any]) -> str:
    """table.md: one row per system, then the verdicts and the setting."""
    headers = [
        "system", "val ppl", "seeds", "MaxVio global", "MaxVio batch", "dead experts", "experts/token (measured)",
        "tokens/CPU-s", "params", "active params/token (nominal k)",
    ]  # fmt: skip
    rows = [
        [
            name,
            fmt({"mean": s["val_ppl"], "std": s["val_ppl_std"], "n": len(s["seeds"])}, 2),
            len(s["seeds"]),
            fmt_value(s["maxvio_global"], 3),
            fmt_value(s["maxvio_batch"], 3),
            fmt_value(s["dead_experts"], 1),
            fmt_value(s["experts_per_token"], 2),
            f"{s['tokens_per_second']:,.0f}",
            f"{s['params']:,}",
            f"{s['active_params_per_token']:,}",
        ]
        for name, s in summary_.items()
    ]
    lines = [
        f"# router-lm{' (quick smoke run: not a result)' if c.quick else ''}",
        "",
        f"Decoder-only LM, {c.layers} layers, d_model {c.d_model}, dense FFN {c.d_hidden}, MoE in layers 0, 2, ... "
        f"with {c.num_experts} experts; {c.steps} steps of {c.batch_size} x {c.seq_len} tokens. Corpus: "
        f"{corpus['train_tokens']:,} training / {corpus['val_tokens']:,} validation tokens, vocabulary "
        f"{corpus['vocab_size']}. Perplexity: mean ± std over seeds; the other columns: means over seeds.",
        "",
        markdown_table(headers, rows),
        "**Claim: loss-free balancing gives better balance and lower perplexity than the auxiliary loss**",
        "",
    ]
    for pair, v in verdicts.items():
        lines.append(
            f"- {pair}: **{v['verdict']}** (perplexity difference {v['ppl_difference']:+.3f}, 2·SE spread "
            f"{v['ppl_spread_2se']:.3f}, {v['seeds']} seeds; MaxVio global {fmt_value(v['maxvio_global'][0], 3)} vs "
            f"{fmt_value(v['maxvio_global'][1], 3)})"
        )
    return "\n".join(lines) + "\n"


def plot_load(runs: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Per-expert share of the first MoE layer's training load over training, one panel per routed system (seed 0)."""
    plt = pyplot()
    shown = [r for r in runs if r["seed"] == min(x["seed"] for x in runs) and r["load_history"]]
    if not shown:
        return
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, r in zip(axes.flat, shown, strict=False):
        layer = sorted(r["load_history"][0]["load"])[0]
        steps = [p["step"] for p in r["load_history"]]
        loads = [p["load"][layer] for p in r["load_history"]]
        for e in range(len(loads[0])):
            ax.plot(steps, [load[e] / max(sum(load), 1) for load in loads], lw=1)
        ax.axhline(1 / len(loads[0]), color="k", ls=":", lw=0.8)
        ax.set_title(f"{r['system']} ({layer})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens")
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_curves(runs: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Validation perplexity (all of training, then its second half) and training-window MaxVio.

    One colour per system, one line style per seed: the systems end within a few perplexity points,
    so the middle panel zooms in on where they differ.
    """
    plt = pyplot()
    colours = system_colours(r["system"] for r in runs)
    fig, (full, late, vio_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in runs:
        h = r["history"]
        line = {"color": colours[r["system"]], "ls": seed_style(r["seed"]), "lw": 1}
        steps, ppl = [p["step"] for p in h], [p["val_ppl"] for p in h]
        full.plot(steps, ppl, **line)
        half = steps[-1] / 2
        late.plot([s for s in steps if s >= half], [v for s, v in zip(steps, ppl, strict=True) if s >= half], **line)
        vio = [(p["step"], p["routing_max_violation"]) for p in h if p["routing_max_violation"] is not None]
        if vio:
            vio_ax.plot(*zip(*vio, strict=True), **line)
    full.set(xlabel="step", ylabel="validation perplexity", yscale="log", title="validation perplexity")
    late.set(xlabel="step", ylabel="validation perplexity", title="second half of training")
    vio_ax.set(xlabel="step", ylabel="MaxVio", title="MaxVio (training window)")
    handles = [plt.Line2D([], [], color=colour, lw=2, label=s) for s, colour in colours.items()]
    handles += [plt.Line2D([], [], color="k", ls=seed_style(seed), lw=1, label=f"seed {seed}")
                for seed in sorted({r["seed"] for r in runs})]  # fmt: skip
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    save_figure(fig, path, dpi=120)
