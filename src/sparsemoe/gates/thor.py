"""THOR's inference gates (Zuo et al., 2022): a fixed expert, the mean of all experts, a draw per
token or per sentence.

A THOR model is trained with the ``random`` gate; :func:`sparsemoe.thor.thor_inference` evaluates it
with one of these in its place. They learn nothing and hold no parameters, so they are marked
``inference_only`` (the demo and the benchmarks leave them out of the routers to train), which also
tells a THOR layer in an inference mode from one holding its training gate.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .._validation import check_int, device_side_checks
from ..routing import Routing
from .base import Gate, IdKind
from .random import RandomGate


class FixedGate(Gate):
    """Every input to one expert, weight 1: THOR's ``fixed`` inference mode.

    Args:
        expert: the expert every input goes to.
        device, dtype: accepted for the factory-argument convention (no state).
    """

    k_policy = "fixed"
    k_note = "1"
    summary = "THOR inference (`fixed`): every input to one expert (`expert=`), weight 1"
    inference_only: ClassVar[bool] = True

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        *,
        expert: int = 0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, 1, check_finite=check_finite)
        del device, dtype  # no state: the routing follows x
        self.expert = check_int("expert", expert, low=0, high=num_experts - 1)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        experts = torch.full((x.shape[0], 1), self.expert, dtype=torch.long, device=x.device)  # [T, 1]
        return Routing.from_topk(experts, x.new_ones(x.shape[0], 1), self.num_experts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, expert={self.expert}"


class MeanGate(Gate):
    """Every input to all ``n`` experts with weight ``1/n``: THOR's ``mean`` mode (costs ``n``×).

    Args:
        device, dtype: accepted for the factory-argument convention (no state).
    """

    k_policy = "dense"
    sparsity = "dense"
    summary = "THOR inference (`mean`): every expert, weight 1/n"
    inference_only: ClassVar[bool] = True

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        *,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, num_experts, check_finite=check_finite)
        del device, dtype  # no state: the routing follows x

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        experts = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)  # [T, n]
        weights = x.new_full((x.shape[0], self.num_experts), 1.0 / self.num_experts)
        return Routing.from_topk(experts, weights, self.num_experts)


class TokenDrawGate(RandomGate):
    """THOR's ``random-token`` mode: ``k`` fresh uniform experts per token (``random`` at token granularity).

    Draws from the gate's own seeded stream, exactly as ``RandomGate(granularity="token")``.
    """

    uses_ids = None
    summary = "THOR inference (`random-token`): k fresh uniform experts per token, seeded"
    inference_only: ClassVar[bool] = True

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 1,
        *,
        seed: int = 0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            d_in, num_experts, k, granularity="token", seed=seed, check_finite=check_finite, device=device, dtype=dtype
        )


class SentenceDrawGate(Gate):
    """THOR's ``random-sentence`` mode: one uniform expert per sentence, the same at every decoding step.

    The expert of sentence ``i`` is ``table[i]``, a table drawn once from ``seed``, so every beam of
    a sentence gets it too; ``ids`` are the sentence ids (pass a corpus-wide index so that different
    batches get different draws; without ids each row is its own sentence). The official code
    instead redraws per hypothesis at every incremental decoding step in the decoder. Unlike the
    ``random`` gate's ``"sequence"`` granularity, nothing is drawn at call time, so a sentence keeps
    its expert across calls.

    Args:
        seed: seed of the table (use a different one per layer).
        max_sentences: table size; ids must be below it (checked on the device on CUDA, no host read).
        device: where the table lives (``dtype`` is accepted and unused: no float state).
    """

    k_policy = "fixed"
    k_note = "1"
    uses_ids = "sequence"
    summary = "THOR inference (`random-sentence`): one seeded expert per sentence, kept across decoding steps"
    inference_only: ClassVar[bool] = True
    table: torch.Tensor

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        *,
        seed: int = 0,
        max_sentences: int = 1 << 16,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, 1, check_finite=check_finite)
        del dtype  # no floating-point state
        self.seed = check_int("seed", seed)
        size = check_int("max_sentences", max_sentences, low=1)
        # Drawn on the CPU from a seeded generator (the same table on every device), then moved.
        table = torch.randint(num_experts, (size,), generator=torch.Generator().manual_seed(self.seed))
        self.register_buffer("table", table.to(device), persistent=False)

    def id_kind(self) -> IdKind:
        return "sequence"

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        if ids is None:
            ids = torch.arange(x.shape[0], device=x.device)
        size = self.table.numel()
        if ids.numel() and device_side_checks(ids):  # no host read on CUDA or in a compiled graph
            torch._assert_async((ids < size).all(), f"sentence ids must be < max_sentences={size}")
        elif ids.numel() and int(ids.max()) >= size:
            raise ValueError(f"sentence id {int(ids.max())} >= max_sentences={size}; build the gate with a larger one")
        experts = self.table[ids.to(self.table.device)].unsqueeze(1).to(x.device)  # [T, 1]
        return Routing.from_topk(experts, x.new_ones(x.shape[0], 1), self.num_experts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, max_sentences={self.table.numel()}"
