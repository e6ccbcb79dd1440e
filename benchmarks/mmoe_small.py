"""Small models, where per-call overhead decides: an MMoE at the COMET paper's own scale.

``MultiTaskMoE`` (d=100 inputs, 8 ``linear`` experts of width 16 with ReLU, 2 tasks, a tower per
task, batch 256) against a plain dense MMoE written with einsums that computes all 8 experts for
every input. One training step = zero_grad, forward, both task losses (+ auxiliary losses),
backward, Adam step. The plain version is the floor for the dense softmax gate and the yardstick
for the sparse gates: at this size a step takes about a millisecond and Python/dispatcher overhead,
not FLOPs, sets its cost; it also sets the cost of every tuning study.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

import sparsemoe
from sparsemoe.gates import CometGate, Gate
from sparsemoe.gates.base import linear_batch
from sparsemoe.routing import Routing

from . import report
from .report import Section
from .timing import interleaved

#: Gate options: ``k=2`` where the gate has a k (hash routes to one expert; softmax is dense, switch top-1).
GATE_KWARGS: dict[str, dict[str, object]] = {"softmax": {}, "switch": {}, "hash": {"k": 1}}

#: Extra rows: a gate under the settings the COMET tuning studies train it with (the paper's top-k has
#: neither the learned noise nor the balance loss), next to its row with the library's defaults.
STUDY_ROWS: dict[str, tuple[str, dict[str, object]]] = {
    "topk (study settings: no noise, no balance loss)": ("topk", {"k": 2, "noisy": False, "balance_weight": 0.0}),
}


#: Gates whose cost depends on how far their smooth-steps have saturated: every expert per input at
#: initialisation, about k once trained (a few hundred steps here). Their main rows are timed saturated,
#: the state they train in for nearly all of a study; a row "at initialisation" times the other end.
SATURATING = tuple(g for g in sparsemoe.gates.available() if sparsemoe.gates.learns_sparsity(g))

PLAIN_ROW = "plain dense MMoE (einsum)"
FLOOR_ROW = "comet floor: its tree maths free (a perfectly fused gate; see FusedFloorComet)"


def initial_row(gate: str) -> str:
    """The row of a saturating gate kept at its initial state."""
    return f"{gate} at initialisation (learning rate 0: every expert)"


@dataclass(frozen=True)
class SmallConfig:
    batch: int = 256
    d: int = 100
    num_experts: int = 8
    width: int = 16
    tasks: int = 2
    repeats: int = 7
    #: seconds per timed sample: a step is ~1 ms, so a sample averages many steps
    min_time: float = 0.2
    #: most untimed training steps to bring a saturating gate down to k experts per input
    max_saturation_steps: int = 3000


FULL = SmallConfig()
QUICK = SmallConfig(repeats=3, min_time=0.05)


class PlainMMoE(nn.Module):
    """Dense MMoE with two einsums: every expert on every input, mixed by one softmax gate per task.

    Shape: ``x: [B, d]`` -> ``[tasks, B, width]`` (before the towers).
    """

    def __init__(self, d: int, num_experts: int, width: int, tasks: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(d)
        self.w = nn.Parameter(torch.empty(num_experts, d, width).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(num_experts, width).uniform_(-bound, bound))
        self.gates = nn.ModuleList(nn.Linear(d, num_experts) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("bd,ndw->nbw", x, self.w) + self.b[:, None])  # [n, B, width]
        g = torch.stack([torch.softmax(gate(x), dim=-1) for gate in self.gates])  # [tasks, B, n]
        return torch.einsum("kbn,nbw->kbw", g, h)


class _Model(nn.Module):
    """An MMoE body (ours or plain) with one linear tower per task."""

    def __init__(self, body: nn.Module, width: int, tasks: int) -> None:
        super().__init__()
        self.body = body
        self.towers = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        mixed = self.body(x)
        return [tower(m).squeeze(-1) for tower, m in zip(self.towers, mixed, strict=True)]


class FusedFloorComet(CometGate):
    """Not a gate: COMET's parameters and linear layers, with its tree maths cut to one softmax and a top-k.

    A step with this in place of COMET costs what COMET would if its routing maths (smooth-steps,
    path products, leaf softmax, entropy, and their backward) were free, as in a perfectly fused
    kernel: the floor that fusing or compiling the gate can reach. Its routing means nothing.
    """

    # Defined again beside route_batch: MultiTaskMoE batches the task gates only when one class defines both.
    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        return self.route_batch([self], x, ids)[0]

    @classmethod
    def route_batch(cls, gates: Sequence[Gate], x: torch.Tensor, ids: torch.Tensor | None) -> list[Routing]:
        trees = cast(Sequence[CometGate], gates)
        first, rows, num_gates = trees[0], x.shape[0], len(trees)
        n, k = first.num_experts, first.k
        splits = linear_batch(x, [g.split for g in trees]).view(rows, num_gates, -1)  # [T, G, (n-1)·k]
        leaf_logits = linear_batch(x, [g.leaf for g in trees]).view(rows, num_gates, n, k)
        probs = torch.softmax(leaf_logits.sum(-1) + splits.sum(-1, keepdim=True), dim=-1)  # [T, G, n]
        weights, experts = probs.topk(k, dim=-1)
        penalty = first.entropy_weight * splits.mean((0, 2))  # [G], one op in place of the entropy's
        return [
            Routing.from_topk(experts[:, g], weights[:, g], n, aux_losses={"entropy": penalty[g]})
            for g in range(num_gates)
        ]


def _train_step(cfg: SmallConfig, body: nn.Module, seed: int, lr: float = 1e-3) -> Callable[[], None]:
    torch.manual_seed(seed)
    model = _Model(body, cfg.width, cfg.tasks)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.d, generator=g)
    targets = torch.randn(cfg.tasks, cfg.batch, generator=g)
    aux = getattr(body, "aux_loss", None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs = model(x)
        loss = torch.stack([torch.nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets, strict=True)]).sum()
        if aux is not None:
            loss = loss + aux()
        loss.backward()
        optimizer.step()

    return step


def _mmoe(cfg: SmallConfig, gate: str | Sequence[Gate], **kwargs: Any) -> sparsemoe.MultiTaskMoE:
    torch.manual_seed(0)
    body = sparsemoe.MultiTaskMoE(
        cfg.d, cfg.width, cfg.num_experts, cfg.tasks, gate=gate, expert="linear", activation="relu", **kwargs
    )
    return body.train()


def experts_per_input(body: nn.Module) -> float | None:
    """Mean over tasks of the experts computed per input in the last forward (``None`` for the plain MMoE)."""
    if not isinstance(body, sparsemoe.MultiTaskMoE):
        return None
    per_task = [cast(float, stats["active_per_input"]) for stats in body.routing_stats()]
    return sum(per_task) / len(per_task)


def saturate(step: Callable[[], None], body: sparsemoe.MultiTaskMoE, k: int, max_steps: int) -> int:
    """Train (untimed) until every task's routing computes at most ``k`` experts per input; returns the steps."""
    for steps in range(1, max_steps + 1):
        step()
        if all(r.num_pairs <= k * r.num_inputs for r in body.last_routing or []):
            return steps
    return max_steps


