"""The training loop: bit-identical resume (across a local-search hardening step), LR schedules, NaN
policies, argument checks, accumulation, clipping, selection, logs, sharding."""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemoe import MoE
from sparsemoe.checkpoint import load_checkpoint
from sparsemoe.training import (
    Callback,
    MetricsLog,
    ProgressBar,
    RandomBatches,
    TensorBoardLog,
    TrainConfig,
    Trainer,
    fit,
    train,
)

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


# ----------------------------------------------------------------------------- the Trainer's hooks
def linear_problem(rows: int = 16) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1), torch.randn(rows, 3), torch.randn(rows, 1)


def sgd(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr)


def test_import_sparsemoe_exposes_training() -> None:
    import sparsemoe

    assert sparsemoe.training.Trainer is Trainer and sparsemoe.training.TrainConfig is TrainConfig


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"epochs": 2.5}, TypeError, r"epochs must be an int, got float"),
        ({"epochs": -1}, ValueError, r"epochs must be >= 1, got -1"),
        ({"epochs": 0}, ValueError, r"epochs must be >= 1"),
        ({"epochs": True}, TypeError, r"epochs must be an int, got bool"),
        ({"lr": "0.1"}, TypeError, r"lr must be a real number, got str"),
        ({"lr": float("inf")}, ValueError, r"lr must be a finite number, got inf"),
        ({"lr": float("nan")}, ValueError, r"lr must be a finite number, got nan"),
        ({"lr": 0.0}, ValueError, r"lr must be > 0"),
        ({"lr": -0.1}, ValueError, r"lr must be > 0"),
        ({"seed": "x"}, TypeError, r"seed must be an int, got str"),
        ({"seed": 2**70}, ValueError, r"seed must be between 0 and"),
        ({"seed": -1}, ValueError, r"seed must be between 0 and"),
        ({"patience": -1}, ValueError, r"patience must be >= 0, got -1"),
        ({"patience": 1.5}, TypeError, r"patience must be an int"),
        ({"weight_decay": float("inf")}, ValueError, r"weight_decay must be a finite number"),
        ({"batch_size": 0}, ValueError, r"batch_size must be >= 1"),
    ],
)
def test_fit_rejects_bad_arguments_by_name_before_training(kwargs: dict, error: type, message: str) -> None:
    model, x, y = linear_problem()
    before = copy.deepcopy(model.state_dict())
    args = {"epochs": 2, "lr": 0.1, "batch_size": 4, "seed": 0, **kwargs}
    with pytest.raises(error, match=message):
        fit(model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), len(x), lambda: 0.0, **args)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, r"steps must be >= 1"),
        ({"eval_every": 0}, r"eval_every must be >= 1"),
        ({"accumulate": 0}, r"accumulate must be >= 1"),
        ({"clip_norm": 0.0}, r"clip_norm must be > 0"),
        ({"mode": "best"}, r"mode must be one of 'min', 'max'"),
        ({"nan_policy": "ignore"}, r"nan_policy must be one of"),
        ({"patience": 2}, r"patience needs metric="),
        ({"checkpoint_every": 2}, r"checkpoint_every needs checkpoint_path"),
    ],
)
def test_train_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_lr_inf_is_blamed_on_lr_not_the_input() -> None:
    model, _, x, y = problem()
    with pytest.raises(ValueError, match=r"^lr must be a finite number, got inf$"):
        fit(model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), ROWS, lambda: 0.0, epochs=2, lr=float("inf"),
            batch_size=8, seed=0)  # fmt: skip


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (lambda out: out.pow(2).mean(1), r"returned a tensor of shape \(4,\); it must be a scalar"),
        (lambda out: out.pow(2).mean().item(), r"got float; return the tensor itself, not loss.item\(\)"),
        (lambda out: out.pow(2).mean().detach(), r"does not require grad"),
        (lambda out: {"ce": out.pow(2).mean()}, r"mapping without 'loss'"),
    ],
)
def test_loss_must_return_a_scalar_tensor(loss, message: str) -> None:
    model, x, _ = linear_problem()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=message):
        train(model, lambda r: loss(model(x[r])), RandomBatches(len(x), 4, 0), TrainConfig(epochs=1))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    ("factories", "message"),
    [
        (
            {"scheduler": lambda opt: 0.5},
            r"scheduler factory must return a torch.optim.lr_scheduler.LRScheduler, got float",
        ),
        ({"scheduler": lambda opt: opt}, r"scheduler factory must return .* got SGD"),
        (
            {"optimizer": lambda model, config: "adam"},
            r"optimizer factory must return a torch.optim.Optimizer, got str",
        ),
    ],
)
def test_factories_must_return_the_right_type(factories: dict, message: str) -> None:
    model, x, y = linear_problem()
    factories = {"optimizer": sgd, **factories}
    with pytest.raises(TypeError, match=message):
        Trainer(model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), RandomBatches(len(x), 4, 0), TrainConfig(),
                **factories)  # fmt: skip


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_validation_metric_is_an_error_naming_the_step(policy: str) -> None:
    model, x, y = linear_problem()
    evaluations = {"n": 0}

    def val_loss() -> float:
        evaluations["n"] += 1
        return float("nan")

    expected = r"evaluation at step 4 \(epoch 0\) gave val_loss=nan" if policy == "stop" else \
        r"no evaluation gave a finite val_loss \(evaluated at steps \[4, 8\]\)"  # fmt: skip
    with pytest.raises(FloatingPointError, match=expected):
        fit(model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), len(x), val_loss, epochs=2, lr=0.1, batch_size=4,
            seed=0, nan_policy=policy)  # fmt: skip
    assert evaluations["n"] == (1 if policy == "stop" else 2)


