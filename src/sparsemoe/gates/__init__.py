"""Gates by name: one registry, one parser of gate specs.

``available()`` lists the names; ``parse("comet+")`` turns a spec string into a :class:`GateSpec`
(name, local-search flag, options); ``build(name, d_in, num_experts, **options)`` makes a gate.
Every caller goes through these, so a gate's name is interpreted in one place. The trait helpers
(:func:`takes_k`, :func:`learns_sparsity`, :func:`aux_loss_names`, ...) read the gate class's
traits (see :class:`Gate`) and accept any spec :func:`parse` accepts (``"comet+"``, a
:class:`GateSpec`); :func:`markdown_table` renders them as the README's gate table.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .._validation import check_int
from .balance import GlobalBalance, LossFreeBalance, discard_balance, update_balance
from .base import Gate, IdKind, KPolicy, Sparsity, check_z_loss_weight, route_tasks
from .comet import CometGate
from .dselect_k import DSelectKGate
from .expert_choice import ExpertChoiceGate
from .hash import HashGate
from .random import RandomGate
from .sigmoid import SigmoidGate
from .smooth_step import smooth_step
from .softmax import SoftmaxGate
from .table import render_table
from .thor import FixedGate, MeanGate, SentenceDrawGate, TokenDrawGate
from .topk import SwitchGate, TopKGate

_REGISTRY: dict[str, type[Gate]] = {}

#: suffix of a spec that switches permutation local search on (COMET's "+" gates)
LOCAL_SEARCH_SUFFIX = "+"


def register(name: str, cls: type[Gate]) -> type[Gate]:
    """Make ``cls`` buildable as ``build(name, ...)``. Names are unique and may not end in ``+``."""
    if name in _REGISTRY:
        raise ValueError(f"a gate named {name!r} is already registered ({_REGISTRY[name].__name__})")
    if not name or name.endswith(LOCAL_SEARCH_SUFFIX):
        raise ValueError(f"gate names must be non-empty and not end in {LOCAL_SEARCH_SUFFIX!r}; got {name!r}")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    return sorted(_REGISTRY)


def trainable() -> list[str]:
    """Names of the routers to train, sorted: every registered gate except the inference-only ones."""
    return [name for name in available() if not _REGISTRY[name].inference_only]


def _registered(name: str, typed: object) -> type[Gate]:
    """The class registered as ``name``; errors quote ``typed``, the spec as the user wrote it."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown gate {typed!r}; available gates: {', '.join(available())} "
            f"(each may end in {LOCAL_SEARCH_SUFFIX!r} to add local search)"
        )
    return _REGISTRY[name]


def gate_class(spec: str | GateSpec) -> type[Gate]:
    """The class of the gate ``spec`` names (``"comet+"`` gives :class:`CometGate`)."""
    return _REGISTRY[parse(spec).name]


def k_policy(spec: str | GateSpec) -> KPolicy:
    """How the gate ``spec`` sets its ``k``: ``"choose"``, ``"dense"`` (all n) or ``"fixed"``."""
    return gate_class(spec).k_policy


def takes_k(spec: str | GateSpec) -> bool:
    """Whether ``k`` may be chosen for the gate ``spec`` (softmax is dense, switch is top-1)."""
    return k_policy(spec) == "choose"


def sparsity(spec: str | GateSpec) -> Sparsity:
    """``"dense"``, ``"sparse"`` (k experts per input from the start) or ``"learned"`` (see :class:`Gate`)."""
    return gate_class(spec).sparsity


def learns_sparsity(spec: str | GateSpec) -> bool:
    """Whether the gate ``spec`` computes every expert until it saturates (DSelect-k, COMET)."""
    return sparsity(spec) == "learned"


def aux_loss_names(spec: str | GateSpec) -> tuple[str, ...]:
    """Keys the routings of gate ``spec`` may hold in ``aux_losses`` (in training), sorted."""
    return tuple(sorted(gate_class(spec).aux_losses))


def uses_ids(spec: str | GateSpec) -> IdKind | None:
    """Which ids the gate ``spec`` may read: ``"token"``, ``"sequence"`` or ``None`` (see :meth:`Gate.id_kind`)."""
    return gate_class(spec).uses_ids


def accepts_option(spec: str | GateSpec, option: str) -> bool:
    """Whether the gate ``spec`` takes the keyword option ``option`` (e.g. hash's ``num_ids``)."""
    return option in inspect.signature(gate_class(spec).__init__).parameters


def k_options(spec: str | GateSpec, k: int | None) -> dict[str, int]:
    """``{"k": k}`` where the gate ``spec`` lets the caller choose ``k``, else ``{}``.

    For models that take one ``k`` for whichever gate they are given (a dense or top-1 gate ignores it).
    """
    return {"k": k} if k is not None and takes_k(spec) else {}


def markdown_table() -> str:
    """The README's gate table: one row per registered gate, rendered from its class's traits."""
    return render_table([(name, _REGISTRY[name]) for name in available()])


