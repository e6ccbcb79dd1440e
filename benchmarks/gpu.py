"""``python -m benchmarks.gpu``: the layer against dense GEMMs and the HF block on one GPU (issue 13).

NOT YET RUN ON A GPU: written and checked on CPU only (``--device cpu --quick``, which the tests
run); the first GPU run must confirm it fits its budget (< 4 minutes on one H100) before its
numbers are quoted.

For each of the issue's three shapes it times one training step (forward + backward, bf16, top-k
routing without noise or balance loss, ``swiglu`` experts) of the dense-equivalent (``T·k`` rows
through one expert-sized network: the FLOP floor), our layer with the fused Triton kernels of
:mod:`sparsemoe.kernels.triton_fused` (the opt-in ``"triton"`` kernel backend, unverified on a GPU
until this runs: CUDA with ``triton`` installed only) and without them, our layer
under ``torch.compile(fullgraph=True, dynamic=True)`` (which does not use them), and the HF Mixtral
block with its ``grouped_mm`` experts where ``transformers`` is installed; then every gate's layer
at the third shape against top-k (the library's default: the ``"torch"`` kernel backend), and
saturated DSelect-k and COMET layers at n=64, k=2 against top-k at the same n and k. Peak
memory is ``torch.cuda.max_memory_allocated`` over one step. Rounds are interleaved and checked for
spread as in every benchmark here (:mod:`benchmarks.timing`). Writes
``RESULTS-gpu.md`` next to this file (``--out`` to change), naming the device.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

import sparsemoe
from sparsemoe import kernels
from sparsemoe.atomic import atomic_write_text

from . import report, timing
from .bench_gates import VS_TOPK_LIMIT, saturate
from .cases import Case, DenseEquivalent
from .peers import PEERS

HERE = Path(__file__).resolve().parent
#: (T tokens, d, h, n experts, k) of issue 13's table
SHAPES = ((8192, 4096, 14336, 8, 2), (16384, 2048, 1408, 64, 6), (16384, 512, 2048, 16, 2))
QUICK_SHAPES = ((256, 64, 128, 8, 2), (256, 32, 48, 16, 3), (256, 16, 64, 8, 2))
GATE_KWARGS: dict[str, dict[str, object]] = {"softmax": {}, "switch": {}, "hash": {"k": 1}}
#: experts and k of the saturated DSelect-k/COMET comparison (issue 13, item 2), at the third shape's T, d, h
SATURATED_EXPERTS, SATURATED_K = 64, 2


def _synchronised(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """The step followed by a device synchronisation, so that the host clock measures the device's work."""
    if device.type != "cuda":
        return step

    def run() -> None:
        step()
        torch.cuda.synchronize(device)

    return run


def _data(rows: int, d: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g).to(device, dtype).requires_grad_()
    return x, torch.randn(rows, d, generator=g).to(device, dtype)


def _ours(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, gate: str = "topk", **kw: object) -> Case:
    tokens, d, h, n, k = shape
    torch.manual_seed(0)
    options: dict[str, object] = (
        {"k": k, "noisy": False, "balance_weight": 0.0} if gate == "topk" else GATE_KWARGS.get(gate, {"k": k})
    )
    moe = sparsemoe.MoE(d, h, n, gate=gate, expert="swiglu", check_finite=False, **options, **kw).to(device, dtype)
    x, grad = _data(tokens, d, device, dtype)
    return Case(f"sparsemoe ({gate})", moe, lambda inp: (moe(inp), moe.aux_loss()), x, grad)


