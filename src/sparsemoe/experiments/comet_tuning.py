"""COMET paper's tuning-budget claim: Top-k vs Top-k+ and Hash vs Hash+ as a function of random-search trials.

Reuses the MovieLens random-search trials of ``comet-movielens`` (the same Optuna studies in the same
folder, so nothing is trained twice; missing trials are run and saved there). For a budget of ``m``
trials drawn with replacement from the ``N`` run (Dodge et al. 2019, "expected validation
performance"), three curves per gate:

* the expected best validation loss (the search objective, both tasks);
* the expected best validation ROC-AUC of task 1;
* the expected TEST ROC-AUC of the trial the protocol picks, i.e. the one with the lowest
  validation loss among the ``m`` (the paper selects by validation loss).

Each expectation is exact, from the order statistics of the validation loss (or AUC):
``P(rank i is the best of m) = ((N-i)/N)^m - ((N-i-1)/N)^m`` (ranks from 0; diverged trials never
win). Each band is the 5-95% range of the same quantity over 2,000 bootstrap resamples of ``m``
trials: it shows how much the best (or picked) trial varies between searches of that size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..data import data_dir, movielens
from . import comet_movielens
from .config import ConfigError
from .progress import console, progress
from .reporting.comet_tuning import BOOTSTRAP, NAME, PAIRS, RATIO_BOOTSTRAP, SCORES, plot, render
from .store import write_json
from .tuning import command_line, run_gate_study, storage_url

QUICK_TRIALS = 2


@dataclass
class Config:
    quick: bool = field(default=False, metadata={"help": "use (or run) the quick comet-movielens studies"})
    out: Path = field(default=Path(f"results/{NAME}"), metadata={"help": "output folder"})
    trials: int = field(
        default=0, metadata={"help": "trials per gate (0: comet-movielens' 100; quick: 2); missing ones are run"}
    )
    movielens_out: Path = field(
        default=Path("results/comet-movielens"), metadata={"help": "comet-movielens output folder (its studies)"}
    )
    epochs: int = field(default=60, metadata={"help": "as comet-movielens --epochs (must match its studies)"})
    patience: int = field(default=10, metadata={"help": "as comet-movielens --patience (must match its studies)"})

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 0:
            raise ConfigError("trials", f"must be an integer, at least 0 (0: the default; got {self.trials!r})")
        self.out, self.movielens_out = Path(self.out), Path(self.movielens_out)
        self.movielens_config()  # validates epochs and patience

    def movielens_config(self) -> comet_movielens.Config:
        """The comet-movielens configuration whose studies this one reads."""
        return comet_movielens.Config(
            quick=self.quick,
            out=self.movielens_out,
            gates=[g for pair in PAIRS for g in pair],
            trials=self.trials,
            epochs=self.epochs,
            patience=self.patience,
        )


def scores(records: list[dict[str, Any]], name: str) -> np.ndarray:
    """``[N]`` one number per trial: its val loss, val AUC or test AUC; NaN for a diverged trial."""
    out = []
    for r in records:
        if not math.isfinite(r["val_loss"]):
            out.append(math.nan)
        elif name == "val_loss":
            out.append(r["val_loss"])
        else:
            out.append(r["val" if name == "val_auc" else "test"]["auc"])
    return np.array(out, dtype=float)


def expected_at_pick(key: np.ndarray, payoff: np.ndarray, budgets: np.ndarray, higher: bool) -> np.ndarray:
    """``E[payoff of the trial with the best key among m drawn with replacement]`` for each ``m``.

    Exact: with ranks by ``key`` (0 = best; NaN keys never win), rank ``i`` is the best of ``m``
    draws with probability ``((N-i)/N)^m - ((N-i-1)/N)^m``; conditioned on a finite draw.
    """
    n = len(key)
    finite = np.flatnonzero(np.isfinite(key))
    order = finite[np.argsort(key[finite], kind="stable")]
    if higher:
        order = order[::-1]
    i = np.arange(len(order))[None, :]
    m = budgets[:, None].astype(float)
    win = ((n - i) / n) ** m - ((n - i - 1) / n) ** m  # [budgets, ranked]
    return (win * payoff[order]).sum(1) / win.sum(1)


def expected_best(values: np.ndarray, budgets: np.ndarray, higher: bool) -> np.ndarray:
    """``E[best of m values drawn with replacement]`` for each ``m`` in ``budgets`` (NaNs never win)."""
    return expected_at_pick(values, values, budgets, higher)


def bootstrap_band(
    key: np.ndarray, budgets: np.ndarray, higher: bool, payoff: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """``[2, len(budgets)]``: 5th and 95th percentile over resamples of ``m`` trials of the payoff of
    the trial with the best key (``payoff=None``: the best key itself)."""
    payoff = key if payoff is None else payoff
    rng = np.random.default_rng(seed)
    ranked = np.where(np.isfinite(key), -key if higher else key, np.inf)  # lower is better; NaN never wins
    band = np.full((2, len(budgets)), np.nan)
    for j, m in enumerate(budgets):
        draws = rng.integers(0, len(key), size=(BOOTSTRAP, int(m)))
        picked = draws[np.arange(BOOTSTRAP), ranked[draws].argmin(1)]
        values = payoff[picked][np.isfinite(key[picked])]  # drop resamples where every draw diverged
        if values.size:
            band[:, j] = np.percentile(values, [5, 95])
    return band


def budget_to_reach(curve: np.ndarray, budgets: np.ndarray, target: float, higher: bool) -> int | None:
    """Smallest ``m`` whose expected score reaches ``target`` (``None``: never within the trials)."""
    hits = np.flatnonzero(curve >= target - 1e-12) if higher else np.flatnonzero(curve <= target + 1e-12)
    return int(budgets[hits[0]]) if hits.size else None


Trials = tuple[np.ndarray, np.ndarray]  # one gate's trials: (key the pick is made by, payoff scored)


def needed_ratio(need_plain: int | None, need_plus: int | None) -> float:
    """Trials the plain gate needs over trials the "+" gate needs for the same target; 0 when either
    never reaches it within the trials run."""
    return 0.0 if need_plus is None or need_plain is None else need_plain / need_plus


def trials_ratio(plain: Trials, plus: Trials, budgets: np.ndarray, key_higher: bool, higher: bool) -> float:
    """:func:`needed_ratio` for the plain gate's expected payoff at the full budget."""
    curve_plain = expected_at_pick(*plain, budgets, key_higher)
    curve_plus = expected_at_pick(*plus, budgets, key_higher)
    target = float(curve_plain[-1])
    return needed_ratio(*(budget_to_reach(c, budgets, target, higher) for c in (curve_plain, curve_plus)))


