"""The gate interface: ``[T, d]`` inputs in, a :class:`~sparsemoe.routing.Routing` out."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_dtype, check_float, check_float_dtype, check_ids, check_input, check_int
from ..routing import Routing

KPolicy = Literal["choose", "dense", "fixed"]
IdKind = Literal["token", "sequence"]
Sparsity = Literal["dense", "sparse", "learned"]


class Gate(nn.Module):
    """Base class of every gate.

    Subclasses implement :meth:`route`; :meth:`forward` validates the input first, so every gate
    rejects bad input the same way. Layers validate once themselves and call :meth:`route`.

    A subclass declares its traits as class attributes, so that callers (layers, models, studies,
    the README's gate table) never special-case gate names; ``sparsemoe.gates`` reads them for any
    spec (``gates.takes_k("comet+")``):

    - ``k_policy``: how its ``k`` is set: ``"choose"`` (the caller may pass ``k``; the constructor's
      default otherwise), ``"dense"`` (always all ``n`` experts) or ``"fixed"`` (the constructor sets it);
    - ``sparsity``: ``"dense"`` (every expert for every input), ``"sparse"`` (``k`` experts per input
      from the first step; ``k`` on average for expert choice) or ``"learned"`` (every expert until
      its smooth-steps saturate, then at most ``k``: DSelect-k, COMET);
    - ``aux_losses``: the keys its routings' ``aux_losses`` may hold (in training), each with what it is;
      a gate with learned router logits lists ``"z_loss"`` (see :func:`z_loss_trait`) and so takes
      ``z_loss_weight=``; the others reject a non-zero one;
    - ``uses_ids``: which ids it may read (see :meth:`id_kind`);
    - ``summary`` and ``k_note``: its row of the README's gate table (``summary`` defaults to the
      docstring's first line; ``k_note`` says what ``k`` counts, or the value of a fixed ``k``).

    Args:
        d_in: width of the gate input.
        num_experts: number of experts ``n``.
        k: experts per input, where the gate has such a knob (``1 <= k <= n``).
        check_finite: reject inputs with NaN/inf (one reduction; switch off for speed).
        dtype: the subclass's factory ``dtype`` (checked here: a floating-point dtype or ``None``).
        z_loss_weight: weight ``β`` of the router z-loss ``β · mean logsumexp(router logits)²`` (Zoph
            et al. 2022, ST-MoE uses 1e-3), added by :meth:`_z_loss` in training; 0 is off. Only
            gates whose ``aux_losses`` trait lists ``"z_loss"`` (they have router logits) accept > 0.

    Shape:
        ``forward(x [T, d_in], ids LongTensor[T] | None) -> Routing`` of ``T`` inputs.
    """

    k_policy: ClassVar[KPolicy] = "choose"
    sparsity: ClassVar[Sparsity] = "sparse"
    aux_losses: ClassVar[Mapping[str, str]] = MappingProxyType({})
    uses_ids: ClassVar[IdKind | None] = None
    summary: ClassVar[str] = ""
    k_note: ClassVar[str] = ""
    #: True for gates that only evaluate a model trained with another gate (THOR's inference modes)
    inference_only: ClassVar[bool] = False

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 1,
        *,
        check_finite: bool = True,
        dtype: torch.dtype | None = None,
        z_loss_weight: float = 0.0,
    ) -> None:
        """``dtype`` is checked here (a floating-point dtype or ``None``) before a subclass builds with it."""
        super().__init__()
        check_float_dtype("dtype", dtype)
        z_loss_weight = check_z_loss_weight(type(self), z_loss_weight)
        self.d_in = check_int("d_in", d_in, low=1)
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.k = check_int("k", k, low=1, high=num_experts)
        self.check_finite = check_finite
        self.z_loss_weight = z_loss_weight

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        """Route ``x: [T, d_in]``; ``ids: LongTensor[T]`` is read by gates that use ids."""
        check_input(x, self.d_in, check_finite=self.check_finite)
        check_dtype(x, self, layer=type(self).__name__)
        if x.dim() != 2:
            raise ValueError(f"x must have shape [T, {self.d_in}], got {tuple(x.shape)}")
        if ids is not None:
            ids = check_ids(ids, x.shape[0])
        return self.route(x, ids)

    def _z_loss(self, logits: torch.Tensor) -> torch.Tensor | None:
        """``z_loss_weight · router_z_loss(logits)`` in training (``[]``, or ``[G]`` for ``logits: [T, G, n]``).

        ``None`` when it is off: in eval, at weight 0, or for no rows. ``logits`` are what the gate's
        softmax (or sigmoid) reads, in the gate's precision.
        """
        if not self.training or self.z_loss_weight == 0 or logits.shape[0] == 0:
            return None
        return self.z_loss_weight * router_z_loss(logits)

    def id_kind(self) -> IdKind | None:
        """Which ids :meth:`forward` reads: ``"token"`` (token or user ids, e.g. hash), ``"sequence"``
        (the sequence index of each row, e.g. per-sentence random draws) or ``None`` (ids are ignored).

        Models use it to pass each gate the ids it needs. The class's ``uses_ids`` by default; a gate
        whose settings decide it (the random gate's granularity) overrides this.
        """
        return self.uses_ids

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        """Route already validated input ``x: [T, d_in]`` (``ids`` already checked)."""
        raise NotImplementedError

    def batch_key(self) -> Hashable | None:
        """Gates of one class with equal keys can route the same rows in one :meth:`route_batch` call.

        ``None`` (the default): this gate always routes alone. A gate that implements
        :meth:`route_batch` returns every setting its maths reads besides the parameters, ``n``,
        ``k`` and the training mode (:func:`route_tasks` compares those for every gate).
        """
        return None

    @classmethod
    def route_batch(cls, gates: Sequence[Gate], x: torch.Tensor, ids: torch.Tensor | None) -> list[Routing]:
        """The routing of ``x: [T, d_in]`` by each of ``gates`` (all of this class, equal :meth:`batch_key`).

        Gates that override it write their maths once, with a leading gate axis, and define
        :meth:`route` as a batch of one. At the COMET paper's scale a training step costs per-op
        overhead, not FLOPs, so the task gates of an MMoE then issue one set of small ops instead
        of one per task.
        """
        return [gate.route(x, ids) for gate in gates]

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, num_experts={self.num_experts}, k={self.k}"


def route_tasks(gates: Sequence[Gate], x: torch.Tensor, ids: torch.Tensor | None) -> list[Routing]:
    """Each gate's routing of the same rows ``x: [T, d_in]``: one batched call when they allow it."""
    first = gates[0]
    signature = _batch_signature(first)
    if (
        len(gates) > 1
        and signature is not None
        and _defines("route", type(first)) is _defines("route_batch", type(first))
        and all(_batch_signature(g) == signature for g in gates[1:])
    ):
        return type(first).route_batch(gates, x, ids)
    return [gate.route(x, ids) for gate in gates]


def _batch_signature(gate: Gate) -> tuple[object, ...] | None:
    """What must match for gates to share a :meth:`Gate.route_batch` call (``None``: routes alone)."""
    key = gate.batch_key()
    return None if key is None else (type(gate), gate.num_experts, gate.k, gate.training, gate.z_loss_weight, key)


def _defines(method: str, cls: type) -> type:
    """The class in ``cls``'s MRO whose own body defines ``method``.

    A subclass that overrides :meth:`Gate.route` but inherits a batched :meth:`Gate.route_batch`
    would be bypassed by a batched call, so batching needs both from the same class.
    """
    return next(klass for klass in cls.__mro__ if method in vars(klass))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean over rows of logsumexp(logits)²`` along the last dimension (Zoph et al. 2022, ST-MoE).

    Keeps router logits small, so the softmax stays out of the range where bf16/fp32 rounding flips
    choices. ``logits: [T, ..., n]`` gives ``[...]`` (one loss per gate of a batched call); entries of
    ``-inf`` (an unreachable COMET leaf) are allowed.
    """
    return torch.logsumexp(logits, dim=-1).pow(2).mean(0)


def z_loss_trait(logits: str) -> dict[str, str]:
    """The ``aux_losses`` entry of a gate whose router logits are ``logits`` (a formula for the table)."""
    return {"z_loss": f"β · mean logsumexp({logits})², with `z_loss_weight=` > 0 (Zoph et al. 2022)"}


def check_z_loss_weight(cls: type[Gate], weight: object) -> float:
    """``weight`` as a float >= 0; a non-zero one only for a gate class with router logits."""
    weight = check_float("z_loss_weight", weight, low=0.0)
    if weight > 0 and "z_loss" not in cls.aux_losses:
        raise ValueError(
            f"z_loss_weight={weight}: {cls.__name__} learns no router logits, so it has no router z-loss; "
            "leave z_loss_weight at 0 (the gates with one list 'z_loss' in their aux_losses)"
        )
    return weight


def with_z_loss(aux: list[dict[str, torch.Tensor]], z_loss: torch.Tensor | None) -> list[dict[str, torch.Tensor]]:
    """Each gate's losses ``aux`` plus its ``"z_loss"`` from ``z_loss: [G]`` (unchanged when ``None``)."""
    if z_loss is None:
        return aux
    return [{**losses, "z_loss": z} for losses, z in zip(aux, z_loss.unbind(0), strict=True)]


def linear_batch(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """``[T, G·m]``: the rows ``x: [T, d]`` through ``G`` linear layers of one shape, in one product.

    Column block ``g`` is ``layers[g](x)``; a single layer is applied as it is.
    """
    if len(layers) == 1:
        return layers[0](x)
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, torch.cat([layer.weight for layer in layers]), bias)


def stack_batch(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[G, *shape]``: one tensor per gate (a view for a single one)."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(list(tensors))


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy along ``dim`` with the ``+1e-6`` of the official DSelect-k/COMET code.

    The offset keeps the gradient finite at ``p = 0`` (where ``p log p`` has slope ``-inf``).
    """
    return -(p * torch.log(p + 1e-6)).sum(dim)


def uniform_(tensor: torch.Tensor, bound: float) -> torch.Tensor:
    """In-place ``U(-bound, bound)`` init without autograd tracking."""
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def uniform_linear(
    d_in: int,
    d_out: int,
    weight_bound: float,
    bias_bound: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Linear:
    """``nn.Linear`` initialised ``U(±weight_bound)``, ``U(±bias_bound)`` (the official gates' init).

    ``d_out`` may be 0 (a one-expert tree has no splits).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        layer = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    uniform_(layer.weight, weight_bound)
    uniform_(layer.bias, bias_bound)
    return layer