def test_a_non_finite_loss_never_reaches_the_weights() -> None:
    model, x, y = linear_problem()
    seen: list[dict] = []

    class Snapshot(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            seen.append(copy.deepcopy(trainer.model.state_dict()))

    def loss(rows: torch.Tensor) -> torch.Tensor:
        value = (model(x[rows]) - y[rows]).pow(2).mean()
        return value * float("inf") if len(seen) == 2 else value

    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 \(epoch 0, batch 2\)"):
        train(model, loss, RandomBatches(len(x), 4, 0), TrainConfig(epochs=1), callbacks=[Snapshot()])
    assert all(torch.equal(a, b) for a, b in zip(seen[-1].values(), model.state_dict().values(), strict=True))


def test_gradient_accumulation_equals_the_larger_batch() -> None:
    results = []
    for batch, accumulate in ((8, 1), (4, 2)):
        model, x, y = linear_problem()
        config = TrainConfig(epochs=2, lr=0.1, batch_size=batch, accumulate=accumulate)
        out = train(model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), RandomBatches(len(x), batch, 0), config,  # noqa: B023
                    optimizer=sgd)  # fmt: skip
        results.append((out, model.weight.detach().clone()))
    (big, w_big), (small, w_small) = results
    assert big.steps == small.steps == 4
    torch.testing.assert_close(w_big, w_small)
    torch.testing.assert_close(torch.tensor(big.step_losses), torch.tensor(small.step_losses))


def test_clipping_bounds_the_update() -> None:
    model, x, y = linear_problem()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    config = TrainConfig(steps=1, lr=1.0, batch_size=16, clip_norm=1e-3)
    train(model, lambda r: (model(x[r]) - y[r] + 100).pow(2).mean(), RandomBatches(len(x), 16, 0), config,
          optimizer=sgd)  # fmt: skip
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < float((after - before).norm()) <= 1e-3 * (1 + 1e-5)


def test_eval_every_selects_the_best_by_max_and_restores_it(tmp_path) -> None:
    model, x, y = linear_problem()
    scores = iter([1.0, 3.0, 2.0, 0.5, 0.1])
    snapshots: dict[int, dict] = {}

    class Snapshot(Callback):
        def on_evaluate(self, trainer: Trainer, record: dict) -> None:
            snapshots[trainer.step] = copy.deepcopy(trainer.model.state_dict())

    config = TrainConfig(steps=10, lr=0.1, batch_size=4, eval_every=2, metric="score", mode="max", patience=2)
    log = MetricsLog(tmp_path / "log.jsonl", every=1)
    result = train(model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), RandomBatches(len(x), 4, 0), config,
                   evaluate=lambda: {"score": next(scores)}, callbacks=[Snapshot(), log])  # fmt: skip
    assert (result.best_value, result.best_step, result.steps, result.stopped_early) == (3.0, 4, 8, True)
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]  # patience 2: stops 2 evaluations after the best
    assert all(torch.equal(a, b) for a, b in zip(snapshots[4].values(), model.state_dict().values(), strict=True))
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["score"] for line in lines if "score" in line] == [1.0, 3.0, 2.0, 0.5]
    assert [line["step"] for line in lines if "lr" in line] == list(range(1, 9))