def candidates(cfg: SmallConfig) -> tuple[dict[str, Callable[[], None]], dict[str, nn.Module]]:
    """One training step each: the plain dense MMoE, ``MultiTaskMoE`` with every registered gate, extra rows.

    The saturating gates (:data:`SATURATING`) are trained untimed until each computes at most k experts
    per input; their "at initialisation" rows step with learning rate 0, so they stay at every expert.
    Returns the steps and each row's MMoE body (for its experts per input).
    """
    plain = PlainMMoE(cfg.d, cfg.num_experts, cfg.width, cfg.tasks)
    steps = {PLAIN_ROW: _train_step(cfg, plain, 0)}
    bodies: dict[str, nn.Module] = {PLAIN_ROW: plain}
    rows = {name: (name, GATE_KWARGS.get(name, {"k": 2})) for name in sparsemoe.gates.trainable()}
    for row, (gate, kwargs) in {**rows, **STUDY_ROWS}.items():
        body = bodies[row] = _mmoe(cfg, gate, **kwargs)
        steps[row] = _train_step(cfg, body, 0)
        if gate in SATURATING:
            saturate(steps[row], body, cast(int, kwargs["k"]), cfg.max_saturation_steps)
            initial = initial_row(gate)
            bodies[initial] = _mmoe(cfg, gate, **kwargs)
            steps[initial] = _train_step(cfg, bodies[initial], 0, lr=0.0)
    bodies[FLOOR_ROW] = _mmoe(cfg, [FusedFloorComet(cfg.d, cfg.num_experts, k=2) for _ in range(cfg.tasks)])
    steps[FLOOR_ROW] = _train_step(cfg, bodies[FLOOR_ROW], 0)
    return steps, bodies


