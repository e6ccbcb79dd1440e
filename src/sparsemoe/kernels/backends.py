"""Which kernels compute a routed batch's experts: one registry, one setter, one environment variable.

A backend implements the two steps of a :class:`~sparsemoe.experts.StackedExperts` forward that can
be fused with the dispatch: the first grouped GEMM reading its input rows through the pairs' token
index (``gather_matmul``) and the last grouped GEMM adding its weighted rows into the inputs'
outputs (``matmul_combine``). Registered:

- ``"torch"`` (default): gather, :func:`~sparsemoe.kernels.ops.grouped_matmul` (``grouped_mm`` or a
  loop of ``mm``), :func:`~sparsemoe.kernels.ops.weighted_combine`. Every device, dtype and
  transform.
- ``"triton"``: the fused kernels of :mod:`sparsemoe.kernels.triton_fused` (CUDA, ``triton``
  installed). **Unverified on a GPU**: they are checked only in Triton's CPU interpreter so far,
  hence opt-in until a GPU run compares them with the reference (float32 and bf16) and times them.
  float32 inputs use IEEE products (``tl.dot`` would default to TF32) unless
  ``torch.backends.cuda.matmul.allow_tf32`` is set, as for ``torch.matmul``.

Choose with :func:`set_backend` / :func:`use_backend`, or ``SPARSEMOE_KERNELS=triton`` in the
environment (read at the first forward). A chosen backend that cannot take a call (CPU tensors,
an unsupported dtype, ``torch.compile``/``torch.jit.trace``/``torch.func``, deterministic
algorithms) leaves it to ``"torch"``; :func:`resolve_backend` is the one place that decides.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch

from .ops import functorch_active, grouped_matmul, recording_graph, weighted_combine

#: environment variable naming the backend (read at the first forward unless :func:`set_backend` ran)
BACKEND_ENV = "SPARSEMOE_KERNELS"
DEFAULT_BACKEND = "torch"
#: dtypes the fused Triton kernels take on CUDA
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Backend:
    """One implementation of the fusable steps; rows are pairs sorted by expert.

    Attributes:
        name: the registry name.
        gather_matmul: ``(x [T, K], token int[N], weight [n, K, C], offsets int32[n], dtype) -> [N, C]``,
            ``x[token[i]] @ weight[e_i]``, the rows cast to ``dtype`` (autocast's) when it is given.
        matmul_combine: ``(h [N, K], weight [n, K, C], offsets, token, pair_weight [N], T) -> [T, C]``,
            ``y[t] = Σ_{pairs i of t} pair_weight_i · (h_i @ weight[e_i])``.
        accepts: ``(x, dtype) -> bool``, whether it can compute the call for ``x`` in ``dtype``.
    """

    name: str
    gather_matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype | None], torch.Tensor]
    matmul_combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    accepts: Callable[[torch.Tensor, torch.dtype], bool]


def _torch_gather_matmul(
    x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    rows = x.index_select(0, token)  # gathered before the cast: x's gradient is summed in x's dtype
    return grouped_matmul(rows if dtype is None else rows.to(dtype), weight, offsets)


def _torch_matmul_combine(
    h: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    token: torch.Tensor,
    pair_weight: torch.Tensor,
    num_inputs: int,
) -> torch.Tensor:
    return weighted_combine(grouped_matmul(h, weight, offsets), token, pair_weight, num_inputs)


TORCH = Backend("torch", _torch_gather_matmul, _torch_matmul_combine, lambda x, dtype: True)


def _triton_accepts(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """CUDA, a :data:`TRITON_DTYPES` dtype, no graph recording or ``torch.func`` transform, no
    deterministic mode (the fused combine adds with atomics). The device is tested first: CPU calls
    cost one read."""
    return (
        x.is_cuda
        and dtype in TRITON_DTYPES
        and not recording_graph()
        and not functorch_active()
        and not torch.are_deterministic_algorithms_enabled()
    )


def _load_triton() -> Backend | None:
    """The fused Triton kernels, or ``None`` without a usable ``triton`` or under ``TRITON_INTERPRET=1``
    (the CPU interpreter is far too slow for real work; the tests build their own interpreted backend)."""
    try:
        module = importlib.import_module("sparsemoe.kernels.triton_fused")
    except ImportError:
        return None
    return None if module.INTERPRETED else triton_backend(module)


def triton_backend(
    module: ModuleType, accepts: Callable[[torch.Tensor, torch.dtype], bool] = _triton_accepts
) -> Backend:
    """The ``"triton"`` backend made of ``module``'s kernels (:mod:`sparsemoe.kernels.triton_fused`,
    or, in the tests, that module imported under Triton's CPU interpreter with ``accepts`` always true)."""

    def gather_matmul(
        x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype | None
    ) -> torch.Tensor:
        return module.gather_grouped_matmul(x if dtype is None else x.to(dtype), token, weight, offsets)

    return Backend("triton", gather_matmul, module.grouped_matmul_combine, accepts)


_LOADERS: dict[str, Callable[[], Backend | None]] = {"torch": lambda: TORCH, "triton": _load_triton}
_LOADED: dict[str, Backend | None] = {}
_CHOSEN: list[str] = []  # empty until set_backend or the first read of the environment


def register_backend(name: str, loader: Callable[[], Backend | None]) -> None:
    """Register ``loader`` (returns the :class:`Backend`, or ``None`` where it cannot run) as ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if name in _LOADERS:
        raise ValueError(f"a kernel backend named {name!r} is already registered")
    _LOADERS[name] = loader


def backend_names() -> tuple[str, ...]:
    """The registered backends (whether or not they load on this machine: see :func:`load_backend`)."""
    return tuple(_LOADERS)


def _check_name(name: object, where: str) -> str:
    if name not in _LOADERS:
        raise ValueError(f"{where}={name!r} is not a kernel backend; choose one of {', '.join(map(repr, _LOADERS))}")
    return str(name)


def load_backend(name: str) -> Backend | None:
    """The backend ``name`` (imported on first use and cached), or ``None`` where it cannot run here."""
    _check_name(name, "backend")
    if name not in _LOADED:
        _LOADED[name] = _LOADERS[name]()
    return _LOADED[name]


def get_backend() -> str:
    """The chosen backend's name: the last :func:`set_backend`, else ``$SPARSEMOE_KERNELS``, else ``"torch"``."""
    if not _CHOSEN:
        _CHOSEN.append(_check_name(os.environ.get(BACKEND_ENV, DEFAULT_BACKEND), BACKEND_ENV))
    return _CHOSEN[0]


def set_backend(name: str) -> str:
    """Choose the kernel backend for every later forward (process-wide); returns the previous choice."""
    new, previous = _check_name(name, "backend"), get_backend()
    _CHOSEN[0] = new
    return previous


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("triton"): ...`` chooses ``name`` inside the block and restores the previous choice."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(x: torch.Tensor, dtype: torch.dtype | None = None) -> Backend:
    """The backend that computes the experts for ``x`` computed in ``dtype`` (default its own).

    The chosen one if it loads here and accepts the call, else ``"torch"``. Choosing a backend that
    cannot load at all (``triton`` missing) warns once. While a graph is recorded (``torch.compile``,
    ``jit.trace``) it is ``"torch"`` without reading the choice: no other backend accepts such a call,
    and reading the choice for the first time would change Python state inside the traced function
    (a guard that fails on the next call, and a recompile).
    """
    if recording_graph():
        return TORCH
    name = get_backend()
    if name == DEFAULT_BACKEND:
        return TORCH
    backend = load_backend(name)
    if backend is None:
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(f"kernel backend {name!r} cannot run here; using 'torch'", RuntimeWarning, stacklevel=2)
        return TORCH
    return backend if backend.accepts(x, x.dtype if dtype is None else dtype) else TORCH


_WARNED: set[str] = set()
