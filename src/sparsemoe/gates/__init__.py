"""Gates by name: ``available()`` lists them, ``build(name, d_in, num_experts, **kwargs)`` makes one."""

from __future__ import annotations

import inspect

from .base import Gate
from .comet import CometGate
from .dselect_k import DSelectKGate
from .expert_choice import ExpertChoiceGate
from .hash import HashGate
from .random import RandomGate
from .smooth_step import SmoothStep, smooth_step
from .softmax import SoftmaxGate
from .topk import SwitchGate, TopKGate

_REGISTRY: dict[str, type[Gate]] = {}


def register(name: str, cls: type[Gate]) -> type[Gate]:
    """Make ``cls`` buildable as ``build(name, ...)``. Names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"a gate named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    return sorted(_REGISTRY)


def gate_class(name: str) -> type[Gate]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown gate {name!r}; available gates: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, d_in: int, num_experts: int, **kwargs: object) -> Gate:
    """Build the gate registered as ``name``.

    ``k=None`` means the gate's default. Gates without a ``k`` (softmax is dense, switch is top-1)
    reject any other ``k``; unknown keyword arguments are rejected with the list of accepted ones.
    """
    cls = gate_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "d_in", "num_experts")]
    k = kwargs.pop("k", None)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"gate {name!r} got unexpected argument(s) {', '.join(unknown)}; it accepts: {', '.join(accepted)}"
        )
    if k is not None and "k" in params:
        kwargs["k"] = k
    gate = cls(d_in, num_experts, **kwargs)
    if k is not None and k != gate.k:  # a gate without a k knob fixes it (dense: n, switch: 1)
        raise ValueError(f"gate {name!r} has no k (it always routes to {gate.k} expert(s)); got k={k}")
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
}.items():
    register(_name, _cls)

__all__ = [
    "CometGate",
    "DSelectKGate",
    "ExpertChoiceGate",
    "Gate",
    "HashGate",
    "RandomGate",
    "SmoothStep",
    "SoftmaxGate",
    "SwitchGate",
    "TopKGate",
    "available",
    "build",
    "gate_class",
    "register",
    "smooth_step",
]