def test_after_optimizer_step_runs_for_real_steps_only() -> None:
    model, x, y = linear_problem()
    calls: list[int] = []

    class Balance(Callback):
        def after_optimizer_step(self, trainer: Trainer) -> None:
            calls.append(trainer.step)

    def loss(rows: torch.Tensor) -> torch.Tensor:
        value = (model(x[rows]) - y[rows]).pow(2).mean()
        return value * float("nan") if len(calls) == 1 and not getattr(loss, "done", False) else value

    def once(rows: torch.Tensor) -> torch.Tensor:
        out = loss(rows)
        loss.done = not torch.isfinite(out) or getattr(loss, "done", False)  # type: ignore[attr-defined]
        return out

    result = train(model, once, RandomBatches(len(x), 4, 0), TrainConfig(epochs=1, nan_policy="skip"),
                   callbacks=[Balance()])  # fmt: skip
    assert result.skipped_steps == [2] and calls == [1, 3, 4]


def test_step_based_resume_with_accumulation_is_bit_identical(tmp_path) -> None:
    def run_it(path, resume=None, crash_at=None):
        model, _, x, y = problem()

        class Crash_(Callback):
            def on_step_end(self, trainer: Trainer) -> None:
                if trainer.step == crash_at:
                    raise Crash

        config = TrainConfig(steps=7, lr=0.02, batch_size=4, eval_every=3, metric="val", accumulate=2, seed=3,
                             checkpoint_every=2, checkpoint_path=str(path))  # fmt: skip
        result = train(model, lambda r: (model(x[r]) - y[r]).pow(2).mean() + model[0].aux_loss(),
                       RandomBatches(ROWS, 4, 3), config, evaluate=lambda: {"val": (model(x) - y).pow(2).mean().item()},
                       callbacks=[Crash_()], resume=resume)  # fmt: skip
        return model, result

    model_a, full = run_it(tmp_path / "a.st")
    with pytest.raises(Crash):
        run_it(tmp_path / "b.st", crash_at=5)
    model_b, resumed = run_it(tmp_path / "b.st", resume=tmp_path / "b.st")
    assert resumed.step_losses == full.step_losses[4:] and resumed.history == full.history
    assert full.epochs_run == 2  # 10 batches of 4 per epoch, 2 per step: steps 6 and 7 are in the 2nd epoch
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_sharded_batches_split_each_batch_across_ranks() -> None:
    order = RandomBatches(10, 4, 0)
    shards = [order.shard(rank, 2) for rank in range(2)]
    for e in range(2):
        for whole, *parts in zip(order.epoch(e), *(s.epoch(e) for s in shards), strict=True):
            assert torch.equal(torch.cat(parts), whole)
    assert shards[1].describe() == {"num_rows": 10, "batch_size": 4, "seed": 0, "rank": 1, "world": 2}
    with pytest.raises(ValueError, match="rank must be between 0 and 1"):
        order.shard(2, 2)


def test_metrics_log_csv_and_tensorboard(tmp_path) -> None:
    model, x, y = linear_problem()
    config = TrainConfig(epochs=3, lr=0.1, batch_size=8, trim_memory=True)
    train(model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), RandomBatches(len(x), 8, 0), config,
          evaluate=lambda: {"val": 1.0}, callbacks=[MetricsLog(tmp_path / "log.csv")])  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [(r["epoch"], r["step"], r["val"]) for r in rows] == [
        ("0", "2", "1.0"),
        ("1", "4", "1.0"),
        ("2", "6", "1.0"),
    ]
    with pytest.raises(ValueError, match=r"needs a \.jsonl log"):
        MetricsLog(tmp_path / "log.csv", every=1)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            TensorBoardLog(tmp_path / "tb")


