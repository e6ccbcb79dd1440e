"""The THOR / Switch / dense study's summaries, table and training curves.

``c``: the study's ``Config`` (not imported: the study imports this module).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import markdown_table, mean_std, pyplot, save_figure


def summaries(c: Any, runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    by_model: dict[str, Any] = {}
    summary_json: dict[str, Any] = {}
    for kind in c.models:
        rs = [r for r in runs if r["model"] == kind]
        if not rs:
            continue
        default = c.thor_mode if kind == "thor" else "deterministic"
        modes = {
            mode: {split: mean_std([r["bleu"][mode][split] for r in rs]) for split in ("val", "test")}
            for mode in rs[0]["bleu"]
        }
        agreement = {key: mean_std([r["agreement"][key] for r in rs]) for key in rs[0]["agreement"]}
        hours = [r["train_seconds"] / 3600 for r in rs]
        by_model[kind] = {"bleu": modes, "agreement": agreement, "train_hours_per_run": mean_std(hours)}
        summary_json[kind] = {
            "test_bleu": modes[default]["test"]["mean"],
            "test_bleu_std": modes[default]["test"]["std"],
            "seeds": sorted(r["seed"] for r in rs),
            "params": rs[0]["params"]["total"],
            "active_params_per_token": rs[0]["params"]["active_per_token"],
            "train_hours": sum(hours),
            "train_cpu_hours": sum(r["train_cpu_seconds"] for r in rs) / 3600,
            "inference_mode": default,
        }
    return by_model, summary_json


def merged_runs(c: Any, runs: list[dict[str, Any]]) -> list[str]:
    """One sentence per run trained in another output folder and copied into this study's store,
    naming any setting that differs from the study's (the folder, the seed count and the model list
    only select runs: the run store ignores them too)."""
    study = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()}
    notes = []
    for r in runs:
        trained = r.get("config", {})
        if not trained or str(trained.get("out")) == str(study["out"]):
            continue
        other = sorted(k for k in study if k not in ("out", "seeds", "models") and trained.get(k) != study[k])
        same = f"settings differ in {', '.join(other)}" if other else "every other setting is this study's"
        notes.append(
            f"{r['model']} seed {r['seed']} was trained with `--out {trained['out']}` and its record merged into "
            f"this study ({same})."
        )
    return notes


def table(
    c: Any,
    by_model: dict[str, Any],
    summary: dict[str, Any],
    signature: str,
    num_test: int,
    runs: list[dict[str, Any]] | None = None,
) -> str:
    title = f"# THOR vs Switch vs dense on Multi30k En-De{' (quick smoke run, not a result)' if c.quick else ''}"
    lines = [
        title,
        "",
        f"Test = test2016 ({num_test:,} sentences), beam {c.beam}, GNMT length penalty {c.length_penalty}; "
        f"sacrebleu `{signature}`; mean ± std over seeds. `train h`: single-thread training hours, each run's "
        f"training time on one thread added over the model's runs (runs in parallel processes overlap in wall "
        f"clock); THOR does two forward/backward passes per update. " + " ".join(merged_runs(c, runs or [])),
        "",
    ]
    rows = [
        [
            kind,
            f"{mode}{' (default)' if kind == 'thor' and mode == summary[kind]['inference_mode'] else ''}",
            f"{b['val']['mean']:.2f} ± {b['val']['std']:.2f}",
            f"{b['test']['mean']:.2f} ± {b['test']['std']:.2f}",
            b["test"]["n"],
            f"{summary[kind]['params']:,}",
            f"{summary[kind]['active_params_per_token']:,}",
            f"{summary[kind]['train_hours']:.2f}",
        ]
        for kind, s in by_model.items()
        for mode, b in s["bleu"].items()
    ]
    headers = ["model", "inference", "val BLEU", "test BLEU", "seeds", "params", "active params/token", "train h"]
    lines.append(markdown_table(headers, rows).rstrip("\n"))
    agreement = [
        [kind, key, f"{v['mean']:.4f} ± {v['std']:.4f}"]
        for kind, s in by_model.items()
        for key, v in s["agreement"].items()
    ]
    lines += ["", "**Agreement of two stochastic passes**", ""]
    lines.append(markdown_table(["model", "measure", "mean ± std"], agreement).rstrip("\n"))
    lines += [
        "",
        "kl_*: mean symmetric KL (nats) per val target token between two teacher-forced passes "
        "(dropout: dropout on; experts: a random expert per token). test_bleu_draw_*: greedy test BLEU "
        "under two draws (THOR: expert draws, no dropout; others: dropout on). bleu_between_draws: BLEU "
        "of draw 2 against draw 1 as reference (100 = identical).",
    ]
    return "\n".join(lines) + "\n"


def plot(c: Any, runs: list[dict[str, Any]], path: Path) -> None:
    """Curves per run: colour = system, marker = seed, solid = train / dashed = val. The legends
    name each system once and give the seed and split keys separately."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"dense": "tab:blue", "switch": "tab:orange", "thor": "tab:green"}
    markers = ["o", "s", "^", "D", "v"]
    for r in runs:
        h = r["history"]
        steps = [p["step"] for p in h]
        style = {"color": colours[r["model"]], "marker": markers[r["seed"] % len(markers)], "ms": 3.5, "lw": 1}
        ax1.plot(steps, [p["train_ce"] for p in h], **style)
        ax1.plot(steps, [p["val_ce"] for p in h], ls="--", fillstyle="none", **style)
        ax2.plot(steps, [p["val_bleu_greedy"] for p in h], **style)
    systems = [Line2D([], [], color=colours[m], lw=2, label=m) for m in colours if any(r["model"] == m for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    seed_keys = [
        Line2D([], [], color="0.3", marker=markers[s % len(markers)], ls="none", label=f"seed {s}") for s in seeds
    ]
    split_keys = [Line2D([], [], color="0.3", label="train"), Line2D([], [], color="0.3", ls="--", label="val")]
    ax1.set(
        xlabel="update",
        ylabel="cross-entropy per token (nats)",
        title="Loss (train: label-smoothed, pass 1; val: plain)",
    )
    ax2.set(xlabel="update", ylabel="val BLEU (greedy)", title="Validation BLEU", ylim=(0, None))
    ax1.legend(handles=systems + seed_keys + split_keys, fontsize=7, loc="upper right")  # the corners the
    ax2.legend(handles=systems + seed_keys, fontsize=7, loc="lower right")  # curves leave empty
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"THOR / Switch / dense on Multi30k En-De{' — quick smoke run' if c.quick else ''}")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