def op_count(step: Callable[[], None]) -> int:
    """ATen ops one step dispatches from Python or autograd (nested ops not counted).

    A load-independent measure of per-call overhead: on a busy machine the times below spread by
    tens of percent, the op count does not move.
    """
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))


def small_models(cfg: SmallConfig) -> Section:
    """Training-step time of every gate ÷ the plain dense MMoE, with the issue's targets."""
    steps, bodies = candidates(cfg)
    ops = {name: op_count(step) for name, step in steps.items()}
    t = interleaved(steps, repeats=cfg.repeats, min_time=cfg.min_time)
    plain, floor = PLAIN_ROW, FLOOR_ROW
    untargeted = {plain, floor, *(initial_row(gate) for gate in SATURATING)}
    rows, targets = [], []
    for name in t.samples:
        r = t.ratio(name, plain)
        active = experts_per_input(bodies[name])
        rows.append(
            [
                name,
                report.us(t.stat(name)),
                report.ratio(r) if name != plain else "1",
                t.flag(name, plain),
                f"{active:.2f}" if active is not None else str(cfg.num_experts),
                ops[name],
                f"{ops[name] / ops[plain]:.2f}",
            ]
        )
        if name in untargeted:
            continue
        limit = 1.1 if name == "softmax" else 1.5
        why = "the gates' own ops (route + backward + aux losses; see NOTES.md)"
        if name == "comet":
            why = f"its tree maths; with them free (floor row) a step still takes {t.ratio(floor, plain).median:.2f}×"
        targets.append(
            [
                f"COMET-scale MMoE training step, {name} ≤ {limit}× plain dense",
                report.ratio(r),
                report.verdict(r.median <= limit, r),
                "" if r.median <= limit else why,
            ]
        )
    saturating = ", ".join(f"`{gate}`" for gate in SATURATING)
    body = (
        f"MMoE at the COMET paper's scale: batch {cfg.batch}, d={cfg.d}, {cfg.num_experts} `linear` experts of "
        f"width {cfg.width} (ReLU), {cfg.tasks} tasks with a linear tower each; one training step (forward, "
        "MSE per task + auxiliary losses, backward, Adam). `MultiTaskMoE` with each gate (k=2 where the gate "
        "takes one; hash k=1), with the library's default gate options, against a plain dense MMoE written with "
        "einsums that computes all experts. "
        f"Each sample averages steps over ≥ {cfg.min_time} s; median [min–max] of ≥ {cfg.repeats} interleaved "
        "rounds (more where the spread was too wide). The op count (ATen ops dispatched per step from "
        "Python or autograd, nested ones not counted) does not depend on the machine's load. The row marked "
        "*study settings* is top-k as the COMET tuning studies train it (no learned noise, no balance loss, "
        "as in the paper); the row named `topk` has the defaults (noise and the smooth load estimator).\n\n"
        f"{saturating} compute every expert for every input until their smooth-steps saturate (a few hundred "
        "steps here), then about k: their main rows are timed after untimed training until every task "
        "computes at most k experts per input (the state a study trains in for nearly all its steps), and "
        "their rows *at initialisation* step with learning rate 0 so that they stay at every expert "
        "(all pairs: the dense path). *Experts / input* is the mean over tasks in the last timed step. "
        "The *comet floor* row keeps COMET's parameters and linear layers but cuts its tree maths to one "
        "softmax and a top-k (`FusedFloorComet`): what COMET would cost if its routing maths were free, "
        "the most that fusing or compiling the gate could win.\n\n"
        + report.table(
            ["model", "µs / step", "÷ plain dense", "trust", "experts / input", "ops / step", "ops ÷ plain"], rows
        )
    )
    return Section("Small models: MMoE at the COMET paper's scale", body, targets=targets)


