"""The COMET paper's tuning protocol, shared by the ``comet-*`` experiments.

Per gate: a random search with Optuna's ``RandomSampler`` over the gate's grid, minimising the
validation loss, stored in an SQLite file per gate under the experiment's folder
(``optuna-<gate>-<config hash>.db``) so a stopped study resumes where it stopped (``--trials`` is a target count,
not an increment) and gates can be tuned by separate processes (``--gates``) at the same time.
Reported as in the paper: the mean and standard error of the test metrics over the top 5% of
trials by validation loss; then the best trial's configuration is retrained over ``--seeds`` seeds (each run saved by
:class:`~sparsemoe.experiments.store.RunStore`) and reported as mean ± std.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import gates
from .progress import console, progress
from .report import fmt, markdown_table, mean_std
from .store import RunStore, write_json

#: one trained model: ``{"val_loss": float, "val": {metric: v}, "test": {metric: v}, "seconds": float, ...}``
Record = dict[str, Any]

PAPER_GATES = ("softmax", "hash", "topk", "dselect_k", "comet", "hash+", "topk+", "dselect_k+", "comet+")


@dataclass
class Problem:
    """What the tuning runner needs from an experiment.

    Attributes:
        name: experiment name (``comet-movielens``), used in titles and commands.
        sample: ``sample(trial, gate) -> params``: draws one configuration from the gate's grid.
        train: ``train(gate, params, seed) -> Record``: trains one model, returns val and test metrics.
        metrics: ``(key, label, higher_is_better)`` of the test metrics to tabulate; the first is the headline.
        config: everything fixed about the runs (sizes, epochs, data), saved in results.json.
    """

    name: str
    sample: Callable[[Any, str], dict[str, Any]]
    train: Callable[[str, dict[str, Any], int], Record]
    metrics: list[tuple[str, str, bool]]
    config: dict[str, Any] = field(default_factory=dict)


def experiment_config(args: argparse.Namespace, defaults: dict[str, Any], quick: dict[str, Any]) -> dict[str, Any]:
    """An experiment's fixed settings: its defaults, shrunk by ``--quick``, with the CLI's counts."""
    config = {**defaults, **(quick if args.quick else {}), "quick": bool(args.quick)}
    config["trials"] = args.trials or config["trials"]
    config["seeds"] = args.seeds or config["seeds"]
    return config


def run_experiment(
    args: argparse.Namespace,
    problem: Callable[[dict[str, Any]], Problem],
    defaults: dict[str, Any],
    quick: dict[str, Any],
) -> dict[str, Any]:
    """``sparsemoe reproduce NAME`` for a tuning experiment: tune every gate, retrain the best, report."""
    import torch

    torch.set_num_threads(1)  # a study is many small models: one thread each is the efficient use of a CPU
    config = experiment_config(args, defaults, quick)
    prob = problem(config)
    gates = args.gates or list(PAPER_GATES)
    out = args.out / "quick" if args.quick else args.out
    command = f"sparsemoe reproduce {prob.name}" + (" --quick" if args.quick else f" --trials {config['trials']}")
    return run_tuning(prob, gates, config["trials"], config["seeds"], out, command)


def trial_record(result: Any, metrics: dict[str, dict[str, Any]], last_routing: list[Any]) -> Record:
    """What a ``train`` function returns: the fit's outcome, per-split metrics, experts used per input."""
    return {
        "val_loss": result.best_val_loss,
        **metrics,
        "active_experts": float(np.mean([r.num_pairs / r.num_inputs for r in last_routing])),
        "seconds": result.seconds,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
    }


def add_tuning_arguments(parser: argparse.ArgumentParser, *, trials: int, seeds: int, out: str) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny data and trial counts (smoke test, CI)")
    parser.add_argument("--trials", type=int, default=None, help=f"random-search trials per gate (default {trials})")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds for the best configuration (default {seeds})")
    parser.add_argument("--gates", nargs="+", default=None, help=f"gates (default: {' '.join(PAPER_GATES)})")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")


def sample(config: dict[str, Any], trial: Any, gate: str) -> dict[str, Any]:
    """One configuration from the gate's grid, read from ``config`` (``lr_range``, ``gamma_grid``,
    ``comet_plus_gamma``, ``entropy_grid``, ``perm_epochs_grid``): the paper's grid per data set."""
    spec = gates.parse(gate)
    base = spec.name
    params: dict[str, Any] = {"lr": trial.suggest_float("lr", *config["lr_range"], log=True)}
    if base in ("dselect_k", "comet"):
        if base == "comet" and spec.local_search:
            params["gamma"] = config["comet_plus_gamma"]  # fixed for COMET+ in the paper
        else:
            params["gamma"] = trial.suggest_categorical("gamma", config["gamma_grid"])
        params["entropy_weight"] = trial.suggest_categorical("entropy_weight", config["entropy_grid"])
    if spec.local_search:
        params["perm_epochs"] = trial.suggest_categorical("perm_epochs", config["perm_epochs_grid"])
    return params


