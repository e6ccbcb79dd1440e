"""THOR's stochastic routing (Zuo et al., 2022): experts drawn uniformly at random."""

from __future__ import annotations

from typing import ClassVar

import torch

from .._validation import check_choice, check_seed
from ..routing import Routing
from .base import Gate, IdKind

GRANULARITIES = ("token", "sequence", "batch")


@torch.library.custom_op("sparsemoe::uniform_topk", mutates_args=("state",))
def uniform_topk(state: torch.Tensor, rows: int, num_experts: int, k: int) -> torch.Tensor:
    """``[rows, k]`` distinct uniform experts (the top-k of i.i.d. uniform scores), drawn from ``state``.

    ``state`` is a CPU generator's state (``torch.Generator().get_state()``, a ``uint8`` tensor) and
    is advanced in place, so a gate that keeps it as a buffer draws exactly the stream its own
    ``torch.Generator`` would, in eager mode and inside ``torch.compile`` (which cannot trace a
    ``Generator`` object).
    """
    generator = torch.Generator()
    generator.set_state(state.cpu())
    indices = torch.rand(rows, num_experts, generator=generator).topk(k, dim=-1).indices
    state.copy_(generator.get_state().to(state.device))
    return indices


@uniform_topk.register_fake
def _(state: torch.Tensor, rows: int, num_experts: int, k: int) -> torch.Tensor:
    return torch.empty(rows, k, dtype=torch.long)


class RandomGate(Gate):
    """``k`` distinct experts drawn uniformly at random, each with weight ``1/k``.

    The draw uses the gate's own seeded stream (its state is the ``rng_state`` buffer, saved with the
    model), in training and in inference (THOR routes at random in both), so runs are reproducible,
    independent of the global RNG, and traceable by ``torch.compile``.

    Args:
        k: experts per input.
        granularity: ``"token"`` draws per input row, ``"sequence"`` per distinct id passed as
            ``forward(x, ids=sequence_index)``, ``"batch"`` once per call (THOR's official code).
        seed: seed of the gate's generator.
    """

    uses_ids: ClassVar[IdKind | None] = "sequence"  # with granularity="sequence" only
    summary = "THOR: uniform random experts, seeded, per `token`/`sequence`/`batch` (ids read per `sequence` only)"

    rng_state: torch.Tensor

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 1,
        *,
        granularity: str = "token",
        seed: int = 0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, k, check_finite=check_finite, dtype=dtype)
        del device, dtype  # no parameters; draws happen on the CPU, the routing follows x
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.seed = check_seed("seed", seed)
        # The generator's state is a buffer, not a torch.Generator: it is saved in the state_dict (a
        # resumed run continues the same stream) and torch.compile can trace the draws.
        self.register_buffer("rng_state", torch.Generator().manual_seed(self.seed).get_state())

    def manual_seed(self, seed: int) -> RandomGate:
        """Restart the gate's stream of draws from ``seed`` (as ``torch.Generator.manual_seed``)."""
        self.rng_state.copy_(torch.Generator().manual_seed(check_seed("seed", seed)).get_state())
        return self

    def id_kind(self) -> IdKind | None:
        return "sequence" if self.granularity == "sequence" else None

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        num_inputs = x.shape[0]
        if self.granularity == "token":
            experts = self._draw(num_inputs)
        elif self.granularity == "batch":
            experts = self._draw(1).expand(num_inputs, self.k)
        else:
            if ids is None:
                raise ValueError('granularity="sequence" needs ids= (the sequence index of each row)')
            groups, group_of_row = torch.unique(ids.cpu(), return_inverse=True)
            experts = self._draw(groups.numel())[group_of_row]
        weights = x.new_full((num_inputs, self.k), 1.0 / self.k)
        return Routing.from_topk(experts.to(x.device), weights, self.num_experts)

    def _draw(self, rows: int) -> torch.Tensor:
        """``[rows, k]`` distinct uniform experts: the top-k of i.i.d. uniform scores."""
        return uniform_topk(self.rng_state, rows, self.num_experts, self.k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity!r}, seed={self.seed}"
