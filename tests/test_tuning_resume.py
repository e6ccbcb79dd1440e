"""A study stopped by Ctrl-C or a kill, then resumed, gives the records of one run straight through.

The study is a tiny regression problem run by the real tuning runner (Optuna SQLite storage, seed
runs in the RunStore). A subprocess is interrupted mid-trial with a real SIGINT, another is killed
with SIGKILL (leaving its trial RUNNING in the database); the study is then finished in-process and
compared with an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sparsemoe.experiments.tuning import Problem, run_tuning

TRIALS, SEEDS = 3, 1
#: seconds of work per trial, so that a signal lands inside a trial
TRIAL_SECONDS = 1.0
VOLATILE = ("seconds", "started", "finished")


def _sample(trial: Any, gate: str) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True),
        "width": trial.suggest_categorical("width", [2, 4, 8]),
    }


def _problem(out: Path) -> Problem:
    def train(gate: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
        (out / f"started-{seed}").touch()  # tells the test which trial is running
        torch.manual_seed(seed)
        x = torch.randn(64, 3)
        y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(64)
        model = torch.nn.Sequential(
            torch.nn.Linear(3, params["width"]), torch.nn.Tanh(), torch.nn.Linear(params["width"], 1)
        )
        opt = torch.optim.SGD(model.parameters(), lr=params["lr"])
        for _ in range(20):
            loss = ((model(x).squeeze(1) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(TRIAL_SECONDS / 20)
        final = float(((model(x).squeeze(1) - y) ** 2).mean().detach())
        return {
            "val_loss": final,
            "val": {"mse": final},
            "test": {"mse": final},
            "seconds": 0.0,
            "best_epoch": 0,
            "epochs_run": 1,
            "active_experts_per_epoch": [1.0],
            "active_experts": 1.0,
        }

    return Problem("toy", _sample, train, [("mse", "MSE", False)], {"toy": 1})


def _command(out: Path) -> str:
    return f"sparsemoe reproduce toy --out {out}"


def study(out: Path) -> dict[str, Any]:
    """The study under test (also the subprocesses' entry point, run as the command line runs commands)."""
    return run_tuning(_problem(out), ["toy"], {"toy": TRIALS}, SEEDS, out, _command(out))


def _stable(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def strip(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k not in VOLATILE}

    return [strip(r) for r in results["trials"]["toy"]], [strip(r) for r in results["best_runs"]["toy"]]


def _start(out: Path) -> subprocess.Popen[bytes]:
    here = str(Path(__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import test_tuning_resume as t; "
        # A process started in the background by a non-interactive shell inherits SIGINT ignored.
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from sparsemoe.cli import run_resumable; "
        f"sys.exit(run_resumable(lambda: t.study(t.Path({str(out)!r})), {_command(out)!r}))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path.name} never appeared; stderr: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.02)
    time.sleep(TRIAL_SECONDS / 4)  # well inside the trial


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_interrupted_and_killed_study_resumes_to_the_same_records(tmp_path: Path) -> None:
    straight = _stable(study(tmp_path / "straight"))

    out = tmp_path / "stopped"
    out.mkdir()
    proc = _start(out)
    _wait_for(out / "started-1", proc)  # trial 0 finished, trial 1 running
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    text = stderr.decode()
    assert proc.returncode == 130, text
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if "Continue with" in line]
    assert lines == [f"sparsemoe: interrupted; finished runs are saved. Continue with: {_command(out)}"]

    for marker in out.glob("started-*"):
        marker.unlink()
    proc = _start(out)
    _wait_for(out / "started-2", proc)  # trial 1 rerun and finished, trial 2 running
    proc.kill()  # SIGKILL: trial 2 stays RUNNING in the database
    proc.communicate(timeout=60)

    resumed = _stable(study(out))
    assert resumed == straight
