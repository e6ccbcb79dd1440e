"""The thor-convergence study's summaries, verdicts, table and curves (``c``: the study's Config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import markdown_table, mean_std, pyplot, save_figure, system_colours

#: the comparisons the study answers: (system, against it)
COMPARISONS = (("thor", "switch"), ("thor", "dense"), ("thor", "dense_rdrop"), ("switch", "dense"))


def summaries(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(by_system, summary_json)`` from the finished runs; systems in the order of the runs."""
    by_system: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for system in dict.fromkeys(r["system"] for r in runs):
        rs = [r for r in runs if r["system"] == system]
        bleu = mean_std([r["test_bleu"] for r in rs])
        hours = [r["train_seconds"] / 3600 for r in rs]
        by_system[system] = {
            "test_bleu": bleu,
            "best_update": mean_std([r["best_update"] for r in rs]),
            "agreement": {k: mean_std([r["agreement"][k] for r in rs]) for k in rs[0]["agreement"]},
            "divergence": {k: mean_std([r["divergence"][k] for r in rs]) for k in rs[0]["divergence"]},
            "capped_seeds": [r["seed"] for r in rs if r["capped"]],
        }
        summary[system] = {
            "test_bleu": bleu["mean"],
            "test_bleu_std": bleu["std"],
            "seeds": sorted(r["seed"] for r in rs),
            "best_update": by_system[system]["best_update"]["mean"],
            "train_hours": sum(hours),
            "train_cpu_hours": sum(r["train_cpu_seconds"] for r in rs) / 3600,
            "params": rs[0]["params"]["total"],
            "active_params_per_token": rs[0]["params"]["active_per_token"],
            "best_updates": [r["best_update"] for r in rs],
            "capped_seeds": by_system[system]["capped_seeds"],
            "last_interval_gains": [_last_interval_gain(r) for r in rs],
            "inference_mode": rs[0]["inference_mode"],
        }
    return by_system, summary


def _last_interval_gain(run: dict[str, Any]) -> float | None:
    """How much the validation metric rose between the run's last two evaluations: near zero (or
    below) when it had levelled off, clearly positive when the cap stopped a run still improving."""
    history = run["history"]
    if len(history) < 2:
        return None
    metric = run["metric"]
    return float(history[-1][metric] - history[-2][metric])


def verdict(summary: dict[str, Any], system: str, other: str) -> str:
    """Whether ``system`` beats ``other`` in test BLEU: only when the mean ± std intervals do not
    overlap; "inconclusive" when they do or when either has fewer than 2 seeds (no spread)."""
    a, b = summary[system], summary[other]
    diff = a["test_bleu"] - b["test_bleu"]
    numbers = (
        f"{system} {a['test_bleu']:.2f} ± {a['test_bleu_std']:.2f} vs {other} "
        f"{b['test_bleu']:.2f} ± {b['test_bleu_std']:.2f} ({len(a['seeds'])}/{len(b['seeds'])} seeds; "
        f"difference {diff:+.2f})"
    )
    if min(len(a["seeds"]), len(b["seeds"])) < 2:
        return f"{system} vs {other}: inconclusive, fewer than 2 seeds so no spread: {numbers}"
    if abs(diff) <= a["test_bleu_std"] + b["test_bleu_std"]:
        return f"{system} vs {other}: inconclusive, the mean ± std intervals overlap: {numbers}"
    return f"{system} vs {other}: {system} {'beats' if diff > 0 else 'trails'} {other}: {numbers}"


def verdicts(summary: dict[str, Any]) -> list[str]:
    """One sentence per comparison whose two systems were run."""
    return [verdict(summary, a, b) for a, b in COMPARISONS if a in summary and b in summary]