#: ``(R routings, T inputs, n experts, out width)`` of the dense-mix comparison: the COMET scale first,
#: then other small shapes and a few large ones.
MIX_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (2, 256, 8, 16),
    (1, 256, 8, 16),
    (4, 128, 8, 16),
    (2, 64, 8, 64),
    (1, 512, 8, 16),
    (2, 1024, 8, 64),
    (1, 4096, 8, 64),
    (3, 4096, 8, 128),
)
QUICK_MIX_SHAPES = MIX_SHAPES[:2]


def einsum_mix(ys_all: torch.Tensor, routings: list) -> list[torch.Tensor]:
    """``dispatch.dense_mix`` as it was before it used ``bmm``: one ``einsum("rtn,nto->rto")``."""
    n, num_inputs = ys_all.shape[:2]
    weights = torch.stack([r.to_dense() for r in routings]).to(ys_all.dtype)  # [R, T, n]
    mixed = torch.einsum("rtn,nto->rto", weights, ys_all.reshape(n, num_inputs, -1))
    return list(mixed.view(len(routings), num_inputs, *ys_all.shape[2:]).unbind(0))


def dense_mix_forms(cfg: SmallConfig, shapes: tuple[tuple[int, int, int, int], ...]) -> Section:
    """The dense path's mix (``dispatch.dense_mix``, one ``bmm``) against the same function written with einsum."""
    from sparsemoe.dispatch import dense_mix

    def step(mix: Callable, ys: torch.Tensor, routings: list, upstream: list[torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for leaf in (ys, *(r.dense for r in routings)):
                leaf.grad = None
            torch.autograd.backward(mix(ys, routings), upstream)

        return run

    candidates = {"einsum": einsum_mix, "bmm": dense_mix}
    rows = []
    for r, t, n, o in shapes:
        g = torch.Generator().manual_seed(0)
        routings = [
            Routing.from_dense(torch.rand(t, n, generator=g).requires_grad_(), keep_zeros=True) for _ in range(r)
        ]
        ys = torch.randn(n, t, o, generator=g, requires_grad=True)
        upstream = [torch.randn(t, o, generator=g) for _ in range(r)]
        timings = interleaved(
            {name: step(mix, ys, routings, upstream) for name, mix in candidates.items()},
            repeats=cfg.repeats,
            min_time=cfg.min_time,
        )
        ratio = timings.ratio("bmm", "einsum")
        rows.append([f"{r}, {t}, {n}, {o}", report.us(timings.stat("einsum")), report.ratio(ratio)])
    body = (
        "The dense path mixes the outputs of all n experts with each routing's `[T, n]` weights (forward and "
        "backward timed). `dense_mix` stacks the weights input-major and calls one `bmm`; before, it called "
        "`einsum('rtn,nto->rto')`, the plain MMoE's own mix (kept here as `einsum_mix`). Median [min–max] of "
        "interleaved rounds.\n\n" + report.table(["R routings, T, n, out", "einsum µs (fwd+bwd)", "bmm ÷ einsum"], rows)
    )
    return Section("Dense mix: bmm against einsum", body)
