"""sparsemoe's dispatch as a Hugging Face experts implementation (``experts_implementation="sparsemoe"``).

Hugging Face MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3...) keep their experts
in one module decorated with ``@use_experts_implementation``: stacked weights ``gate_up_proj``
(or ``up_proj``) ``[n, 2h, d]`` and ``down_proj [n, d, h]`` (``[n, in, out]`` when ``is_transposed``),
and a forward ``(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k]) -> [T, d]`` chosen
by name from transformers' ``ExpertsInterface``. :func:`sparsemoe_experts_forward` is that forward
on sparsemoe's dispatch: the router's choice becomes a :class:`~sparsemoe.Routing`, the module is
seen as an :class:`~sparsemoe.ExpertBank`, and the kernel backend (:mod:`sparsemoe.kernels`) does
the gather inside the first grouped GEMM and the combine inside the last.

``import sparsemoe.hf`` registers it under ``"sparsemoe"`` without importing transformers: at once
if ``transformers.integrations.moe`` is already imported, else right after transformers imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..dispatch import dispatch
from ..experts import ExpertBank
from ..kernels import expert_offsets, grouped_matmul, resolve_backend, weighted_combine
from ..routing import Routing

#: the name under which transformers finds sparsemoe's experts forward
EXPERTS_IMPLEMENTATION = "sparsemoe"
_HF_MODULE = "transformers.integrations.moe"


class HFExperts(ExpertBank):
    """A Hugging Face experts module seen as a sparsemoe expert bank (its weights stay where they are).

    Shape: ``forward_sorted(xs [N, d], counts LongTensor[n]) -> [N, d]``.
    """

    hf: Any  # the decorated Hugging Face experts module (attributes set by transformers)

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "hf", module)  # not a submodule: the HF module owns its weights
        self.num_experts = int(self.hf.num_experts)
        self.d_out = None

    def _weight(self, name: str) -> torch.Tensor:
        """``[n, in, out]`` (a transposed view for the ``[n, out, in]`` layout)."""
        w: torch.Tensor = getattr(self.hf, name)
        return w if self.hf.is_transposed else w.transpose(1, 2)

    def _bias(self, name: str, counts: torch.Tensor, rows: int) -> torch.Tensor | None:
        if not self.hf.has_bias:
            return None
        b: torch.Tensor = getattr(self.hf, f"{name}_bias")  # [n, out]
        return b.repeat_interleave(counts, dim=0, output_size=rows)

    def _first(self) -> str:
        return "gate_up_proj" if self.hf.has_gate else "up_proj"

    def _activate(self, h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        bias = self._bias(self._first(), counts, h.shape[0])
        h = h if bias is None else h + bias
        return self.hf._apply_gate(h) if self.hf.has_gate else self.hf.act_fn(h)

    def _second(self, h: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        y = grouped_matmul(h, self._weight("down_proj"), offsets)
        bias = self._bias("down_proj", counts, h.shape[0])
        y = y if bias is None else y + bias
        return self.hf.post_expert_norm(y) if self.hf.has_post_expert_norm else y

    def forward_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = expert_offsets(counts)
        h = self._activate(grouped_matmul(xs, self._weight(self._first()), offsets), counts)
        return self._second(h, counts, offsets)

    def forward_combined(
        self, x: torch.Tensor, token: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor, num_inputs: int
    ) -> torch.Tensor:
        """Gather fused into the first GEMM; combine fused into the last unless a bias or norm sits between."""
        ops = resolve_backend(x)
        offsets = expert_offsets(counts)
        h = self._activate(ops.gather_matmul(x, token, self._weight(self._first()), offsets, None), counts)
        if self.hf.has_bias or self.hf.has_post_expert_norm:
            return weighted_combine(self._second(h, counts, offsets), token, weight, num_inputs)
        return ops.matmul_combine(h, self._weight("down_proj"), offsets, token, weight.to(h.dtype), num_inputs)


def sparsemoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward of a ``@use_experts_implementation`` module on sparsemoe's dispatch.

    Shape: ``hidden_states [T, d]``, ``top_k_index LongTensor[T, k]``, ``top_k_weights [T, k]`` -> ``[T, d]``.
    """
    if getattr(self, "_is_expert_parallel", False):
        raise ValueError(
            'experts_implementation="sparsemoe" does not take expert-parallel sharded experts; use "grouped_mm" there'
        )
    routing = Routing.from_topk(top_k_index, top_k_weights.to(hidden_states.dtype), int(self.num_experts))  # type: ignore[arg-type]
    return dispatch(hidden_states, routing, HFExperts(self)).to(hidden_states.dtype)


def _register(module: ModuleType) -> None:
    module.ExpertsInterface.register(EXPERTS_IMPLEMENTATION, sparsemoe_experts_forward)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """One-shot import hook: registers the experts forward as soon as transformers' MoE module is loaded."""

    def __init__(self) -> None:
        self._inner: importlib.abc.Loader | None = None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _HF_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        self._inner, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        assert self._inner is not None
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        assert self._inner is not None
        self._inner.exec_module(module)
        _register(module)


def register_experts_backend() -> None:
    """Make ``experts_implementation="sparsemoe"`` available to transformers (done by ``import sparsemoe.hf``)."""
    loaded = sys.modules.get(_HF_MODULE)
    if loaded is not None:
        _register(loaded)
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
