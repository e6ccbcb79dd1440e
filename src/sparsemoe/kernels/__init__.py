"""Kernels of the dispatch: the grouped matmul, the weighted combine, and the backend registry.

Modules:
    :mod:`~sparsemoe.kernels.ops`: the kernels as autograd Functions (eager) and custom ops
        (``torch.compile``, ``torch.jit.trace``, ``torch.func``).
    :mod:`~sparsemoe.kernels.backends`: which implementation computes a routed batch (``"torch"``,
        the default, or the opt-in, GPU-unverified ``"triton"``); :func:`set_backend`,
        :func:`use_backend` and ``SPARSEMOE_KERNELS`` choose it.
    :mod:`~sparsemoe.kernels.triton_fused`: the fused Triton kernels; imports ``triton`` and is
        imported only when the ``"triton"`` backend is first used.

Nothing here imports from the rest of :mod:`sparsemoe`.
"""

from .backends import (
    BACKEND_ENV,
    Backend,
    backend_names,
    get_backend,
    load_backend,
    register_backend,
    resolve_backend,
    set_backend,
    use_backend,
)
from .ops import expert_offsets, grouped_matmul, grouped_mm_supported, weighted_combine

__all__ = [
    "BACKEND_ENV",
    "Backend",
    "backend_names",
    "expert_offsets",
    "get_backend",
    "grouped_matmul",
    "grouped_mm_supported",
    "load_backend",
    "register_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
    "weighted_combine",
]
