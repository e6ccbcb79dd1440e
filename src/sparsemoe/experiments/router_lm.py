"""Routers on a small decoder-only language model: does loss-free balancing beat the auxiliary loss?

Wang et al. (2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts") report that
a per-expert bias moved after every step (no balance loss) gives both better balance and lower
perplexity than the usual auxiliary loss (MaxVio_global 0.04 vs 0.72, perplexity 9.50 vs 9.56 at
1B parameters). This study trains the same small decoder-only Transformer
(:class:`~sparsemoe.models.transformer.DecoderOnlyLM`, causal self-attention, tied embeddings) from
scratch on an offline English corpus (:mod:`sparsemoe.data.lm_corpus`: Multi30k English + SST-2
sentences; SentencePiece on the training text only) with every other FFN (layers 0, 2, ...) an
MoE routed by each system below, and compares validation perplexity and balance.

Every system has the same active FFN parameters per token as the dense model (dense width ``H``):
``num_experts`` experts of width ``H/2`` with 2 per token, except ``switch`` (top-1, experts of width
``H``) and ``sigmoid_lossfree_shared`` (one shared expert of width ``H/2`` plus top-1 of the routed
ones; weights not renormalised, as top-1 renormalised would give the router no gradient). Every
MoE layer is dropless (no capacity limit), so balance shows as load, not as dropped tokens.

Per run: validation perplexity; MaxVio (``max_i load_i / mean load - 1``) of the loads summed over
the whole validation pass (global) and the mean over validation batches of each batch's MaxVio
(per batch), both averaged over the MoE layers; dead experts (no validation token, summed over
layers); training tokens per CPU-second (evaluation excluded; CPU time so that other processes on the machine
do not count against a router); parameters and active parameters
per token. The per-expert load over training is recorded by
:class:`~sparsemoe.training.RoutingMonitor` at every evaluation.

Each finished (system, seed) run is saved when it ends and skipped when the command is rerun; a run
in progress checkpoints every ``checkpoint_every`` steps and continues from there, so the study can
be spread over several sittings.

Cost of the default study (measured: 200 steps of the default config per system, one thread, on a
shared 2-core machine; CPU seconds): about 0.34 s per step for dense and 0.34-0.37 s for top-k and
sigmoid MoEs, so one 3,000-step run is about 17-19 CPU-minutes plus about 13 validations of a few
seconds each; 9 systems x 2 seeds about 6 CPU-hours. Corpus: 1.44M training and 42k validation tokens
(vocabulary 4,000), so 3,000 steps of 2,048 tokens are about 4 epochs. On a 2-core machine run two
processes on the same ``--out`` with disjoint ``--systems``, then once more with all systems (trains
nothing, writes the combined tables).

Under ``torchrun`` (``torchrun --nproc-per-node 2 -m sparsemoe reproduce router-lm``) every rank
trains every run on its half of each batch (DDP; ``--expert-parallel`` also shards the experts) and
rank 0 writes the results; a one-process run is unchanged.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..data.lm_corpus import LMCorpus, load_lm_corpus
from ..distributed import all_ranks, data_parallel, join_torchrun, rank_output
from ..layers import MoE, moe_layers
from ..models.transformer import DecoderOnlyLM, TransformerConfig
from ..routing import max_violation
from ..training import ProgressBar, RandomBatches, RoutingMonitor, TrainConfig, Trainer
from .config import ConfigError, from_record, run_settings, validate
from .progress import console, progress
from .reporting import router_lm as report
from .store import RunStore, write_json

NAME = "router-lm"
SYSTEMS = (
    "dense",
    "topk_aux",
    "topk_lossfree",
    "sigmoid_lossfree",
    "sigmoid_lossfree_shared",
    "switch",
    "hash",
    "expert_choice",
    "comet",
)


@dataclass(frozen=True)
class System:
    """One row of the study: the MoE gate spec and options, experts per token, expert width factor, shared experts."""

    gate: str | None
    options: dict[str, Any]
    width: float = 0.5  # routed expert width as a fraction of the dense FFN width
    shared: int = 0  # shared experts of width ``width * d_hidden``


def systems(c: Config) -> dict[str, System]:
    """Every system's routing, from the study's balance settings."""
    u, bw = c.bias_update_rate, c.balance_weight
    return {
        "dense": System(None, {}),
        "topk_aux": System("topk", {"k": 2, "noisy": False, "balance_weight": bw}),
        "topk_lossfree": System("topk", {"k": 2, "noisy": False, "balance_weight": 0.0, "bias_update_rate": u}),
        "sigmoid_lossfree": System("sigmoid", {"k": 2, "bias_update_rate": u}),
        "sigmoid_lossfree_shared": System("sigmoid", {"k": 1, "normalize": False, "bias_update_rate": u}, shared=1),
        "switch": System("switch", {"balance_weight": bw}, width=1.0),
        "hash": System("hash", {"k": 2}),
        "expert_choice": System("expert_choice", {"k": 2}),
        "comet": System("comet", {"k": 2}),
    }


@dataclass
class Config:
    quick: bool = field(default=False, metadata={"help": "tiny smoke run (CI): small model, few steps, few sentences"})
    out: Path = field(default=Path("results/router-lm"), metadata={"help": "output folder"})
    seeds: int = field(default=2, metadata={"help": "seeds per system", "min": 1})
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS), metadata={"help": "systems to train"})
    vocab_size: int = field(default=4000, metadata={"help": "SentencePiece vocabulary (training text only)", "min": 8})
    seq_len: int = field(default=64, metadata={"help": "tokens per training/validation block", "min": 2})
    d_model: int = field(default=128, metadata={"help": "model width", "min": 2})
    layers: int = field(default=4, metadata={"help": "decoder layers (MoE in layers 0, 2, ...)", "min": 1})
    heads: int = field(default=4, metadata={"help": "attention heads", "min": 1})
    d_hidden: int = field(default=512, metadata={"help": "dense FFN width H (experts: H/2, switch: H)", "min": 2})
    num_experts: int = field(default=8, metadata={"help": "routed experts per MoE layer", "min": 2})
    batch_size: int = field(default=32, metadata={"help": "blocks per step", "min": 1})
    steps: int = field(default=3000, metadata={"help": "optimiser steps", "min": 1})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (Adam)", "above": 0.0})
    warmup: int = field(default=200, metadata={"help": "linear warm-up steps, then constant", "min": 0})
    dropout: float = field(default=0.1, metadata={"help": "dropout", "min": 0.0, "max": 0.9})
    balance_weight: float = field(
        default=1e-2, metadata={"help": "load-balance loss weight (topk_aux, switch)", "min": 0.0}
    )
    bias_update_rate: float = field(default=1e-3, metadata={"help": "loss-free bias update rate u", "above": 0.0})
    eval_every: int = field(default=250, metadata={"help": "steps between validation points", "min": 1})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between mid-run checkpoints", "min": 1})
    expert_parallel: bool = field(
        default=False,
        metadata={"help": "under torchrun: shard each MoE layer's experts over the ranks (data-parallel otherwise)"},
    )

    def __post_init__(self) -> None:
        validate(self)
        unknown = sorted(set(self.systems) - set(SYSTEMS))
        if unknown or not self.systems:
            raise ConfigError("systems", f"unknown {unknown}; choose from {', '.join(SYSTEMS)}")
        if self.d_model % self.heads or self.d_model % 2:
            raise ConfigError("d_model", f"{self.d_model} must be even and divisible by --heads {self.heads}")
        if self.d_hidden % 2:
            raise ConfigError("d_hidden", f"must be even (experts are H/2 wide), got {self.d_hidden}")


def _effective(config: Config) -> Config:
    """The configuration actually run: ``quick`` shrinks everything and writes to ``<out>/quick``."""
    if not config.quick:
        return config
    c = Config(**{**asdict(config), "out": config.out / "quick"})
    c.vocab_size, c.seq_len, c.d_model, c.layers, c.heads, c.d_hidden, c.num_experts = 300, 16, 32, 2, 2, 64, 4
    c.batch_size, c.steps, c.warmup, c.eval_every, c.checkpoint_every = 8, 24, 4, 12, 12
    return c


def corpus(c: Config) -> LMCorpus:
    """The study's corpus (quick runs: the first 400 sentences of each source)."""
    return load_lm_corpus(c.out / "cache", c.vocab_size, c.seq_len, 400 if c.quick else None)


