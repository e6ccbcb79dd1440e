"""The upcycle-smollm2 study's summary, table, reading and plot, from its runs alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import fmt, markdown_table, mean_std, pyplot, save_figure, seed_style, system_colours

NAME = "upcycle-smollm2"
SYSTEMS = ("dense", "topk_copy", "topk_drop", "sigmoid_copy")


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """system -> ``{val_ppl, val_ppl_std, val_ppl_before, seeds, params, active_params_per_token,
    tokens_per_second}`` (means over seeds; ``val_ppl_std`` the sample std, 0 for one seed)."""
    summary: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        group = [r for r in runs if r["system"] == system]
        if not group:
            continue
        after = mean_std([r["val_ppl"] for r in group])
        summary[system] = {
            "val_ppl": after["mean"],
            "val_ppl_std": after["std"],
            "val_ppl_before": mean_std([r["val_ppl_before"] for r in group])["mean"],
            "seeds": len(group),
            "params": group[0]["params"],
            "active_params_per_token": group[0]["active_params_per_token"],
            "tokens_per_second": mean_std([r["tokens_per_second"] for r in group])["mean"],
        }
    return summary


def reading(results: dict[str, Any]) -> str:
    """What upcycling bought against continued dense training, in words made from the numbers."""
    summary = results["summary"]
    if "dense" not in summary:
        return "No dense run: nothing to compare the upcycled systems against.\n"
    base = summary["dense"]
    lines = [
        f"- dense: validation perplexity {base['val_ppl_before']:.3f} before, {base['val_ppl']:.3f} "
        f"± {base['val_ppl_std']:.3f} after {results['config']['train_tokens']:,} training tokens."
    ]
    for system, s in summary.items():
        if system == "dense":
            continue
        change = (s["val_ppl"] - base["val_ppl"]) / base["val_ppl"]
        spread = s["val_ppl_std"] + base["val_ppl_std"]
        if min(s["seeds"], base["seeds"]) < 2:
            verdict = f"{change:+.1%} against dense (one seed: no spread to judge the difference by)"
        elif abs(s["val_ppl"] - base["val_ppl"]) <= spread:
            verdict = "within the seeds' spread of dense (no measurable difference)"
        else:
            verdict = f"{'lower' if change < 0 else 'higher'} than dense by {abs(change):.1%}"
        lines.append(
            f"- {system}: {s['val_ppl_before']:.3f} before, {s['val_ppl']:.3f} ± {s['val_ppl_std']:.3f} after: "
            f"{verdict}; {s['params'] / base['params']:.2f}x the parameters, "
            f"{s['active_params_per_token'] / base['active_params_per_token']:.2f}x the active parameters per token, "
            f"{s['tokens_per_second'] / base['tokens_per_second']:.2f}x dense's training tokens per CPU second."
        )
    return "\n".join(lines) + "\n"


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    rows = []
    for system, s in results["summary"].items():
        after = fmt({"mean": s["val_ppl"], "std": s["val_ppl_std"], "n": s["seeds"]}, 3)
        rows.append(
            [
                system,
                f"{s['val_ppl_before']:.3f}",
                after,
                s["seeds"],
                f"{s['params'] / 1e6:.3f}M",
                f"{s['active_params_per_token'] / 1e6:.3f}M",
                f"{s['tokens_per_second']:.0f}",
            ]
        )
    quick = " (quick: tiny random model, pipeline check only)" if cfg["quick"] else ""
    layers = "every other block" if cfg["layers"] is None else f"blocks {cfg['layers']}"
    return (
        f"# {NAME}{quick}\n\nProduced by `{results['command']}` ({results['written']}). Model {cfg['model']}; "
        f"{cfg['train_tokens']:,} training tokens per run ({cfg['steps']} steps x {cfg['batch_size']} rows x "
        f"{cfg['seq_len']} tokens), Adam lr {cfg['lr']:g} with {cfg['warmup_steps']} warm-up steps, "
        f"{cfg['threads']} thread(s); upcycled: {layers}, {cfg['num_experts']} experts, k = {cfg['k']} "
        f"(Drop-Upcycling ratio {cfg['drop_ratio']:g}). Validation perplexity on {cfg['val_tokens']:,} held-out "
        "tokens (mean ± std over seeds). Speed is training tokens per CPU second of the process, over the training "
        "steps alone (no evaluation, no checkpoint writes; with one thread, the speed on a core of its own, whatever "
        "else the machine runs).\n\n"
        + markdown_table(
            [
                "system",
                "val ppl before",
                "val ppl after",
                "seeds",
                "params",
                "active params / token",
                "train tokens / CPU s",
            ],
            rows,
        )
        + "\nReading:\n\n"
        + reading(results)
    )


def plot(results: dict[str, Any], path: Path, window: int = 10) -> None:
    """Training loss per step (faint) with its ``window``-step moving average, one line per run (style per
    seed), and validation perplexity before/after per system."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    systems = list(results["summary"])
    colours = system_colours(systems)
    for i, system in enumerate(systems):
        for r in [run for run in results["runs"] if run["system"] == system]:
            losses = np.asarray(r["losses"])
            steps = np.arange(1, len(losses) + 1)
            left.plot(steps, losses, color=colours[system], lw=0.5, alpha=0.2)
            if len(losses) >= window:
                average = np.convolve(losses, np.ones(window) / window, mode="valid")  # [steps - window + 1]
                left.plot(steps[window - 1 :], average, color=colours[system], lw=1.4, ls=seed_style(r["seed"]),
                          label=f"{system} seed {r['seed']}")  # fmt: skip
        s = results["summary"][system]
        right.bar(i - 0.2, s["val_ppl_before"], width=0.4, color=colours[system], alpha=0.35,
                  label="before" if i == 0 else None)  # fmt: skip
        right.bar(i + 0.2, s["val_ppl"], width=0.4, yerr=s["val_ppl_std"], color=colours[system],
                  label="after" if i == 0 else None)  # fmt: skip
        for x, value in ((i - 0.2, s["val_ppl_before"]), (i + 0.2, s["val_ppl"])):
            right.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize=7,
                           xytext=(0, 2), textcoords="offset points")  # fmt: skip
    left.set_xlabel("training step")
    left.set_ylabel(f"training loss (LM + aux; {window}-step mean)")
    left.legend(fontsize=7, ncol=2)
    right.set_xticks(range(len(systems)), systems, fontsize=8)
    right.set_ylabel("validation perplexity")
    right.legend(fontsize=8)
    quick = " (quick)" if results["config"]["quick"] else ""
    right.set_title(f"{NAME}{quick}: before (light) and after training", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
