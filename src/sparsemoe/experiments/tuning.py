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

import hashlib
import json
import math
import shlex
import time
import zlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import gates
from ..atomic import atomic_write_text
from ..training import fit
from .config import ConfigError
from .progress import console, progress
from .reporting import mean_std
from .reporting.tuning import (
    SATURATED,
    Record,
    learns_sparsity,
    plot_results,
    plot_saturation,
    render_tables,
    val_active_experts,
)
from .store import RunStore, write_json

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


def study_settings(
    quick: bool, defaults: dict[str, Any], quick_changes: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """An experiment's fixed settings: ``defaults``, changed by ``quick_changes`` in quick mode, plus
    the Config fields that change what a trial computes (``epochs``, ``patience``, ...)."""
    return {**defaults, **(quick_changes if quick else {}), **fields, "quick": bool(quick)}


def trials_per_gate(gates: list[str], trials: int, defaults: dict[str, int], default: int) -> dict[str, int]:
    """``trials`` for every gate, or (``trials == 0``) each gate's default count."""
    return {g: trials or defaults.get(g, default) for g in gates}


def command_line(name: str, config: Any) -> str:
    """The ``sparsemoe reproduce`` command that reruns (and so resumes) ``config``: every field that
    differs from its default, as ``--field-name value`` (``--flag`` for a true bool)."""
    parts = [f"sparsemoe reproduce {name}"]
    for f in fields(config):
        value = getattr(config, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value == default:
            continue
        option = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(option if value else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(value, list | tuple):
            parts.append(" ".join([option, *(shlex.quote(str(v)) for v in value)]))
        else:
            parts.append(f"{option} {shlex.quote(str(value))}")
    return " ".join(parts)


def check_study_config(config: Any, gates_allowed: tuple[str, ...]) -> None:
    """Validation shared by the tuning experiments' ``Config.__post_init__``."""
    unknown = [g for g in config.gates if g not in gates_allowed]
    if unknown:
        raise ConfigError("gates", f"unknown {unknown}; choose from {' '.join(gates_allowed)}")
    if not config.gates:
        raise ConfigError("gates", "give at least one gate")
    for name in ("trials", "seeds", "epochs", "patience"):
        value = getattr(config, name, 0)
        low = 1 if name in ("seeds", "epochs") else 0
        if not isinstance(value, int) or value < low:
            raise ConfigError(name, f"must be an integer, at least {low} (got {value!r})")
    config.out = Path(config.out)


def active_experts(routing: Any) -> float:
    """Experts computed per input in the last forward: one routing, or the mean over task gates (a
    float is a count the experiment made itself, returned as it is)."""
    if isinstance(routing, float):
        return routing
    routings = routing if isinstance(routing, list) else [routing]
    return float(np.mean([r.num_pairs / max(r.num_inputs, 1) for r in routings]))


def fit_trial(
    model: Any,
    batch_loss: Callable[[Any], Any],
    num_rows: int,
    val_loss: Callable[[], float],
    settings: dict[str, Any],
    params: dict[str, Any],
    seed: int,
    on_epoch: Callable[[int, float], None],
) -> Any:
    """:func:`~sparsemoe.training.fit` as every trial of a study runs it: the study's epochs, batch
    size and patience, the trial's learning rate, early stopping with the best epoch restored."""
    return fit(
        model,
        batch_loss,
        num_rows,
        val_loss,
        epochs=settings["epochs"],
        lr=params["lr"],
        batch_size=settings["batch_size"],
        seed=seed,
        patience=settings["patience"],
        on_epoch=on_epoch,
    )


def trial_record(
    result: Any, metrics: dict[str, dict[str, Any]], last_routing: Any, active_per_epoch: list[float]
) -> Record:
    """What a ``train`` function returns: the fit's outcome, per-split metrics, experts used per input
    (at the end, and after each epoch on a fixed validation probe), the validation loss per epoch."""
    return {
        "val_loss": result.best_value,
        **metrics,
        "active_experts": active_experts(last_routing),
        "active_experts_per_epoch": active_per_epoch,
        "val_loss_per_epoch": [h["val_loss"] for h in result.history],
        "seconds": result.seconds,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
    }


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
    if gates.accepts_option(base, "gamma"):
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


def slot_seed(gate: str, slot: int) -> int:
    """The sampler seed of trial ``slot`` of ``gate``'s study: its configuration depends on nothing else."""
    return zlib.crc32(f"{gate}/{slot}".encode())


def run_gate_study(problem: Problem, gate: str, trials: int, storage: str, advance: Callable[[], None]) -> list[Record]:
    """Run (or resume) the random search of one gate until trials ``0 .. trials-1`` are finished.

    Trial ``i`` (its "slot", saved as ``record["number"]``) draws its configuration from a
    ``RandomSampler`` seeded by ``(gate, i)`` alone and trains with seed ``i``, so its record is the
    same however often the study was stopped: a trial interrupted by Ctrl-C (marked failed on the
    spot) or by a kill (left ``RUNNING`` in the database, marked failed here) is simply run again.
    One process per gate study: a ``RUNNING`` trial found at start is taken to be a dead one.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=gate, storage=storage, direction="minimize", load_if_exists=True)
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    done: dict[int, Record] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and "record" in t.user_attrs and t.datetime_start and t.datetime_complete:
            times = {"started": t.datetime_start.timestamp(), "finished": t.datetime_complete.timestamp()}
            done.setdefault(t.user_attrs["record"]["number"], {**t.user_attrs["record"], **times})
    if reused := sum(slot in done for slot in range(trials)):
        console.print(f"{gate}: reusing {reused} finished trials ({storage}); pass a new --out to search again")
    for slot in range(trials):
        if slot not in done:
            done[slot] = _run_trial(study, problem, gate, slot)
        advance()
    return [done[slot] for slot in range(trials)]


def _run_trial(study: Any, problem: Problem, gate: str, slot: int) -> Record:
    """Ask, train and tell one trial; an interrupt marks it failed (it is rerun on resume) and propagates."""
    import optuna

    study.sampler = optuna.samplers.RandomSampler(seed=slot_seed(gate, slot))
    trial = study.ask()
    started = time.time()
    try:
        params = problem.sample(trial, gate)
        try:
            record = problem.train(gate, params, slot)
        except FloatingPointError as err:  # a diverged configuration is a result, not a crash
            record = {"val_loss": math.inf, "error": str(err), "seconds": 0.0}
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    record = {"number": slot, "params": params, **record}
    trial.set_user_attr("record", record)
    if math.isfinite(record["val_loss"]):
        study.tell(trial, record["val_loss"])
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return {**record, "started": started, "finished": time.time()}


def summarise_metrics(records: list[Record], problem: Problem, part: str = "test") -> dict[str, dict[str, float]]:
    return {key: mean_std([r[part][key] for r in records]) for key, _, _ in problem.metrics}


def run_tuning(
    problem: Problem, gates: list[str], trials: dict[str, int], seeds: int, out: Path, command: str
) -> dict[str, Any]:
    """Tune every gate (``trials[gate]`` trials), retrain each best configuration over seeds, write
    results.json/table.md/PNGs. ``command`` (recorded in the results) reruns it, which resumes it.

    Rows of an earlier ``results.json`` in ``out`` (same experiment, settings and seeds) that this run
    does not tune are kept as they are, read from that file (their trials and seed runs are not
    rerun): ``--gates ple`` adds one row to a finished study. The results then list every command
    merged in ``commands``, and ``cost`` adds the earlier rows' training time and wall-clock span.
    """
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    previous = _mergeable(out / "results.json", problem, seeds)
    studies, best = _tune(problem, gates, trials, seeds, out)
    span = _span(studies, best, RunStore(out), problem)
    if previous is not None:
        kept = [g for g in previous["config"]["gates"] if g not in gates]
        console.print(f"keeping the rows {', '.join(kept)} of {out / 'results.json'} (not retrained)")
        old_studies, old_best = rows_of(previous)
        studies = {**{g: old_studies[g] for g in kept}, **studies}
        best = {**{g: old_best[g] for g in kept}, **best}
        trials = {**{g: previous["config"]["trials_per_gate"][g] for g in kept}, **trials}
        gates = [*kept, *gates]
        span += previous["cost"]["wall_clock_span_seconds"]
    summary = summarise_rows(studies, best, problem)
    saturated = {g: best[g]["saturated"] for g in gates if "saturated" in best[g]}
    # Every seed run once: a saturated pick equal to the best one shares its runs.
    seed_runs = [r for g in gates for r in best[g]["runs"]] + [
        r
        for g, pick in saturated.items()
        if pick is not None and pick["params"] != best[g]["params"]
        for r in pick["runs"]
    ]
    compute = sum(r["seconds"] for g in gates for r in studies[g]) + sum(r["seconds"] for r in seed_runs)
    commands = [*(previous.get("commands", [previous["command"]]) if previous else []), command]
    results = {
        "experiment": problem.name,
        "command": command,
        "commands": list(dict.fromkeys(commands)),
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": {**problem.config, "trials_per_gate": trials, "seeds": seeds, "gates": gates},
        "active_experts_per_epoch": {
            g: _mean_curve([r["active_experts_per_epoch"] for r in best[g]["runs"]]) for g in gates
        },
        "config_tag": config_tag(problem.config),
        "cost": {
            "training_seconds_total": compute,
            "wall_clock_span_seconds": span,
            "this_invocation_wall_seconds": time.perf_counter() - started,
        },
        "summary": summary,
        "best_runs": {g: best[g]["runs"] for g in gates},
        "saturated_runs": {g: None if pick is None else pick["runs"] for g, pick in saturated.items()},
        "trials": studies,
    }
    write_json(out / "results.json", results)
    write_report(results, out, problem.metrics)
    print(render_tables(results, problem.metrics))
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'} and PNG plots in {out}")
    return results


def write_report(results: dict[str, Any], folder: Path, metrics: list[tuple[str, str, bool]]) -> list[Path]:
    """Write table.md and the two plots into ``folder`` from ``results`` alone; returns their paths.

    ``metrics``: the study's ``(key, label, higher is better)`` columns (its ``METRICS``).
    """
    name = results["experiment"]
    paths = [folder / "table.md", folder / f"{name}.png", folder / f"{name}-experts-per-input.png"]
    atomic_write_text(paths[0], render_tables(results, metrics))
    plot_results(results, metrics, paths[1])
    plot_saturation(results, paths[2])
    return paths


def summarise_rows(
    studies: dict[str, list[Record]], best: dict[str, dict[str, Any]], problem: Problem
) -> dict[str, dict[str, Any]]:
    """``results["summary"]``: per row, the top-5% and best-configuration metrics and run statistics."""
    summary = {
        gate: {
            "top5": {"n": len(top_fraction(studies[gate])), **summarise_metrics(top_fraction(studies[gate]), problem)},
            "best": summarise_metrics(best[gate]["runs"], problem),
            "best_params": best[gate]["params"],
            **_run_stats(best[gate]["runs"]),
            "trials": len(studies[gate]),
            "diverged": sum(not math.isfinite(r["val_loss"]) for r in studies[gate]),
        }
        for gate in studies
    }
    for gate, row in best.items():
        if "saturated" in row:
            summary[gate]["saturated"] = _saturated_summary(row["saturated"], row, problem)
    return summary


def _mergeable(path: Path, problem: Problem, seeds: int) -> dict[str, Any] | None:
    """The earlier results in ``path`` whose rows a run may keep: same experiment, settings and seeds."""
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    same = (previous.get("experiment"), previous.get("config_tag"), previous.get("config", {}).get("seeds")) == (
        problem.name,
        config_tag(problem.config),
        seeds,
    )
    if not same:
        console.print(f"{path} holds another configuration (settings or seeds differ): its rows are not kept")
        return None
    return previous


def rows_of(results: dict[str, Any]) -> tuple[dict[str, list[Record]], dict[str, dict[str, Any]]]:
    """``(studies, best)`` of every row of a written ``results.json``, as :func:`_tune` returns them."""
    studies = {g: results["trials"][g] for g in results["summary"]}
    best: dict[str, dict[str, Any]] = {}
    for g, row in results["summary"].items():
        best[g] = {"params": row["best_params"], "runs": results["best_runs"][g]}
        if g in results["saturated_runs"]:
            runs = results["saturated_runs"][g]
            best[g]["saturated"] = None if runs is None else {"params": row["saturated"]["params"], "runs": runs}
    return studies, best


def _span(
    studies: dict[str, list[Record]], best: dict[str, dict[str, Any]], store: RunStore, problem: Problem
) -> float:
    """Wall-clock span of the rows tuned here (all processes): first trial start to last trial or seed run end.

    Seed runs saved before their records carried a timestamp fall back to their file's modification time.
    """
    runs = [r for row in best.values() for r in row["runs"]]
    runs += [r for row in best.values() if row.get("saturated") for r in row["saturated"]["runs"]]
    ends = [r["finished"] for rows in studies.values() for r in rows]
    ends += [r.get("finished") or store.path(RunStore.key(**_run_key(r, problem.config))).stat().st_mtime for r in runs]
    return max(ends) - min(r["started"] for rows in studies.values() for r in rows)


def _tune(
    problem: Problem, gates: list[str], trials: dict[str, int], seeds: int, out: Path
) -> tuple[dict[str, list[Record]], dict[str, dict[str, Any]]]:
    """Random search per gate, then each pick retrained over ``seeds``.

    ``best[gate]`` is the protocol's pick (lowest validation loss); for a learned-sparse gate
    ``best[gate]["saturated"]`` is also the pick among the trials that computed at most
    :data:`SATURATED` · k experts per input (``None`` when no trial did), so that the gates can
    also be compared at the same compute.
    """
    store = RunStore(out)
    studies: dict[str, list[Record]] = {}
    best: dict[str, dict[str, Any]] = {}
    k = problem.config.get("k")
    with progress() as bar:
        extra = sum(seeds for g in gates if learns_sparsity(g) and k)
        task = bar.add_task(f"{problem.name}: tuning", total=sum(trials[g] + seeds for g in gates) + extra)
        for gate in gates:
            bar.update(task, description=f"{problem.name}: {gate} random search")
            studies[gate] = run_gate_study(
                problem, gate, trials[gate], storage_url(out, gate, problem.config), lambda: bar.advance(task)
            )
            ranked = top_fraction(studies[gate], 1.0)
            if not ranked:
                raise RuntimeError(f"every trial of gate {gate!r} diverged; nothing to report")

            def retrain(params: dict[str, Any], what: str, gate: str = gate) -> list[Record]:
                bar.update(task, description=f"{problem.name}: {gate} {what} x {seeds} seeds")
                runs = []
                for seed in range(seeds):
                    runs.append(_seed_run(problem, store, gate, params, seed))
                    bar.advance(task)
                return runs

            params = ranked[0]["params"]
            best[gate] = {"params": params, "runs": retrain(params, "best config")}
            if learns_sparsity(gate) and k:
                reaching = [r for r in ranked if val_active_experts(r) <= SATURATED * k]
                if not reaching:
                    best[gate]["saturated"] = None
                    bar.advance(task, seeds)
                elif reaching[0]["params"] == params:
                    best[gate]["saturated"] = {"params": params, "runs": best[gate]["runs"]}
                    bar.advance(task, seeds)
                else:
                    pick = reaching[0]["params"]
                    best[gate]["saturated"] = {"params": pick, "runs": retrain(pick, "best saturated config")}
    return studies, best


def _seed_run(problem: Problem, store: RunStore, gate: str, params: dict[str, Any], seed: int) -> Record:
    """One seed of a picked configuration, trained once and kept in the run store."""
    key = RunStore.key(**_run_key({"gate": gate, "seed": seed, "params": params}, problem.config))
    record = store.get(key)
    if record is None:
        begun = time.time()
        record = {"gate": gate, "seed": seed, "params": params, **problem.train(gate, params, 10_000 + seed)}
        record.update(started=begun, finished=time.time())
        store.put(key, record)
    return record


def _saturated_summary(pick: dict[str, Any] | None, best: dict[str, Any], problem: Problem) -> dict[str, Any] | None:
    """The compute-parity pick of a learned-sparse gate, summarised as the best pick is."""
    if pick is None:
        return None
    return {
        "params": pick["params"],
        "same_as_best": pick["params"] == best["params"],
        "test": summarise_metrics(pick["runs"], problem),
        **_run_stats(pick["runs"]),
    }


def _run_stats(runs: list[Record]) -> dict[str, dict[str, float]]:
    """Experts per input, epochs run and best epoch (1-based) of a picked configuration's seed runs."""
    return {
        "active_experts": mean_std([r["active_experts"] for r in runs]),
        "epochs_run": mean_std([r["epochs_run"] for r in runs]),
        "best_epoch": mean_std([r["best_epoch"] + 1 for r in runs]),
    }


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """Mean over runs per epoch, over the runs still training at that epoch (early stopping ends runs)."""
    length = max((len(c) for c in curves), default=0)
    return [float(np.mean([c[e] for c in curves if len(c) > e])) for e in range(length)]