def ratio_band(
    plain: Trials,
    plus: Trials,
    budgets: np.ndarray,
    key_higher: bool,
    higher: bool,
    resamples: int = RATIO_BOOTSTRAP,
    seed: int = 0,
) -> list[float]:
    """5th and 95th percentile of :func:`trials_ratio` over resamples of each gate's ``N`` trials
    (resamples in which every trial of a gate diverged are skipped)."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(resamples):
        drawn = []
        for key, payoff in (plain, plus):
            rows = rng.integers(0, len(key), size=len(key))
            drawn.append((key[rows], payoff[rows]))
        if all(np.isfinite(key).any() for key, _ in drawn):
            ratios.append(trials_ratio(drawn[0], drawn[1], budgets, key_higher, higher))
    return [float(v) for v in np.percentile(ratios, [5, 95])] if ratios else [math.nan, math.nan]


def load_trials(config: Config) -> dict[str, list[dict[str, Any]]]:
    """The MovieLens trials of the four gates, from (or by running) comet-movielens' Optuna studies."""
    ml = config.movielens_config()
    data_dir(movielens.NAME)  # the data check, before any folder or Optuna database is made
    folder = ml.out / "quick" if ml.quick else ml.out
    folder.mkdir(parents=True, exist_ok=True)
    counts = comet_movielens.trial_counts(ml, ml.gates)
    settings = comet_movielens.settings_of(ml)
    problem = comet_movielens.problem(settings)
    found: dict[str, list[dict[str, Any]]] = {}
    with progress() as bar:
        task = bar.add_task(f"{NAME}: MovieLens random search (saved trials are loaded)", total=sum(counts.values()))
        for gate in ml.gates:
            url = storage_url(folder, gate, settings)
            found[gate] = run_gate_study(problem, gate, counts[gate], url, lambda: bar.advance(task))
    return found


def run(config: Config) -> dict[str, Any]:
    """Curves of expected score against the tuning budget for Top-k/Top-k+ and Hash/Hash+."""
    command = command_line(NAME, config)
    trials = load_trials(config)
    gates = [g for pair in PAIRS for g in pair]
    n = min(len(t) for t in trials.values())
    budgets = np.arange(1, n + 1)
    curves: dict[str, dict[str, list[float]]] = {}
    bands: dict[str, dict[str, list[list[float]]]] = {}
    reach: list[dict[str, Any]] = []
    for score, (_, higher) in SCORES.items():
        curve, band, picks = {}, {}, {}
        for g in gates:
            if score == "picked_test_auc":  # picked by the lowest val loss, scored on test
                key, payoff, key_higher = scores(trials[g], "val_loss"), scores(trials[g], score), False
            else:
                key = payoff = scores(trials[g], score)
                key_higher = higher
            picks[g] = (key, payoff)
            curve[g] = expected_at_pick(key, payoff, budgets, key_higher)
            band[g] = bootstrap_band(key, budgets, key_higher, payoff).tolist()
        curves[score] = {g: c.tolist() for g, c in curve.items()}
        bands[score] = band
        for plain, plus in PAIRS:
            for owner in (plain, plus):
                target = float(curve[owner][-1])  # what `owner` reaches with the whole budget
                need = {g: budget_to_reach(curve[g], budgets, target, higher) for g in (plain, plus)}
                row = {
                    "score": score,
                    "pair": [plain, plus],
                    "target_from": owner,
                    "target": target,
                    "trials_needed": need,
                }
                if owner == plain:  # the paper's claim: the "+" gate needs fewer trials for the same score
                    row["ratio"] = needed_ratio(need[plain], need[plus])
                    row["ratio_5_95"] = ratio_band(picks[plain], picks[plus], budgets, key_higher, higher)
                reach.append(row)
    out = config.out / "quick" if config.quick else config.out
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "experiment": NAME,
        "command": command,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": {
            "movielens_settings": comet_movielens.settings_of(config.movielens_config()),
            "scores": {k: v[0] for k, v in SCORES.items()},
            "bootstrap_resamples": BOOTSTRAP,
            "ratio_bootstrap_resamples": RATIO_BOOTSTRAP,
            "quick": config.quick,
        },
        "trials_per_gate": n,
        # Training time of the trials used; those also in comet-movielens are not extra cost.
        "cost": {"training_seconds_of_trials_used": sum(r["seconds"] for g in gates for r in trials[g][:n])},
        "expected": curves,
        "band_5_95": bands,
        "reach": reach,
    }
    write_json(out / "results.json", results)
    write_report(results, out)
    print(render(results))
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / (NAME + '.png')}")
    return results


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and the plot into ``folder`` from ``results`` alone; returns their paths."""
    atomic_write_text(folder / "table.md", render(results))
    plot(results, folder / f"{NAME}.png")
    return [folder / "table.md", folder / f"{NAME}.png"]
