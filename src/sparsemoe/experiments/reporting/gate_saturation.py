"""The gate-saturation study's table, default-choosing rule and plot of experts per input over training."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ...gates import gate_class
from .common import markdown_table, pyplot, save_figure

NAME = "gate-saturation"

#: a candidate qualifies for the default when every run reaches k within this share of its steps
REACH_WITHIN = 0.05

#: ... and its mean validation accuracy is at most this far below the best candidate's
ACCURACY_MARGIN = 0.01


def choose_default(results: dict[str, Any], gate: str) -> dict[str, Any] | None:
    """The candidate ``{"gamma", "entropy_weight"}`` the module's rule picks for ``gate``, from the
    runs' validation accuracy; ``None`` when no candidate qualifies.

    Raises ``ValueError`` when the runs record no ``val_accuracy`` (runs older than the validation
    split hold only the held-out test accuracy, which must not choose a default).
    """
    runs = [r for r in results["runs"] if r["gate"] == gate]
    if not runs or any("val_accuracy" not in r for r in runs):
        raise ValueError(
            f"gate-saturation runs of {gate!r} record no val_accuracy: the default cannot be chosen from them "
            "(rerun `sparsemoe reproduce gate-saturation --fresh`)"
        )
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["gamma"], r["entropy_weight"]), []).append(r)
    accuracy = {key: sum(r["val_accuracy"] for r in group) / len(group) for key, group in groups.items()}
    best = max(accuracy.values())
    within = REACH_WITHIN * results["config"]["steps"]
    qualified = [
        key
        for key, group in groups.items()
        if all(r["steps_to_k"] is not None and r["steps_to_k"] <= within for r in group)
        and accuracy[key] >= best - ACCURACY_MARGIN
    ]
    if not qualified:
        return None
    gamma, weight = max(qualified, key=lambda key: (key[0], -key[1]))
    return {"gamma": gamma, "entropy_weight": weight}


def library_default(gate: str) -> dict[str, float]:
    """The gate's own ``{"gamma", "entropy_weight"}`` defaults, read from its constructor."""
    parameters = inspect.signature(gate_class(gate).__init__).parameters
    return {name: float(parameters[name].default) for name in ("gamma", "entropy_weight")}


def _choice_text(results: dict[str, Any]) -> str:
    """One line per gate: the default the rule picks (with its test accuracy, and whether it is the
    library's default), or why these runs cannot pick one."""
    lines = []
    for gate in results["config"]["gates"]:
        try:
            pick = choose_default(results, gate)
        except ValueError:
            lines.append(
                f"- {gate}: no choice from these runs: they record accuracy on the held-out test set only, and "
                "the rule reads validation accuracy."
            )
            continue
        default = library_default(gate)
        default_text = f"γ = {default['gamma']:g}, entropy weight {default['entropy_weight']:g}"
        if pick is None:
            lines.append(f"- {gate}: no candidate qualifies; the library's default is {default_text}.")
            continue
        (row,) = (
            s
            for s in results["summary"]
            if (s["gate"], s["gamma"], s["entropy_weight"]) == (gate, pick["gamma"], pick["entropy_weight"])
        )
        candidate = default["gamma"] in results["config"]["gammas"]
        candidate = candidate and default["entropy_weight"] in results["config"]["entropy_weights"]
        agrees = (
            "the library's default"
            if pick == default
            else f"NOT the library's default ({default_text}, "
            + ("its row is above)" if candidate else "not a candidate in these runs)")
        )
        lines.append(
            f"- {gate}: γ = {pick['gamma']:g}, entropy weight {pick['entropy_weight']:g}, {agrees}; its validation "
            f"accuracy {row['val_accuracy']['mean']:.3f}, test accuracy {row['test_accuracy']['mean']:.3f} "
            f"± {row['test_accuracy']['std']:.3f}."
        )
    return (
        f"\nDefault by the rule (largest γ whose runs all reach k on the validation set within {REACH_WITHIN:.0%} of "
        f"the steps, validation accuracy within {ACCURACY_MARGIN:g} of the best; ties: smaller entropy weight; "
        "test accuracy is reported, never used to choose):\n\n" + "\n".join(lines) + "\n"
    )


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    rows = []
    for s in results["summary"]:
        steps = s["steps_to_k"]
        rows.append(
            [
                s["gate"],
                s["gamma"],
                s["entropy_weight"],
                s["runs_reaching_k"],
                "not all runs" if steps is None else f"{steps['mean']:.0f} ± {steps['std']:.0f}",
                f"{s['final_experts']['mean']:.2f}",
                f"{s['val_accuracy']['mean']:.3f}",
                f"{s['test_experts']['mean']:.2f}",
                f"{s['test_accuracy']['mean']:.3f} ± {s['test_accuracy']['std']:.3f}",
            ]
        )
    quick = " (quick)" if cfg["quick"] else ""
    return (
        f"# {NAME}{quick}\n\nProduced by `{results['command']}` ({results['written']}). {cfg['task']}; "
        f"n = {cfg['num_experts']} experts, k = {cfg['k']}, {cfg['steps']} steps, {cfg['seeds']} seeds per candidate "
        f"(mean ± std over seeds). Experts per input are counted on the validation set after steps "
        f"{', '.join(map(str, cfg['eval_steps']))}; "
        "'steps to k' is the first count at or below k.\n\n"
        + markdown_table(
            [
                "gate",
                "gamma",
                "entropy weight",
                "runs reaching k",
                "steps to k",
                "final experts / input (val)",
                "val accuracy",
                "final experts / input (test)",
                "test accuracy",
            ],
            rows,
        )
        + _choice_text(results)
    )


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    cfg = results["config"]
    gates = cfg["gates"]
    fig, axes = plt.subplots(1, len(gates), figsize=(7.5 * len(gates), 4.2), squeeze=False)
    # Colour per γ, line style and marker per entropy weight λ: candidates whose curves coincide
    # (γ = 1 reaches k at the same step for every λ) stay apart by their markers.
    styles = [("-", "o", "full"), ("--", "x", "full"), (":", "s", "none"), ("-.", "^", "none")]
    for ax, gate in zip(axes[0], gates, strict=True):
        for i, gamma in enumerate(cfg["gammas"]):
            for m, weight in enumerate(cfg["entropy_weights"]):
                ls, marker, fill = styles[m % len(styles)]
                runs = [
                    r for r in results["runs"] if (r["gate"], r["gamma"], r["entropy_weight"]) == (gate, gamma, weight)
                ]
                for j, r in enumerate(runs):
                    steps, active = zip(*r["curve"], strict=True)
                    ax.plot(
                        steps,
                        active,
                        color=f"C{i}",
                        ls=ls,
                        marker=marker,
                        fillstyle=fill,
                        markersize=4,
                        lw=1,
                        alpha=0.8,
                        label=f"γ={gamma:g}, λ={weight:g}" if j == 0 else None,
                    )
        ax.axhline(cfg["k"], color="black", ls=":", lw=1, label=f"k = {cfg['k']}")
        ax.set_ylim(0, cfg["num_experts"] + 0.5)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(0, cfg["steps"])
        ax.set_xlabel("training step (linear to 10, log beyond)")
        ax.set_ylabel("experts computed per input (validation set)")
        quick = " (quick)" if cfg["quick"] else ""
        ax.set_title(f"{gate}{quick}: one line per seed", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