def gate_options(gate: str, params: dict[str, Any], k: int) -> dict[str, Any]:
    """Keyword arguments for the gates (``k`` included), as the COMET paper ran them.

    Top-k without noise or balance loss; Hash routes each input to one expert (Hash layers).
    """
    base = gates.parse(gate).name
    options: dict[str, Any] = gates.k_options(base, 1 if base == "hash" else k)
    if base == "topk":
        options.update(noisy=False, balance_weight=0.0)
    if base in ("dselect_k", "comet"):
        options.update(gamma=params["gamma"], entropy_weight=params["entropy_weight"])
    return options


def top_fraction(trials: list[Record], fraction: float = 0.05) -> list[Record]:
    """The best ``ceil(fraction · N)`` trials (at least one) by validation loss."""
    done = sorted((t for t in trials if math.isfinite(t["val_loss"])), key=lambda t: t["val_loss"])
    return done[: max(1, math.ceil(fraction * len(done)))] if done else []


def _params_key(params: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def config_tag(config: dict[str, Any]) -> str:
    """A short hash of the fixed settings: a study only resumes trials run under the same settings."""
    fixed = {k: v for k, v in config.items() if k not in ("trials", "seeds", "gates")}
    return hashlib.sha1(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _run_key(record: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """The parts of a best-configuration seed run's :class:`RunStore` key."""
    return {
        "gate": record["gate"],
        "seed": record["seed"],
        "params": _params_key(record["params"]),
        "config": config_tag(config),
    }


def storage_url(out: Path, gate: str, config: dict[str, Any]) -> str:
    """The Optuna SQLite storage of one gate's study under one configuration."""
    return f"sqlite:///{(out / f'optuna-{gate}-{config_tag(config)}.db').resolve()}"


def run_gate_study(problem: Problem, gate: str, trials: int, storage: str, advance: Callable[[], None]) -> list[Record]:
    """Run (or resume) the random search of one gate until it has ``trials`` finished trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=gate, storage=storage, direction="minimize", load_if_exists=True)
    finished = [t for t in study.trials if t.state.is_finished() and "record" in t.user_attrs]
    for _ in finished[:trials]:
        advance()
    # A fresh sampler seed per resume, so a resumed study does not redraw the configurations it has.
    study.sampler = optuna.samplers.RandomSampler(seed=zlib.crc32(gate.encode()) + len(finished))
    while len(finished) < trials:
        trial = study.ask()
        params = problem.sample(trial, gate)
        try:
            record = problem.train(gate, params, trial.number)
        except FloatingPointError as err:  # a diverged configuration is a result, not a crash
            record = {"val_loss": math.inf, "error": str(err), "seconds": 0.0}
        record = {"number": trial.number, "params": params, **record}
        trial.set_user_attr("record", record)
        if math.isfinite(record["val_loss"]):
            study.tell(trial, record["val_loss"])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        finished.append(trial)
        advance()
    records = [
        {**t.user_attrs["record"], "started": t.datetime_start.timestamp(), "finished": t.datetime_complete.timestamp()}
        for t in study.trials
        if t.state.is_finished() and "record" in t.user_attrs
    ]
    return sorted(records, key=lambda r: r["number"])[:trials]


def summarise_metrics(records: list[Record], problem: Problem, part: str = "test") -> dict[str, dict[str, float]]:
    return {key: mean_std([r[part][key] for r in records]) for key, _, _ in problem.metrics}


def run_tuning(problem: Problem, gates: list[str], trials: int, seeds: int, out: Path, command: str) -> dict[str, Any]:
    """Tune every gate, retrain each best configuration over seeds, write results.json/table.md/PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out)
    started = time.perf_counter()
    studies: dict[str, list[Record]] = {}
    best: dict[str, dict[str, Any]] = {}
    with progress() as bar:
        task = bar.add_task(f"{problem.name}: tuning", total=len(gates) * (trials + seeds))
        for gate in gates:
            bar.update(task, description=f"{problem.name}: {gate} random search")
            studies[gate] = run_gate_study(
                problem, gate, trials, storage_url(out, gate, problem.config), lambda: bar.advance(task)
            )
            ranked = top_fraction(studies[gate], 1.0)
            if not ranked:
                raise RuntimeError(f"every trial of gate {gate!r} diverged; nothing to report")
            params = ranked[0]["params"]
            runs = []
            bar.update(task, description=f"{problem.name}: {gate} best config x {seeds} seeds")
            for seed in range(seeds):
                key = RunStore.key(**_run_key({"gate": gate, "seed": seed, "params": params}, problem.config))
                record = store.get(key)
                if record is None:
                    record = {
                        "gate": gate,
                        "seed": seed,
                        "params": params,
                        **problem.train(gate, params, 10_000 + seed),
                    }
                    store.put(key, record)
                runs.append(record)
                bar.advance(task)
            best[gate] = {"params": params, "runs": runs}
    summary = {
        gate: {
            "top5": {"n": len(top_fraction(studies[gate])), **summarise_metrics(top_fraction(studies[gate]), problem)},
            "best": summarise_metrics(best[gate]["runs"], problem),
            "best_params": best[gate]["params"],
            "active_experts": mean_std([r["active_experts"] for r in best[gate]["runs"]]),
            "trials": len(studies[gate]),
            "diverged": sum(not math.isfinite(r["val_loss"]) for r in studies[gate]),
        }
        for gate in gates
    }
    compute = sum(r["seconds"] for g in gates for r in studies[g]) + sum(
        r["seconds"] for g in gates for r in best[g]["runs"]
    )
    # Wall-clock span of the whole study (all processes): first trial start to last trial or seed run end.
    # Seed runs saved before their records carried a timestamp fall back to their file's modification time.
    ends = [r["finished"] for g in gates for r in studies[g]]
    ends += [
        r.get("finished") or store.path(RunStore.key(**_run_key(r, problem.config))).stat().st_mtime
        for g in gates
        for r in best[g]["runs"]
    ]
    span = max(ends) - min(r["started"] for g in gates for r in studies[g])
    results = {
        "experiment": problem.name,
        "command": command,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": {**problem.config, "trials_per_gate": trials, "seeds": seeds, "gates": gates},
        "config_tag": config_tag(problem.config),
        "cost": {
            "training_seconds_total": compute,
            "wall_clock_span_seconds": span,
            "this_invocation_wall_seconds": time.perf_counter() - started,
        },
        "summary": summary,
        "best_runs": {g: best[g]["runs"] for g in gates},
        "trials": studies,
    }
    write_json(out / "results.json", results)
    text = render_tables(results, problem.metrics)
    (out / "table.md").write_text(text)
    plot_results(results, problem.metrics, out / f"{problem.name}.png")
    print(text)
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / (problem.name + '.png')}")
    return results


def _sem(stat: dict[str, float], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sem']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def render_tables(results: dict[str, Any], metrics: list[tuple[str, str, bool]]) -> str:
    """The Markdown of table.md: top-5% (mean ± SE) and best configuration over seeds (mean ± std)."""
    cfg, summary = results["config"], results["summary"]
    headers = ["gate", *(label for _, label, _ in metrics)]
    top = [[g, *(_sem(s["top5"][k]) for k, _, _ in metrics)] for g, s in summary.items()]
    best = [
        [g, *(fmt(s["best"][k]) for k, _, _ in metrics), f"{s['active_experts']['mean']:.2f}"]
        for g, s in summary.items()
    ]
    n_top = {s["top5"]["n"] for s in summary.values()}
    hours = results["cost"]["training_seconds_total"] / 3600
    return (
        f"# {results['experiment']}\n\nProduced by `{results['command']}` ({results['written']}); "
        f"{cfg['trials_per_gate']} random-search trials per gate, best configuration retrained over "
        f"{cfg['seeds']} seeds; total training time {hours:.2f} h (single thread).\n\n"
        f"## Test metrics over the top 5% of trials by validation loss (mean ± standard error, "
        f"{'/'.join(map(str, sorted(n_top)))} trials)\n\n"
        + markdown_table(headers, top)
        + f"\n## Test metrics at the best configuration, {cfg['seeds']} seeds (mean ± std)\n\n"
        + markdown_table([*headers, "experts / input"], best)
    )


def plot_results(results: dict[str, Any], metrics: list[tuple[str, str, bool]], path: Path) -> None:
    """Headline metric per gate (top-5% and best-config) and the validation-loss spread of all trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, _ = metrics[0]
    summary, trials = results["summary"], results["trials"]
    names = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(names))
    top = [summary[g]["top5"][key] for g in names]
    bst = [summary[g]["best"][key] for g in names]
    ax1.bar(x - 0.2, [s["mean"] for s in top], 0.4, yerr=[s["sem"] for s in top], capsize=3, label="top 5% (± SE)")
    ax1.bar(x + 0.2, [s["mean"] for s in bst], 0.4, yerr=[s["std"] for s in bst], capsize=3, label="best cfg (± std)")
    lows = [s["mean"] for s in top + bst]
    ax1.set_ylim(min(lows) - 0.02 * abs(min(lows)) - 0.01, max(lows) + 0.02 * abs(max(lows)) + 0.01)
    ax1.set_xticks(x, names, rotation=35)
    ax1.set_ylabel(f"test {label}")
    ax1.legend()
    ax1.set_title(results["experiment"])
    losses = [[t["val_loss"] for t in trials[g] if math.isfinite(t["val_loss"])] for g in names]
    ax2.boxplot(losses, tick_labels=names)
    ax2.tick_params(axis="x", rotation=35)
    ax2.set_ylabel("validation loss of each trial")
    ax2.set_title("random-search trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
