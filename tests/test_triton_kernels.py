"""The kernel backends: the registry and its one switch, the fused Triton kernels in Triton's CPU
interpreter (a subprocess), compiled for Hopper, and on a GPU.

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
from sparsemoe.kernels import backends
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


#: (GATHER, SCATTER, HAS_SCALE, ROWDOT, weight transposed) of every grouped-matmul launch in triton_fused's
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

    from sparsemoe.kernels import triton_fused as tk

    elem = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    tiles = {**tk._tiles(dtype), "ACC": tl.float32, "PRECISION": tk._precision(dtype)}
    for gather, scatter, scale, rowdot, transposed in MM_VARIANTS:
        pointers = {"x_ptr": elem, "w_ptr": elem, "y_ptr": "*fp32" if scatter else elem, "index_ptr": "*i64",
                    "scale_ptr": "*fp32", "other_ptr": elem, "rowdot_ptr": "*fp32", "offsets_ptr": "*i32"}  # fmt: skip
        unit = {"stride_xk", "stride_yc", "stride_oc", "stride_wk" if transposed else "stride_wc"}
        flags = {"GATHER": gather, "SCATTER": scatter, "HAS_SCALE": scale, "ROWDOT": rowdot, "NP2": 64}
        _compile_for_hopper(tk._grouped_matmul_kernel, pointers, unit, {**tiles, **flags})
    for gather_a, gather_b, scale in WGRAD_VARIANTS:
        pointers = {"a_ptr": elem, "b_ptr": elem, "out_ptr": elem, "index_ptr": "*i64", "scale_ptr": "*fp32",
                    "offsets_ptr": "*i32"}  # fmt: skip
        flags = {"GATHER_A": gather_a, "GATHER_B": gather_b, "HAS_SCALE": scale}
        _compile_for_hopper(
            tk._grouped_matmul_weight_grad_kernel, pointers, {"stride_ac", "stride_bc", "stride_ob"}, {**tiles, **flags}
        )


def _recording(name: str, calls: list[str], accepts: object = None) -> backends.Backend:
    """A backend that records its calls and computes with the torch kernels."""

    def gather(*args: object) -> torch.Tensor:
        calls.append("gather")
        return backends.TORCH.gather_matmul(*args)  # type: ignore[arg-type]

    def combine(*args: object) -> torch.Tensor:
        calls.append("combine")
        return backends.TORCH.matmul_combine(*args)  # type: ignore[arg-type]

    return backends.Backend(name, gather, combine, accepts or (lambda x, dtype: True))  # type: ignore[arg-type]


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process without a choice yet (the environment is read again); restored afterwards."""
    monkeypatch.setattr(backends, "_CHOSEN", [])
    monkeypatch.setattr(backends, "_LOADED", {})
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)


@pytest.mark.usefixtures("fresh_choice")
def test_backend_is_torch_by_default_and_chosen_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.get_backend() == "torch" and set(kernels.backend_names()) >= {"torch", "triton"}
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend='cuda' is not a kernel backend; choose one of 'torch', 'triton'"):
        kernels.set_backend("cuda")
    assert kernels.get_backend() == "torch"  # a rejected name changes nothing
    monkeypatch.setattr(backends, "_CHOSEN", [])
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    assert kernels.get_backend() == "triton"
    monkeypatch.setattr(backends, "_CHOSEN", [])
    monkeypatch.setenv(kernels.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="SPARSEMOE_KERNELS='fast' is not a kernel backend"):
        kernels.get_backend()


@pytest.mark.usefixtures("fresh_choice")
def test_register_backend_rejects_duplicates_and_bad_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        kernels.register_backend("torch", lambda: backends.TORCH)
    with pytest.raises(TypeError, match="non-empty string"):
        kernels.register_backend("", lambda: backends.TORCH)


def test_triton_accepts_only_cuda_supported_dtypes_outside_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    accepts = backends._triton_accepts
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert accepts(cuda_like, torch.bfloat16)  # type: ignore[arg-type]
    assert not accepts(cuda_like, torch.float64)  # type: ignore[arg-type]
    assert not accepts(torch.zeros(2, dtype=torch.bfloat16), torch.bfloat16)  # CPU: never
    with monkeypatch.context() as patch:
        patch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        assert not accepts(cuda_like, torch.bfloat16)  # type: ignore[arg-type]
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not accepts(cuda_like, torch.bfloat16)  # type: ignore[arg-type]
    with monkeypatch.context() as patch:
        patch.setattr(torch._C, "_are_functorch_transforms_active", lambda: True)
        assert not accepts(cuda_like, torch.bfloat16)  # type: ignore[arg-type]


def _routed(seed: int = 0) -> tuple[torch.Tensor, Routing, StackedExperts]:
    torch.manual_seed(seed)
    experts = StackedExperts(4, 8, 16)
    top = torch.rand(6, 4).topk(2, dim=-1)
    return torch.randn(6, 8), Routing.from_topk(top.indices, torch.softmax(top.values, -1), 4), experts


@pytest.mark.usefixtures("fresh_choice")
def test_dispatch_takes_the_chosen_backend_only_where_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    x, routing, experts = _routed()
    expected = reference_dispatch(x, routing, experts)
    calls: list[str] = []
    monkeypatch.setitem(backends._LOADED, "triton", _recording("triton", calls, backends._triton_accepts))
    with kernels.use_backend("triton"):
        torch.testing.assert_close(dispatch(x, routing, experts), expected)
    assert calls == []  # CPU tensors: the triton backend stands aside
    monkeypatch.setitem(backends._LOADED, "triton", _recording("triton", calls))
    torch.testing.assert_close(dispatch(x, routing, experts), expected)
    assert calls == []  # not chosen
    with kernels.use_backend("triton"):
        torch.testing.assert_close(dispatch(x, routing, experts), expected)
    assert calls == ["gather", "combine"]


@pytest.mark.usefixtures("fresh_choice")
def test_unloadable_backend_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(backends._LOADED, "triton", None)  # as without triton
    monkeypatch.setattr(backends, "_WARNED", set())
    x, routing, experts = _routed()
    with kernels.use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="'triton' cannot run here; using 'torch'"):
            y = dispatch(x, routing, experts)
        torch.testing.assert_close(y, reference_dispatch(x, routing, experts))


def test_fused_triton_path_is_off_by_default_in_a_fresh_process() -> None:
    """A plain import chooses "torch" (the Triton kernels are unverified on a GPU) and imports no triton."""
    code = (
        "import sys, sparsemoe, torch\n"
        "m = sparsemoe.MoE(8, 16, 4, gate='topk', k=2)\n"
        "m(torch.randn(5, 8))\n"
        "print(sparsemoe.kernels.get_backend(), 'sparsemoe.kernels.triton_fused' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPARSEMOE_KERNELS"}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["torch", "False"]


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
def test_cuda_layer_same_with_and_without_triton(dtype: torch.dtype, kind: str) -> None:
    """On a GPU: the layer with the fused kernels against the same layer without them (forward and every gradient)."""
    assert kernels.load_backend("triton") is not None
    torch.manual_seed(10)
    moe = sparsemoe.MoE(96, 80, 6, k=2, expert=kind, noisy=False, device="cuda", dtype=dtype)
    x = torch.randn(300, 96, device="cuda", dtype=dtype, requires_grad=True)
    results = []
    for enabled in (True, False):
        with kernels.use_backend("triton" if enabled else "torch"):
            out = moe(x)
            grads = torch.autograd.grad(out.float().square().sum(), [x, *moe.parameters()])
        results.append([out, *grads])
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)