def build_model(c: Config, system: str, vocab: int, seed: int) -> DecoderOnlyLM:
    """The ``system`` language model initialised from ``seed`` (the cost benchmark builds it too)."""
    torch.manual_seed(seed)
    s = systems(c)[system]
    width = round(c.d_hidden * s.width)
    return DecoderOnlyLM(
        TransformerConfig(
            vocab_size=vocab,
            d_model=c.d_model,
            num_heads=c.heads,
            encoder_layers=0,
            decoder_layers=c.layers,
            d_hidden=c.d_hidden,
            dropout=c.dropout,
            gate=s.gate,
            gate_options=s.options,
            num_experts=c.num_experts,
            gate_seed=seed,
            max_positions=c.seq_len,
            expert_hidden=width,
            shared_experts=s.shared,
            shared_hidden=width if s.shared else None,
        )
    )


def _ce(model: DecoderOnlyLM, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``blocks [B, seq_len + 1]``."""
    logits = model(blocks[:, :-1])  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), blocks[:, 1:].flatten())


@torch.no_grad()
def validation_metrics(model: DecoderOnlyLM, val: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Validation CE/perplexity and balance over every held-out block (eval mode).

    ``maxvio_global``: MaxVio of each MoE layer's loads summed over the pass, averaged over layers;
    ``maxvio_batch``: the mean over batches and layers of each batch's MaxVio; ``dead_experts``:
    experts without a token in the whole pass, summed over layers; ``experts_per_token``: the measured
    mean experts computed per token (COMET's trees are dense until they harden); ``load``: the summed loads.
    """
    model.eval()
    total, tokens, batch_vio, active = 0.0, 0, [], []
    loads: dict[str, list[int]] = {}
    for start in range(0, val.shape[0], batch_size):
        blocks = val[start : start + batch_size]
        n = blocks[:, 1:].numel()
        total += float(_ce(model, blocks)) * n
        tokens += n
        for name, layer in moe_layers(model):
            if isinstance(layer, MoE) and layer.last_routing is not None:
                stats = layer.routing_stats()
                load = [int(x) for x in stats["load"]]  # type: ignore[union-attr]
                batch_vio.append(max_violation(load))
                active.append(float(stats["active_per_input"]))  # type: ignore[arg-type]
                loads[name] = load if name not in loads else [a + b for a, b in zip(loads[name], load, strict=True)]
    ce = total / max(tokens, 1)
    routed = bool(loads)
    return {
        "val_ce": ce,
        "val_ppl": math.exp(ce),
        "maxvio_global": sum(map(max_violation, loads.values())) / len(loads) if routed else None,
        "maxvio_batch": sum(batch_vio) / len(batch_vio) if routed else None,
        "dead_experts": sum(c == 0 for load in loads.values() for c in load) if routed else None,
        "experts_per_token": sum(active) / len(active) if routed else None,
        "load": loads,
    }


#: the final validation's values kept in a run record
_FINAL = ("val_ce", "val_ppl", "maxvio_global", "maxvio_batch", "dead_experts", "experts_per_token")
#: the keys of a history point in results.json
_POINT = ("step", "train_loss", "train_ce", "val_ce", "val_ppl", "routing_max_violation", "routing_dead_experts")


def train_run(c: Config, data: LMCorpus, system: str, seed: int, ckpt: Path) -> dict[str, Any]:
    """Train one (system, seed) for ``c.steps`` steps (resuming from ``ckpt``) and evaluate it."""
    model = build_model(c, system, data.tokenizer.vocab_size, seed)
    train = data.train
    # under torchrun: DDP (the trainer gives each rank its shard of every batch); one process: model
    net = data_parallel(model, experts=c.expert_parallel and system != "dense")

    def loss(idx: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = _ce(net, train[idx])  # type: ignore[arg-type]  # DDP forwards to the model
        return {"loss": ce + model.aux_loss(), "ce": ce}

    def evaluate() -> dict[str, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = validation_metrics(model, data.val, c.batch_size)
        return {
            "val_ce": metrics["val_ce"],
            "val_ppl": metrics["val_ppl"],
            "eval_seconds": time.perf_counter() - start,
            "eval_cpu_seconds": time.process_time() - cpu_start,
        }

    config = TrainConfig(
        steps=c.steps,
        lr=c.lr,
        seed=seed,
        warmup_steps=c.warmup,
        eval_every=c.eval_every,
        checkpoint_every=c.checkpoint_every,
        checkpoint_path=str(ckpt),
        checkpoint_at_end=False,  # the finished run is saved as a record; the file is deleted
    )
    with progress() as bar:
        trainer = Trainer(
            net,
            loss,
            RandomBatches(train.shape[0], c.batch_size, seed),
            config,
            evaluate=evaluate,
            callbacks=[ProgressBar(f"{system} seed {seed}", bar), RoutingMonitor()],
        )
        torch.manual_seed(seed)  # a resumed run restores the RNG states from the checkpoint instead
        result = trainer.run(ckpt if all_ranks(ckpt.exists()) else None)
    final = validation_metrics(model, data.val, c.batch_size)
    # CPU time, not wall time: the study is meant to run on one thread beside other processes, and a
    # busy neighbour would otherwise show up as a slow router.
    train_cpu_seconds = result.cpu_seconds - sum(h["eval_cpu_seconds"] for h in result.history)
    counts = model.parameter_counts()
    return {
        "system": system,
        "seed": seed,
        **{k: final[k] for k in _FINAL},
        "val_load": final["load"],
        "tokens_per_second": result.steps * c.batch_size * c.seq_len / max(train_cpu_seconds, 1e-9),
        "params": counts["total"],
        "active_params_per_token": counts["active_per_token"],
        "train_seconds": result.seconds,
        "train_cpu_seconds": result.cpu_seconds,
        "history": [{k: h.get(k) for k in _POINT} for h in result.history],
        "load_history": [{"step": h["step"], "load": h["routing_load"]} for h in result.history if "routing_load" in h],
    }


def run(config: Config) -> dict[str, Any]:
    """Train every (system, seed) not yet saved, then rebuild results.json, summary.json, table.md and the plots."""
    rank, world = join_torchrun()  # under torchrun: every rank trains every run, rank 0 writes
    console.quiet = console.quiet or rank > 0
    c = _effective(config)
    if rank == 0:
        data = corpus(c)
    all_ranks(True)  # the other ranks read the tokenizer rank 0 cached
    if rank > 0:
        data = corpus(c)
    settings = run_settings(c)
    with rank_output(c.out) as out:
        store = RunStore(out, settings, selection=("quick", "out", "seeds", "systems"))
        jobs = {
            store.key(system=s, seed=seed): functools.partial(train_run, c, data, s, seed)
            for s in c.systems
            for seed in range(c.seeds)
        }
        if note := store.reuse_note(jobs, "pass a new --out (or delete that folder) to retrain"):
            console.print(note, soft_wrap=True)
        store.run_missing(jobs)
        runs = [r for r in store if r["system"] in c.systems and r["seed"] < c.seeds]
    runs.sort(key=lambda r: (SYSTEMS.index(r["system"]), r["seed"]))
    summary = report.summary(runs)
    verdict = report.verdict(summary)
    corpus_info = {
        "tokenizer": "sentencepiece unigram, training text only",
        "vocab_size": data.tokenizer.vocab_size,
        "train_tokens": data.train.numel(),
        "val_tokens": data.val.numel(),
    }
    results = {
        "name": NAME,
        "quick": c.quick,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "corpus": corpus_info,
        "systems": {name: asdict(s) for name, s in systems(c).items() if name in c.systems},
        "summary": summary,
        "verdict": verdict,
        "runs": runs,
    }
    if world > 1:
        results["processes"] = world
    if rank > 0:
        return results  # rank 0 writes the results
    write_json(c.out / "results.json", results)
    write_json(c.out / "summary.json", {name: {k: s[k] for k in report.SUMMARY_KEYS} for name, s in summary.items()})
    write_report(results, c.out)
    return results


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and the two plots into ``folder`` from ``results`` alone; returns their paths."""
    config = from_record(Config, results)
    paths = [folder / "table.md", folder / "expert_load.png", folder / "curves.png"]
    atomic_write_text(paths[0], report.table(config, results["summary"], results["verdict"], results["corpus"]))
    report.plot_load(results["runs"], paths[1])
    report.plot_curves(results["runs"], paths[2])
    return paths
