"""fit(): bit-identical resume (across a local-search hardening step), LR schedules, NaN policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemoe import MoE
from sparsemoe.checkpoint import load_checkpoint
from sparsemoe.training import fit

ROWS, BATCH = 40, 8  # 5 steps per epoch


class Crash(Exception):
    pass


def problem(seed: int = 0) -> tuple[torch.nn.Module, dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    x, y = torch.randn(ROWS, 6), torch.randn(ROWS, 1)
    # noisy top-k (global RNG) with a local search that hardens at the 4th training forward
    model = torch.nn.Sequential(
        MoE(6, 8, 4, gate="topk", k=2, local_search=True, local_search_steps=3), torch.nn.Linear(6, 1)
    )
    return model, {}, x, y


def run(tmp_path, *, resume=None, crash_at=None, bad_step=None, bad="loss", nan_policy="stop", epochs=3, every=2):
    model, _, x, y = problem()
    calls = {"n": 0}

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        jitter = float(np.random.rand()) * 1e-3  # numpy's RNG is part of the loss too
        loss = (model(x[rows] + jitter) - y[rows]).pow(2).mean() + model[0].aux_loss()
        step = calls["n"] + (0 if resume is None else resume_step)
        if step == bad_step:
            # "gradient": a finite loss with NaN gradients (d sqrt(u)/du at u=0 is inf, times 0)
            loss = loss * float("nan") if bad == "loss" else loss + torch.sqrt((model[1].weight * 0).sum())
        return loss

    def on_step(step: int, loss: torch.Tensor) -> None:
        if step == crash_at:
            raise Crash(step)

    resume_step = 0
    if resume is not None:
        resume_step = load_checkpoint(resume, *problem()[:1], restore_rng=False)["step"]
    return model, fit(
        model,
        batch_loss,
        ROWS,
        lambda: (model(x) - y).pow(2).mean().item(),
        epochs=epochs,
        lr=0.02,
        batch_size=BATCH,
        seed=1,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7),
        nan_policy=nan_policy,
        checkpoint_path=tmp_path / "run.safetensors",
        checkpoint_every=every,
        resume=resume,
        on_step=on_step,
    )


@pytest.mark.parametrize("crash_at", [3, 6, 12])  # resumes before hardening, in epoch 1, at the end of epoch 2
def test_resume_is_bit_identical(tmp_path, crash_at: int) -> None:
    model_a, full = run(tmp_path / "a")
    assert bool(model_a[0].search.hardened)
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_at=crash_at)
    saved_step = (crash_at - 1) // 2 * 2  # checkpoint_every=2: the last one written before the crash
    np.random.seed(12345)  # a fresh process would not have the old RNG states
    torch.manual_seed(12345)
    model_b, resumed = run(tmp_path / "c", resume=tmp_path / "b" / "run.safetensors")
    assert resumed.step_losses == full.step_losses[saved_step:]  # exact equality of floats
    assert resumed.history == full.history
    assert (resumed.best_epoch, resumed.best_value) == (full.best_epoch, full.best_value)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_a_different_data_order(tmp_path) -> None:
    run(tmp_path)
    model, _, x, _ = problem()
    with pytest.raises(ValueError, match="batch_size=8, this run has batch_size=4"):
        fit(model, lambda r: model(x[r]).sum(), ROWS, lambda: 0.0, epochs=1, lr=0.1, batch_size=4, seed=1,
            resume=tmp_path / "run.safetensors")  # fmt: skip


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_nan_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, bad: str) -> None:
    with pytest.raises(FloatingPointError, match=rf"non-finite {bad} at step 7 \(epoch 1, batch 1\)") as info:
        run(tmp_path, bad_step=7, bad=bad)
    assert "last good checkpoint" in str(info.value) and "(step 6)" in str(info.value)
    meta = load_checkpoint(tmp_path / "run.safetensors", problem()[0])
    assert meta["step"] == 6


def test_nan_skip_drops_the_step(tmp_path) -> None:
    _, clean = run(tmp_path / "clean", epochs=1)
    model, result = run(tmp_path / "skip", bad_step=2, bad="gradient", nan_policy="skip", epochs=1)
    assert result.skipped_steps == [2]
    assert result.step_losses[0] == clean.step_losses[0]
    assert np.isfinite(result.step_losses).all()  # the bad step had a finite loss, NaN gradients
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.step_losses[2] != clean.step_losses[2]  # the update of step 2 was dropped


def test_checkpoint_every_needs_a_path() -> None:
    model, _, x, _ = problem()
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint_path"):
        fit(model, lambda r: model(x[r]).sum(), ROWS, lambda: 0.0, epochs=1, lr=0.1, batch_size=8, seed=0,
            checkpoint_every=2)  # fmt: skip
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        fit(model, lambda r: model(x[r]).sum(), ROWS, lambda: 0.0, epochs=1, lr=0.1, batch_size=8, seed=0,
            nan_policy="ignore")  # fmt: skip