@pytest.mark.parametrize("line_seconds, lines", [(0.0, [f"fit: step {s}/6" for s in range(1, 7)]), (1e9, [])])
def test_progress_bar_writes_plain_step_lines_where_the_console_is_not_a_terminal(line_seconds, lines) -> None:
    from rich.console import Console
    from rich.progress import Progress

    model, x, y = linear_problem()
    out = io.StringIO()  # a log file: rich draws no bar there
    progress = Progress(console=Console(file=out, width=200))
    with progress:
        train(model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), RandomBatches(len(x), 8, 0),
              TrainConfig(epochs=3, lr=0.1, batch_size=8),
              callbacks=[ProgressBar("fit", progress, line_seconds=line_seconds)])  # fmt: skip
    assert [line for line in out.getvalue().splitlines() if "step" in line] == lines
    with pytest.raises(ValueError, match="line_seconds"):
        ProgressBar(line_seconds=-1.0)


def test_exactly_one_module_steps_an_optimizer() -> None:
    src = Path(__file__).resolve().parent.parent / "src" / "sparsemoe"
    stepping = sorted(
        str(path.relative_to(src)) for path in src.rglob("*.py") if re.search(r"\b\w*opt\w*\.step\(", path.read_text())
    )
    assert stepping == ["training/loop.py"]


def test_a_trainer_runs_once() -> None:
    model, x, y = linear_problem()
    trainer = Trainer(
        model, lambda r: (model(x[r]) - y[r]).pow(2).mean(), RandomBatches(len(x), 8, 0), TrainConfig(epochs=1)
    )
    assert trainer.run().steps == 2
    with pytest.raises(RuntimeError, match="a Trainer runs once"):
        trainer.run()


def test_the_loop_updates_loss_free_balancing_biases_after_each_optimizer_step() -> None:
    """Once per optimizer step, over the loads of all its micro-batches (none for a skipped step)."""
    torch.manual_seed(0)
    moe = MoE(6, 8, 4, gate="sigmoid", k=1, bias_update_rate=0.1)
    x = torch.randn(32, 6)
    seen: list[torch.Tensor] = []

    class Probe(Callback):
        def after_optimizer_step(self, trainer: Trainer) -> None:
            seen.append(moe.gate.balance_bias.clone())
            assert int(moe.gate.balance_counts.sum()) == 0  # counted loads were spent on this update

    config = TrainConfig(steps=3, lr=0.01, batch_size=8, accumulate=2)
    train(moe, lambda r: moe(x[r]).pow(2).mean(), RandomBatches(len(x), 4, 0), config, callbacks=[Probe()])
    assert len(seen) == 3
    # each update moves every expert's bias by exactly ±u or 0 (the sign rule), and the first one moves some
    steps = torch.stack([seen[0], *(b - a for a, b in itertools.pairwise(seen))])
    assert torch.isin(steps.round(decimals=6), torch.tensor([-0.1, 0.0, 0.1])).all()
    assert seen[0].abs().sum() > 0


def test_a_skipped_step_neither_moves_the_loss_free_bias_nor_leaks_its_loads_into_the_next() -> None:
    torch.manual_seed(0)
    moe = MoE(6, 8, 4, gate="sigmoid", k=1, bias_update_rate=0.1)
    x = torch.randn(16, 6)
    biases: list[torch.Tensor] = []

    class Probe(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            biases.append(moe.gate.balance_bias.clone())
            assert int(moe.gate.balance_counts.sum()) == 0  # spent on an update, or thrown away with the step

    def loss(rows: torch.Tensor) -> torch.Tensor:
        value = moe(x[rows]).pow(2).mean()
        return value * float("nan") if len(biases) == 1 else value  # step 2's loss is non-finite

    config = TrainConfig(steps=3, lr=0.01, batch_size=4, nan_policy="skip")
    result = train(moe, loss, RandomBatches(len(x), 4, 0), config, callbacks=[Probe()])
    assert result.skipped_steps == [2]
    assert torch.equal(biases[1], biases[0])  # the skipped step left the bias alone
    # step 3's update saw step 3's loads only: exactly one batch of 4 inputs, one expert each
    moved = ((biases[2] - biases[1]).abs() > 0).sum()
    assert moved > 0