def _switched(case: Case, triton: bool) -> Case:
    """``case`` with the ``"triton"`` or the ``"torch"`` kernel backend for its forward (restored after)."""

    def forward(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with kernels.use_backend("triton" if triton else "torch"):
            return case.forward(inp)

    label = ", Triton kernels" if triton else ", no Triton"
    return Case(case.name + label, case.module, forward, case.x, case.grad_out)


def _triton_rows(ours: Case, device: torch.device) -> tuple[list[Case], str]:
    """Our layer with and without the Triton kernels; the Triton row only on CUDA with triton installed."""
    plain = _switched(ours, False)
    if device.type != "cuda":
        return [plain], "\n- Triton row skipped: its kernels run on CUDA only\n"
    if kernels.load_backend("triton") is None:
        return [plain], "\n- Triton row skipped: triton is not installed (`pip install -e '.[gpu]'`)\n"
    return [_switched(ours, True), plain], ""


def _compiled(case: Case) -> Case:
    compiled = torch.compile(case.module, fullgraph=True, dynamic=True)
    module = case.module
    aux = getattr(module, "aux_loss", None)
    return Case(
        case.name + ", compiled",
        module,
        lambda inp: (compiled(inp), aux() if aux else None),
        case.x,
        case.grad_out,
    )


def _dense(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Case:
    tokens, d, h, _, k = shape
    torch.manual_seed(0)
    module = DenseEquivalent(d, h, "swiglu").to(device, dtype)
    x, grad = _data(tokens * k, d, device, dtype)
    return Case("dense-equivalent", module, lambda inp: (module(inp), None), x, grad)


def _hf(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Case | str:
    peer = PEERS["HF Mixtral block (grouped_mm)"](*shape, "swiglu")
    if isinstance(peer, str):
        return peer
    peer.module.to(device, dtype)
    x = peer.x.detach().to(device, dtype).requires_grad_()
    return Case(peer.name, peer.module, peer.forward, x, peer.grad_out.to(device, dtype))


def _peak(case: Case, device: torch.device) -> str:
    if device.type != "cuda":
        return "—"
    case.step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    case.step()
    torch.cuda.synchronize(device)
    return report.mib(torch.cuda.max_memory_allocated(device) - base)


def shape_table(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, repeats: int, compile_too: bool
) -> str:
    ours = _ours(shape, device, dtype)
    variants, skipped = _triton_rows(ours, device)
    cases = [_dense(shape, device, dtype), *variants]
    if compile_too:
        cases.append(_compiled(ours))
    hf = _hf(shape, device, dtype)
    skipped += f"\n- HF block skipped: {hf}\n" if isinstance(hf, str) else ""
    if not isinstance(hf, str):
        cases.append(hf)
    t = timing.interleaved({c.name: _synchronised(c.step, device) for c in cases}, repeats=repeats)
    dense = cases[0].name
    rows = [
        [
            c.name,
            report.ms(t.stat(c.name)),
            report.ratio(t.ratio(c.name, dense)),
            t.flag(c.name, dense),
            _peak(c, device),
        ]
        for c in cases
    ]
    title = "T={}, d={}, h={}, n={}, k={}".format(*shape)
    return f"**{title}**\n\n" + report.table(["layer", "ms", "÷ dense", "trust", "peak MiB"], rows) + skipped


def gate_table(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, repeats: int) -> str:
    cases = [
        _ours(shape, device, dtype, gate) for gate in ["topk", *(g for g in sparsemoe.gates.trainable() if g != "topk")]
    ]
    t = timing.interleaved({c.name: _synchronised(c.step, device) for c in cases}, repeats=repeats)
    top = cases[0].name
    rows = [[c.name, report.ms(t.stat(c.name)), report.ratio(t.ratio(c.name, top)), t.flag(c.name, top)] for c in cases]
    return report.table(["layer", "ms", "÷ top-k layer", "trust"], rows)


def saturated_table(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, repeats: int) -> str:
    """Saturated DSelect-k and COMET layers against the top-k layer at the same n and k.

    Saturated (every smooth-step at exactly 0 or 1, see :func:`benchmarks.bench_gates.saturate`),
    these gates compute at most k experts per input, so the layer should cost what top-k costs
    plus the gate's own routing.
    """
    tokens, d, h = shape[:3]
    sat_shape = (tokens, d, h, SATURATED_EXPERTS, SATURATED_K)
    cases = [_ours(sat_shape, device, dtype)]
    for gate in ("dselect_k", "comet"):
        case = _ours(sat_shape, device, dtype, gate)
        saturate(case.module.gate)
        cases.append(case)
    active = {}
    for case in cases:
        with torch.no_grad():
            case.module(case.x)
        active[case.name] = case.module.last_routing.num_pairs / tokens
    t = timing.interleaved({c.name: _synchronised(c.step, device) for c in cases}, repeats=repeats)
    top = cases[0].name
    rows = []
    for c in cases:
        ratio = t.ratio(c.name, top)
        verdict = "" if c is cases[0] else report.verdict(ratio.median <= VS_TOPK_LIMIT, ratio)
        rows.append([c.name, f"{active[c.name]:.3f}", report.ms(t.stat(c.name)), report.ratio(ratio), verdict])
    return (
        f"Saturated gates, T={tokens}, d={d}, h={h}, n={SATURATED_EXPERTS}, k={SATURATED_K}; target ≤ "
        f"{VS_TOPK_LIMIT}× the top-k layer.\n\n"
        + report.table(["layer", "experts / input", "ms", "÷ top-k layer", f"≤ {VS_TOPK_LIMIT}×?"], rows)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to check the script itself)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (checks the script, not speed)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for RESULTS-gpu.md (default benchmarks/; quick or CPU: benchmarks/quick/)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu to check the script")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # a CPU run only checks the script; one thread keeps it steady on a shared machine
    shapes, repeats = (QUICK_SHAPES, 3) if args.quick else (SHAPES, 5)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    parts = []
    for shape in shapes:
        print(f"[{time.perf_counter() - start:5.0f}s] shape {shape}", flush=True)
        parts.append(shape_table(shape, device, dtype, repeats, not args.no_compile))
    print(f"[{time.perf_counter() - start:5.0f}s] gates", flush=True)
    gates = gate_table(shapes[-1], device, dtype, repeats)
    print(f"[{time.perf_counter() - start:5.0f}s] saturated sparse gates", flush=True)
    saturated = saturated_table(shapes[-1], device, dtype, repeats)
    text = (
        "# sparsemoe on one GPU\n\n"
        f"Command: `python -m benchmarks.gpu{' --quick' if args.quick else ''}`; device: {name}; {dtype}; "
        f"torch {torch.__version__}; run took {(time.perf_counter() - start) / 60:.1f} min.\n\n"
        "One training step (forward + backward; top-k without noise or balance loss, `swiglu` experts), "
        f"median [min–max] of ≥ {repeats} interleaved rounds, each followed by a device synchronisation.\n\n"
        + "\n".join(parts)
        + f"\n## Every gate at T={shapes[-1][0]}, d={shapes[-1][1]}\n\n"
        + gates
        + f"\n## DSelect-k and COMET once saturated, n={SATURATED_EXPERTS}\n\n"
        + saturated
    )
    out = args.out or (HERE / "quick" if args.quick or device.type != "cuda" else HERE)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "RESULTS-gpu.md", text)
    print(f"wrote {out / 'RESULTS-gpu.md'} in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
