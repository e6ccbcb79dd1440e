"""The fused Triton path: its kernels in Triton's CPU interpreter (a subprocess), its switch, and on a GPU.

``TRITON_INTERPRET=1`` only works when set before ``triton`` is first imported, and setting it
in this process would leak into every later test; so :func:`test_kernels_in_interpreter` runs
``tests/triton_interpreted_cases.py`` in a fresh interpreter with the variable set.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sparsemoe
from sparsemoe import kernels
from sparsemoe.dispatch import dispatch, reference_dispatch
from sparsemoe.experts import StackedExperts
from sparsemoe.routing import Routing

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None  # not imported here: see the module docstring


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (optional: the gpu extra)")
def test_kernels_in_interpreter() -> None:
    """Every case of tests/triton_interpreted_cases.py passes (forward and gradients against the definition)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "triton_interpreted_cases.py"), "-q", "-p",
         "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


#: (GATHER, SCATTER, HAS_SCALE, ROWDOT, weight transposed) of every grouped_mm launch in triton_kernels'
#: autograd Functions: first layer forward; last layer forward; input gradient; hidden and weight gradient
MM_VARIANTS = [
    (True, False, False, False, False),
    (False, True, True, False, False),
    (False, True, False, False, True),
    (True, False, True, True, True),
    (True, False, True, False, True),
]
#: (GATHER_A, GATHER_B, HAS_SCALE) of every weight_grad launch: first layer, last layer
WGRAD_VARIANTS = [(True, False, False), (False, True, True)]


def _compile_for_hopper(fn: object, pointers: dict[str, str], unit: set[str], consts: dict[str, object]) -> None:
    """Compile ``fn`` to an sm_90 cubin as the JIT would for contiguous tensors (unit inner strides)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names: list[str] = fn.arg_names  # type: ignore[attr-defined]
    signature, constexprs = {}, {}
    for i, name in enumerate(names):
        if name in consts or name in unit:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts.get(name, 1)
        else:
            signature[name] = pointers.get(name, "i32")
    options = {k: consts[k] for k in ("num_warps", "num_stages")}
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32), options=options
    )
    assert kernel.asm["cubin"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (optional: the gpu extra)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_launch_compiles_for_hopper(dtype: torch.dtype) -> None:
    """The interpreter does not run Triton's compiler: compile every variant for sm_90 here (no GPU needed)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the module's kernels are interpreted")
    import triton.language as tl

    from sparsemoe import triton_kernels as tk

    elem = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    tiles = {**tk._tiles(dtype), "ACC": tl.float32, "PRECISION": tk._precision(dtype)}
    for gather, scatter, scale, rowdot, transposed in MM_VARIANTS:
        pointers = {"x_ptr": elem, "w_ptr": elem, "y_ptr": "*fp32" if scatter else elem, "index_ptr": "*i64",
                    "scale_ptr": "*fp32", "other_ptr": elem, "rowdot_ptr": "*fp32", "offsets_ptr": "*i32"}  # fmt: skip
        unit = {"stride_xk", "stride_yc", "stride_oc", "stride_wk" if transposed else "stride_wc"}
        flags = {"GATHER": gather, "SCATTER": scatter, "HAS_SCALE": scale, "ROWDOT": rowdot, "NP2": 64}
        _compile_for_hopper(tk._grouped_mm_kernel, pointers, unit, {**tiles, **flags})
    for gather_a, gather_b, scale in WGRAD_VARIANTS:
        pointers = {"a_ptr": elem, "b_ptr": elem, "out_ptr": elem, "index_ptr": "*i64", "scale_ptr": "*fp32",
                    "offsets_ptr": "*i32"}  # fmt: skip
        flags = {"GATHER_A": gather_a, "GATHER_B": gather_b, "HAS_SCALE": scale}
        _compile_for_hopper(
            tk._weight_grad_kernel, pointers, {"stride_ac", "stride_bc", "stride_ob"}, {**tiles, **flags}
        )


def test_use_triton_only_for_cuda_and_supported_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "triton_kernels", lambda: object())
    monkeypatch.setattr(kernels, "_TRITON_WANTED", True)
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert kernels.use_triton(cuda_like)  # type: ignore[arg-type]
    assert not kernels.use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64))  # type: ignore[arg-type]
    assert kernels.use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64), torch.bfloat16)  # type: ignore[arg-type]
    assert not kernels.use_triton(torch.zeros(2, dtype=torch.bfloat16))  # CPU: never
    kernels.set_triton(False)
    assert not kernels.use_triton(cuda_like)  # type: ignore[arg-type]
    kernels.set_triton(True)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        assert not kernels.use_triton(cuda_like)  # type: ignore[arg-type]
    monkeypatch.setattr(kernels, "triton_kernels", lambda: None)  # triton not importable
    assert not kernels.use_triton(cuda_like)  # type: ignore[arg-type]


def test_cpu_dispatch_never_asks_for_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("forward_combined called on CPU")

    monkeypatch.setattr(StackedExperts, "forward_combined", refuse)
    experts = StackedExperts(4, 8, 16)
    top = torch.rand(6, 4).topk(2, dim=-1)
    routing = Routing.from_topk(top.indices, torch.softmax(top.values, -1), 4)
    x = torch.randn(6, 8)
    torch.testing.assert_close(dispatch(x, routing, experts), reference_dispatch(x, routing, experts))


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
def test_cuda_layer_same_with_and_without_triton(dtype: torch.dtype, kind: str) -> None:
    """On a GPU: the layer with the fused kernels against the same layer without them (forward and every gradient)."""
    assert kernels.triton_kernels() is not None
    torch.manual_seed(10)
    moe = sparsemoe.MoE(96, 80, 6, k=2, expert=kind, noisy=False, device="cuda", dtype=dtype)
    x = torch.randn(300, 96, device="cuda", dtype=dtype, requires_grad=True)
    results = []
    for enabled in (True, False):
        kernels.set_triton(enabled)
        try:
            out = moe(x)
            grads = torch.autograd.grad(out.float().square().sum(), [x, *moe.parameters()])
        finally:
            kernels.set_triton(True)
        results.append([out, *grads])
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)
