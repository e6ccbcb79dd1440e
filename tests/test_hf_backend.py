"""experts_implementation="sparsemoe": Hugging Face MoE models on sparsemoe's dispatch, against "eager"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
moe_integration = pytest.importorskip("transformers.integrations.moe")

import sparsemoe.hf  # noqa: E402,F401  (registers the backend)
from sparsemoe.hf.backend import EXPERTS_IMPLEMENTATION  # noqa: E402

COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def configs(k: int = 2) -> dict[str, Any]:
    return {
        "mixtral": transformers.MixtralConfig(
            **COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=k
        ),
        "qwen2_moe": transformers.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=k,
        ),
        "olmoe": transformers.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=4, num_experts_per_tok=k),
        "gpt_oss": transformers.GptOssConfig(
            **COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=k, head_dim=8
        ),  # biases, interleaved gate/up
    }


def run(config: Any, implementation: str, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=implementation).to(dtype)
    assert model.config._experts_implementation == implementation
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def test_registered_without_importing_transformers() -> None:
    code = (
        "import sys, sparsemoe.hf; assert 'transformers' not in sys.modules; "
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS; "
        "assert 'sparsemoe' in ALL_EXPERTS_FUNCTIONS, sorted(ALL_EXPERTS_FUNCTIONS)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert EXPERTS_IMPLEMENTATION in moe_integration.ALL_EXPERTS_FUNCTIONS


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"])
@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 2), (torch.float64, 2), (torch.float32, 4)])
def test_same_outputs_and_gradients_as_eager(name: str, dtype: torch.dtype, k: int) -> None:
    # k=4 of 4 experts: every pair routed, the dense path; float64: the grouped-matmul loop fallback
    config = configs(k)[name]
    ref, ref_grads = run(config, "eager", dtype)
    got, grads = run(config, EXPERTS_IMPLEMENTATION, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got, ref, atol=tol, rtol=0), (got - ref).abs().max()
    assert grads.keys() == ref_grads.keys()
    assert any("experts" in n for n in grads)
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], atol=tol, rtol=1e-4), (n, (g - ref_grads[n]).abs().max())


def test_the_sparsemoe_forward_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsemoe.hf.backend as backend

    calls: list[int] = []
    original = backend.HFExperts.forward_combined

    def counted(self: Any, *args: Any) -> torch.Tensor:
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(backend.HFExperts, "forward_combined", counted)
    run(configs()["mixtral"], EXPERTS_IMPLEMENTATION, torch.float32)
    assert len(calls) == 2  # one per layer


def test_benchmark_runs_and_the_implementations_agree(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from benchmarks import hf_experts

    shape = ["--tokens", "32", "--d-model", "16", "--d-hidden", "32", "--experts", "4", "--repeats", "1"]
    written = hf_experts.main([*shape, "--out", str(tmp_path / "results.md")])
    assert written.read_text().startswith("# Hugging Face experts backend\n\nProduced by `OMP_NUM_THREADS=1 python -m")
    out = capsys.readouterr().out
    diffs = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if line.startswith("max |")]
    assert len(diffs) == 3 and max(diffs) < 1e-5
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| eager", "| grouped_mm", "| sparsemoe"]