def table(
    c: Any, by_system: dict[str, Any], summary: dict[str, Any], verdicts: list[str], signature: str, num_test: int
) -> str:
    quick = " (quick smoke run, not a result)" if c.quick else ""
    title = f"# THOR at convergence vs Switch, dense and dense + R-Drop on Multi30k En-De{quick}"
    lines = [
        title,
        "",
        f"Test = test2016 ({num_test:,} sentences), beam {c.beam}, GNMT length penalty {c.length_penalty}; sacrebleu "
        f"`{signature}`; mean ± std over seeds. Recipe `{c.recipe}` (dropout {c.dropout}, AdamW weight decay "
        f"{c.weight_decay}, warm-up {c.warmup}); each run stops after {c.patience} evaluations (every {c.eval_every} "
        f"updates) without a better `{c.metric}`, or at {c.max_updates:,} updates (capped), and is reported at its "
        f"best validation checkpoint. `last {c.eval_every}-update val gain`: how much `{c.metric}` rose between "
        "each seed's last two evaluations (clearly positive: still rising when it stopped). `train CPU h`: "
        "training CPU hours (one thread, evaluations included) added over the system's runs; CPU rather than "
        "wall time, which a shared or resumed run inflates.",
        "",
    ]
    rows = [
        [
            system,
            f"{s['test_bleu']:.2f} ± {s['test_bleu_std']:.2f}",
            ", ".join(map(str, s["seeds"])),
            ", ".join(map(str, s["best_updates"])),
            ", ".join(map(str, s["capped_seeds"])) or "none",
            ", ".join("n/a" if g is None else f"{g:+.2f}" for g in s["last_interval_gains"]),
            f"{s['train_cpu_hours']:.2f}",
            f"{s['params']:,}",
            f"{s['active_params_per_token']:,}",
        ]
        for system, s in summary.items()
    ]
    headers = [
        "system",
        "test BLEU",
        "seeds",
        "best update",
        "capped seeds",
        f"last {c.eval_every}-update val gain",
        "train CPU h",
        "params",
        "active/token",
    ]
    lines.append(markdown_table(headers, rows).rstrip("\n"))
    lines += ["", "**Verdicts** (a difference counts only when the mean ± std intervals do not overlap)", ""]
    lines += [f"- {v}" for v in verdicts] or ["- no comparison: run at least two of the systems"]
    measures = [
        [system, group, key, f"{v['mean']:.4f} ± {v['std']:.4f}"]
        for system, s in by_system.items()
        for group in ("agreement", "divergence")
        for key, v in s[group].items()
    ]
    lines += ["", "**Expert-draw agreement and per-expert divergence**", ""]
    lines.append(markdown_table(["system", "group", "measure", "mean ± std"], measures).rstrip("\n"))
    lines += [
        "",
        "Agreement: thor-multi30k's measures (kl_*: symmetric KL per val target token between two passes; "
        "bleu_between_draws: greedy test output under two draws, one scored against the other). Divergence: "
        "relative distance between experts' parameters (trained, and at initialisation) and between their outputs "
        "on the same validation inputs; kl_fixed_expert_0_vs_1: every THOR layer fixed to expert 0 vs expert 1.",
    ]
    return "\n".join(lines) + "\n"


def plot(c: Any, runs: list[dict[str, Any]], path: Path) -> None:
    """Validation CE and greedy BLEU per run against updates; a star at each run's best checkpoint."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = system_colours(r["system"] for r in runs)
    for r in runs:
        h = r["history"]
        steps = [p["step"] for p in h]
        label = f"{r['system']} seed {r['seed']}"
        ax1.plot(steps, [p["val_ce"] for p in h], color=colours[r["system"]], lw=1, marker="o", ms=3, label=label)
        ax2.plot(steps, [p["val_bleu_greedy"] for p in h], color=colours[r["system"]], lw=1, marker="o", ms=3)
        best = [p for p in h if p["step"] == r["best_update"]]
        if best:
            ax2.plot([r["best_update"]], [best[0]["val_bleu_greedy"]], color=colours[r["system"]], marker="*", ms=10)
    ax1.set(xlabel="update", ylabel="val cross-entropy per token (nats)", title="Validation loss")
    ax2.set(xlabel="update", ylabel="val BLEU (greedy)", title="Validation BLEU (star: best checkpoint)")
    ax1.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"thor-convergence on Multi30k En-De{' — quick smoke run' if c.quick else ''}")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
