"""Gates by name: one registry, one parser of gate specs.

``available()`` lists the names; ``parse("comet+")`` turns a spec string into a :class:`GateSpec`
(name, local-search flag, options); ``build(name, d_in, num_experts, **options)`` makes a gate.
Every caller goes through these, so a gate's name is interpreted in one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .base import Gate, KPolicy, route_tasks
from .comet import CometGate
from .dselect_k import DSelectKGate
from .expert_choice import ExpertChoiceGate
from .hash import HashGate
from .random import RandomGate
from .smooth_step import smooth_step
from .softmax import SoftmaxGate
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


def gate_class(name: str) -> type[Gate]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown gate {name!r}; available gates: {', '.join(available())}")
    return _REGISTRY[name]


def k_policy(name: str) -> KPolicy:
    """How the gate ``name`` sets its ``k``: ``"choose"``, ``"dense"`` (all n) or ``"fixed"``."""
    return gate_class(name).k_policy


def takes_k(name: str) -> bool:
    """Whether ``k`` may be chosen for the gate ``name`` (softmax is dense, switch is top-1)."""
    return k_policy(name) == "choose"


def accepts_option(name: str, option: str) -> bool:
    """Whether the gate ``name`` takes the keyword option ``option`` (e.g. hash's ``num_ids``)."""
    return option in inspect.signature(gate_class(name).__init__).parameters


def k_options(name: str, k: int | None) -> dict[str, int]:
    """``{"k": k}`` where the gate ``name`` lets the caller choose ``k``, else ``{}``.

    For models that take one ``k`` for whichever gate they are given (a dense or top-1 gate ignores it).
    """
    return {"k": k} if k is not None and takes_k(name) else {}


@dataclass(frozen=True)
class GateSpec:
    """A parsed gate spec: which gate, whether local search wraps it, and its options.

    ``GateSpec.parse("topk+", k=2)`` is ``GateSpec("topk", local_search=True, options={"k": 2})``.
    """

    name: str
    local_search: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gate_class(self.name)  # unknown names fail here, listing the available ones
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @classmethod
    def parse(cls, spec: str | GateSpec, *, local_search: bool = False, **options: Any) -> GateSpec:
        """Parse ``"name"`` or ``"name+"``; ``local_search=True`` or a ``+`` switches the search on."""
        if isinstance(spec, GateSpec):
            return cls(spec.name, spec.local_search or local_search, {**spec.options, **options})
        if not isinstance(spec, str):
            raise TypeError(f"gate must be a gate name such as 'topk' or 'comet+', got {type(spec).__name__}")
        name = spec.removesuffix(LOCAL_SEARCH_SUFFIX)
        return cls(name, local_search or name != spec, options)

    def __str__(self) -> str:
        return self.name + (LOCAL_SEARCH_SUFFIX if self.local_search else "")

    def build(self, d_in: int, num_experts: int, **options: Any) -> Gate:
        """The gate itself (local search is the layer's business), with ``options`` overriding."""
        return build(self.name, d_in, num_experts, **{**self.options, **options})


def parse(spec: str | GateSpec, *, local_search: bool = False, **options: Any) -> GateSpec:
    """Shorthand for :meth:`GateSpec.parse`."""
    return GateSpec.parse(spec, local_search=local_search, **options)


def build(name: str, d_in: int, num_experts: int, **options: Any) -> Gate:
    """Build the gate registered as ``name``.

    ``k=None`` (or no ``k``) means the gate's default. A gate whose ``k`` is dense or fixed rejects a
    different ``k``; unknown options are rejected with the list of accepted ones.
    """
    cls = gate_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "d_in", "num_experts")]
    k = options.pop("k", None)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"gate {name!r} got unexpected option(s) {', '.join(unknown)}; it accepts: {', '.join(accepted)}"
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
    "HashGate",
    "KPolicy",
    "MeanGate",
    "RandomGate",
    "SentenceDrawGate",
    "SoftmaxGate",
    "SwitchGate",
    "TokenDrawGate",
    "TopKGate",
    "accepts_option",
    "available",
    "build",
    "gate_class",
    "k_options",
    "k_policy",
    "parse",
    "register",
    "route_tasks",
    "smooth_step",
    "takes_k",
    "trainable",
]