@dataclass(frozen=True)
class GateSpec:
    """A parsed gate spec: which gate, whether local search wraps it, and its options.

    ``GateSpec.parse("topk+", k=2)`` is ``GateSpec("topk", local_search=True, options={"k": 2})``.
    """

    name: str
    local_search: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _registered(self.name, self.name)  # unknown names fail here, listing the available ones
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @classmethod
    def parse(cls, spec: str | GateSpec, *, local_search: bool | None = None, **options: Any) -> GateSpec:
        """Parse ``"name"`` or ``"name+"``; a ``+`` or ``local_search=True`` switches the search on.

        ``local_search=None`` follows the spec; ``local_search=False`` with a spec that asks for the
        search (``"comet+"``) is a contradiction and raises.
        """
        if isinstance(spec, GateSpec):
            name, typed, suffix = spec.name, str(spec), spec.local_search
            options = {**spec.options, **options}
        elif isinstance(spec, str):
            name, typed = spec.removesuffix(LOCAL_SEARCH_SUFFIX), spec
            suffix = name != spec
            if name.endswith(LOCAL_SEARCH_SUFFIX):
                raise ValueError(
                    f"gate {spec!r} ends in more than one {LOCAL_SEARCH_SUFFIX!r}; a single one adds local search"
                )
            _registered(name, spec)
        else:
            raise TypeError(f"gate must be a gate name such as 'topk' or 'comet+', got {type(spec).__name__}")
        if local_search is not None and not isinstance(local_search, bool):
            raise TypeError(f"local_search must be True, False or None, got {type(local_search).__name__}")
        if suffix and local_search is False:
            raise ValueError(
                f"gate {typed!r} asks for local search but local_search=False; "
                f"drop the {LOCAL_SEARCH_SUFFIX!r} or the local_search=False"
            )
        return cls(name, suffix or bool(local_search), options)

    def __str__(self) -> str:
        return self.name + (LOCAL_SEARCH_SUFFIX if self.local_search else "")

    def build(self, d_in: int, num_experts: int, **options: Any) -> Gate:
        """The gate itself (local search is the layer's business), with ``options`` overriding."""
        return build(self.name, d_in, num_experts, **{**self.options, **options})


def parse(spec: str | GateSpec, *, local_search: bool | None = None, **options: Any) -> GateSpec:
    """Shorthand for :meth:`GateSpec.parse`."""
    return GateSpec.parse(spec, local_search=local_search, **options)


def build(name: str, d_in: int, num_experts: int, **options: Any) -> Gate:
    """Build the gate registered as ``name``.

    ``k=None`` (or no ``k``) means the gate's default. A gate whose ``k`` is dense or fixed rejects a
    different ``k``; unknown options are rejected with the list of accepted ones. Every gate takes
    ``z_loss_weight=0``; only those with router logits (``"z_loss"`` in :func:`aux_loss_names`) more.
    """
    cls = _registered(name, name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "d_in", "num_experts")]
    if "z_loss_weight" in options and "z_loss_weight" not in accepted:
        check_z_loss_weight(cls, options.pop("z_loss_weight"))  # 0 is dropped, > 0 raises naming it
    k = options.pop("k", None)
    if k is not None:
        k = check_int("k", k)  # before the policy: a fixed k=1 must not take k=True (True == 1)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        hint = (
            "; the drop limit of any gate is the layer's capacity_limit= (MoE(..., capacity_limit=1.25))"
            if "capacity_factor" in unknown
            else ""
        )
        raise TypeError(
            f"gate {name!r} got unexpected option(s) {', '.join(unknown)}; it accepts: {', '.join(accepted)}{hint}"
        )
    if k is not None and cls.k_policy == "choose":
        options["k"] = k
    gate = cls(d_in, num_experts, **options)
    if k is not None and k != gate.k:
        raise ValueError(f"gate {name!r} has no k to choose (it always routes to {gate.k} expert(s)); got k={k}")
    return gate


for _name, _cls in {
    "softmax": SoftmaxGate,
    "topk": TopKGate,
    "switch": SwitchGate,
    "hash": HashGate,
    "random": RandomGate,
    "expert_choice": ExpertChoiceGate,
    "dselect_k": DSelectKGate,
    "comet": CometGate,
    "fixed": FixedGate,
    "mean": MeanGate,
    "sentence_draw": SentenceDrawGate,
    "token_draw": TokenDrawGate,
    "sigmoid": SigmoidGate,
}.items():
    register(_name, _cls)

__all__ = [
    "LOCAL_SEARCH_SUFFIX",
    "CometGate",
    "DSelectKGate",
    "ExpertChoiceGate",
    "FixedGate",
    "Gate",
    "GateSpec",
    "GlobalBalance",
    "HashGate",
    "IdKind",
    "KPolicy",
    "LossFreeBalance",
    "MeanGate",
    "RandomGate",
    "SentenceDrawGate",
    "SigmoidGate",
    "SoftmaxGate",
    "Sparsity",
    "SwitchGate",
    "TokenDrawGate",
    "TopKGate",
    "accepts_option",
    "aux_loss_names",
    "available",
    "build",
    "discard_balance",
    "gate_class",
    "k_options",
    "k_policy",
    "learns_sparsity",
    "markdown_table",
    "parse",
    "register",
    "route_tasks",
    "smooth_step",
    "sparsity",
    "takes_k",
    "trainable",
    "update_balance",
    "uses_ids",
]
