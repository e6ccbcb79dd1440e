"""Hash routing (Roller et al., 2021): a fixed, balanced, random map from ids to experts."""

from __future__ import annotations

import torch

from .._validation import check_int, check_seed, device_side_checks, skip_value_checks
from ..routing import Routing
from .base import Gate

_DEFAULT_TABLE_SIZE = 1 << 16
#: the largest id space with a table of its own (2 GiB of int64); larger ones are mapped down first
MAX_NUM_IDS = 1 << 28


class HashGate(Gate):
    """Route each input by a fixed table ``id -> expert``; nothing is learned.

    The table deals the ids round-robin over the experts in a seeded random order, so every expert
    gets the same number of ids (±1). With ``k > 1`` an input also goes to the ``k - 1`` experts after
    its own (mod ``n``), each with weight ``1/k``.

    Ids come from ``forward(x, ids=...)`` (token ids, user ids). Without ids the gate hashes the bits
    of each input row, so equal rows always share an expert. The table is a buffer: it is saved in
    the ``state_dict``, which a model needs to keep its routing after reloading.

    Args:
        num_ids: size of the id space; ids must lie in ``[0, num_ids)``, at most ``2**28`` (the table
            holds one int64 per id). If not given, ids (and row hashes) are reduced modulo 65,536.
        seed: seed of the table.
        device: where the table lives (``dtype`` is accepted and unused: no float state).
    """

    uses_ids = "token"
    summary = "fixed balanced random map id → expert (Roller et al.); hashes the row when no `ids`"

    table: torch.Tensor
    row_hash: torch.Tensor

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 1,
        *,
        num_ids: int | None = None,
        seed: int = 0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, k, check_finite=check_finite, dtype=dtype)
        if num_ids is not None and check_int("num_ids", num_ids, low=1) > MAX_NUM_IDS:
            raise ValueError(
                f"num_ids={num_ids} would need a table of {num_ids * 8 / 2**30:,.0f} GiB; num_ids must be <= 2**28: "
                "map larger id spaces down first (ids % 2**28), or leave num_ids=None (ids reduced modulo 65,536)"
            )
        self.num_ids = num_ids
        size = self.num_ids or _DEFAULT_TABLE_SIZE
        generator = torch.Generator().manual_seed(check_seed("seed", seed))
        order = torch.randperm(size, generator=generator)
        table = torch.empty(size, dtype=torch.long)
        table[order] = torch.arange(size) % num_experts
        self.register_buffer("table", table.to(device))
        # Odd multipliers for hashing the bits of a row (used only when no ids are given).
        row_hash = torch.randint(1, 1 << 31, (d_in,), generator=generator) * 2 + 1
        self.register_buffer("row_hash", row_hash.to(device))
        del dtype  # no floating-point state: accepted for the factory-argument convention

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        if ids is None:
            ids = self._hash_rows(x)
        elif self.num_ids is not None and ids.numel() and not skip_value_checks():
            if device_side_checks(ids):  # no host read on CUDA or in a compiled graph
                torch._assert_async((ids < self.num_ids).all(), f"ids must be < num_ids={self.num_ids}")
            elif int(ids.max()) >= self.num_ids:
                raise ValueError(f"ids must be < num_ids={self.num_ids}, got maximum {int(ids.max())}")
        first = self.table[ids.to(self.table.device) % self.table.numel()]  # [T]
        experts = (first[:, None] + torch.arange(self.k, device=first.device)) % self.num_experts
        weights = x.new_full(experts.shape, 1.0 / self.k)
        return Routing.from_topk(experts.to(x.device), weights, self.num_experts)

    def _hash_rows(self, x: torch.Tensor) -> torch.Tensor:
        bits = x.detach().float().contiguous().view(torch.int32).long()  # [T, d]
        h = (bits * self.row_hash.to(x.device)).sum(-1)
        h = h ^ (h >> 29)
        return torch.remainder(h, self.table.numel())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_ids={self.num_ids}"
