"""THOR's claim tested at convergence, against a dense model with the same consistency term (R-Drop).

Systems (same architecture, same active parameters per token, same data order per seed):
``dense``; ``dense_rdrop``: the dense model trained with THOR's loss (two dropout passes,
``CE_1 + CE_2 + α·symmetric KL``, the same α; :func:`sparsemoe.thor.thor_training_loss` on a model
without experts, so only dropout differs between the passes); ``switch``: every other FFN 2 experts
routed top-1; ``thor``: the same layers, 2 random experts; optional ``thor_4experts``: 4. The models,
data, batching, decoding and agreement measures are :mod:`thor_multi30k`'s, imported, not copied.

**Training to convergence.** Each run evaluates every ``eval_every`` updates and stops when the
selection metric has not improved for ``patience`` evaluations, or at the cap ``max_updates``; the
reported model is the best validation checkpoint (the trainer keeps the best weights, checkpoints
included, and restores them). The selection metric is **greedy validation BLEU** by default
(``--metric val_ce`` switches to loss): the claim is about BLEU, and the consistency term changes how
peaked the output distributions are, so cross-entropy ranks a consistency-trained model differently
from what it decodes (the old study's THOR had the highest val CE at every point yet was within
noise in BLEU); greedy rather than beam decoding keeps each evaluation about 5x cheaper. Defaults:
evaluate every 400 updates (about 1.5 epochs of 4,096-token batches; one greedy val decode costs
seconds, so about 1% of the training time), patience 3 (1,200 updates without a new best: three
quarters of the old study's whole budget, long enough to ride out the evaluation noise of about
0.3 BLEU seen there), cap 3,600 updates (about 13.5 epochs, 2.25x the old budget; set by the CPU
budget, see the plan below).

**Recipe.** ``--recipe official`` (default), THOR's IWSLT'14 recipe scaled to this corpus: dropout
0.3, Adam betas (0.9, 0.98) with decoupled weight decay 1e-4 on every parameter (``torch.optim.AdamW``;
fairseq's Adam applies ``--weight-decay`` as ``p -= lr·wd·p``, which is AdamW's form), inverse-sqrt
schedule (linear warm-up, then ``lr·sqrt(warmup/step)``) with warm-up 800 instead of 4,000: the
official 4k warm-up is at 8x larger batches (``--max-tokens 4096 --update-freq 8``) and would outlast
the cap here. α = 5 (official script), label smoothing 0.1. The Transformer stays pre-norm (the
project's one Transformer; the official arch is post-norm). ``--recipe thor-multi30k`` is the old
study's: dropout 0.1, no weight decay, warm-up 300 then cosine decay to 0 at the cap. ``--dropout``,
``--weight-decay`` and ``--warmup`` override either recipe.

**Reported.** test2016 BLEU (beam 5, sacrebleu signature in ``results.json``; THOR decoded with
``--thor-mode``) mean ± std over seeds, best update, training hours, the expert-draw agreement of
:mod:`thor_multi30k`, and per-expert divergence (:func:`expert_divergence`: relative weight distance
between experts, at the end and at initialisation, and relative distance between the experts'
outputs on the same validation inputs; for THOR also the KL between the model with every layer fixed
to expert 0 and to expert 1). Verdicts are generated from the numbers: a difference counts only when
the mean ± std intervals do not overlap, else "inconclusive".

**Resuming and parallel processes.** Each finished (system, seed) run is one file in the run store
(``<out>/runs/``, written atomically; reruns skip it); a run in progress checkpoints every
``checkpoint_every`` updates to its own file and resumes exactly from it. Processes may share one
``--out`` as long as they train different runs, e.g. one per ``--systems thor --seeds 0``: run files
and checkpoints are per run, the tokenizer cache is written under a private name and renamed, the
settings check (``runs/.config``) is recorded by the first process and refuses a process with other
settings; give no two processes the same (system, seed): they would share its checkpoint. Each
process rebuilds the tables from every finished run at its end (the last one to finish writes the complete tables; a
final call with every system, which trains nothing, does it too). ``--seeds 0`` means seed 0 only;
``--seeds 0 1`` two seeds.

**Cost and plan.** :func:`time_updates` on the full-size models, official recipe, one thread
(``OMP_NUM_THREADS=1``), CPU seconds per update on the shared 2-core machine (load about 8, so
somewhat pessimistic): dense 1.58 (100 updates), switch 1.68 (40), dense_rdrop 3.06 (30), thor 3.00
(40), thor_4experts 3.58 (20). (The issue's figures for the old recipe, evaluation included: 1.16-1.61
for dense/Switch, 2.5-2.6 for THOR.) Evaluation: about 15 s per validation point (9 per run) and
about 3 min at the end of a run (test beam 5, agreement, divergence; estimated from the old study's
``eval_seconds``), about 5 min per run. Default study: 4 systems x 2 seeds = 8 runs; at the cap
every run costs 3,600 x (1.58 + 1.68 + 3.06 + 3.00) = 9.3 CPU-hours per seed, 18.6 for two, plus
0.7 for evaluation: 19.3 CPU-hours if every run hits the cap, under the 20-hour budget; early
stopping only lowers it. A third seed (another 9.7 hours) does not fit; ``thor_4experts`` (about
3.6 hours per seed at the cap) only if early stopping leaves that much. On two cores run two
processes on the same ``--out``, balanced at about 9.5 hours each:
``--systems thor dense`` and ``--systems dense_rdrop switch``; then ``--systems thor_4experts --seeds 0``
if time remains; a final call with every system trains nothing and writes the combined tables.
To test the regularisation at this size as the issue asks, run ``--recipe thor-multi30k`` into
another ``--out`` (the same models, so about the same cost).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ..atomic import atomic_write_text
from ..data import multi30k as m30k
from ..data.multi30k import Corpus
from ..distributed import all_ranks, data_parallel, join_torchrun, rank_output
from ..layers import MoE
from ..models.transformer import Seq2SeqTransformer
from ..thor import consistency_terms, thor_inference, thor_layers, thor_training_loss
from ..training import ProgressBar, TrainConfig, Trainer
from . import thor_multi30k as tm
from .config import ConfigError, from_record, validate
from .progress import console, progress
from .reporting import thor_convergence as report
from .store import RunStore, write_json

NAME = "thor-convergence"
SYSTEMS = ("dense", "dense_rdrop", "switch", "thor", "thor_4experts")
#: system -> (the thor_multi30k model it builds, experts per MoE layer or None for the --num-experts
#: default, whether it trains with THOR's two-pass consistency loss)
SYSTEM_SPECS: dict[str, tuple[str, int | None, bool]] = {
    "dense": ("dense", None, False),
    "dense_rdrop": ("dense", None, True),
    "switch": ("switch", None, False),
    "thor": ("thor", None, True),
    "thor_4experts": ("thor", 4, True),
}
#: recipe -> (dropout, weight decay, warm-up updates, schedule)
RECIPES: dict[str, tuple[float, float, int, str]] = {
    "official": (0.3, 1e-4, 800, "inverse-sqrt"),
    "thor-multi30k": (0.1, 0.0, 300, "cosine"),
}


@dataclass
class Config:
    quick: bool = field(
        default=False, metadata={"help": "tiny smoke run (CI): small model, few updates, few sentences"}
    )
    out: Path = field(default=Path("results/thor-convergence"), metadata={"help": "output folder"})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "seeds to run (e.g. 0 1 2)", "min": 0})
    systems: list[str] = field(
        default_factory=lambda: ["dense", "dense_rdrop", "switch", "thor"],
        metadata={"help": f"systems to train, from {', '.join(SYSTEMS)}"},
    )
    recipe: Literal["official", "thor-multi30k"] = field(
        default="official", metadata={"help": "regularisation/schedule: THOR's official one or the old study's"}
    )
    dropout: float | None = field(default=None, metadata={"help": "dropout (default: the recipe's)", "min": 0.0})
    weight_decay: float | None = field(
        default=None, metadata={"help": "AdamW decoupled weight decay (default: the recipe's)", "min": 0.0}
    )
    warmup: int | None = field(default=None, metadata={"help": "warm-up updates (default: the recipe's)", "min": 1})
    vocab_size: int = field(default=8000, metadata={"help": "joint SentencePiece vocabulary", "min": 2})
    d_model: int = field(default=256, metadata={"help": "model width", "min": 2})
    layers: int = field(default=3, metadata={"help": "encoder and decoder layers (each)", "min": 1})
    heads: int = field(default=4, metadata={"help": "attention heads", "min": 1})
    d_hidden: int = field(default=512, metadata={"help": "FFN / expert hidden width", "min": 1})
    num_experts: int = field(default=2, metadata={"help": "experts per MoE layer (switch, thor)", "min": 2})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing (fairseq form)", "min": 0.0})
    alpha: float = field(default=5.0, metadata={"help": "consistency weight of thor and dense_rdrop", "min": 0.0})
    capacity_factor: float = field(default=1.25, metadata={"help": "Switch capacity in training", "above": 0.0})
    batch_tokens: int = field(default=4096, metadata={"help": "padded source+target tokens per update", "min": 1})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate", "above": 0.0})
    max_updates: int = field(default=3600, metadata={"help": "cap on updates per run", "min": 1})
    eval_every: int = field(default=400, metadata={"help": "updates between validation evaluations", "min": 1})
    patience: int = field(default=3, metadata={"help": "evaluations without a new best before stopping", "min": 1})
    metric: Literal["val_bleu_greedy", "val_ce"] = field(
        default="val_bleu_greedy", metadata={"help": "validation metric selecting the checkpoint and stopping"}
    )
    checkpoint_every: int = field(default=200, metadata={"help": "updates between mid-run checkpoints", "min": 1})
    beam: int = field(default=5, metadata={"help": "beam size for test BLEU", "min": 1})
    length_penalty: float = field(default=0.6, metadata={"help": "GNMT length-penalty alpha", "min": 0.0})
    thor_mode: str = field(default="random-sentence", metadata={"help": "THOR's inference mode for test BLEU"})

    def __post_init__(self) -> None:
        validate(self)
        unknown = sorted(set(self.systems) - set(SYSTEMS))
        if unknown or not self.systems:
            raise ConfigError("systems", f"unknown {unknown}; choose from {', '.join(SYSTEMS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"give distinct seeds, e.g. 0 1 (got {self.seeds})")
        if self.thor_mode not in tm.THOR_MODES:
            raise ConfigError("thor_mode", f"must be one of {', '.join(tm.THOR_MODES)} (got {self.thor_mode!r})")
        if self.label_smoothing >= 1.0:
            raise ConfigError("label_smoothing", f"must lie in [0, 1) (got {self.label_smoothing})")
        if self.d_model % self.heads:
            raise ConfigError("d_model", f"{self.d_model} must be divisible by --heads {self.heads}")


def effective(config: Config) -> Config:
    """The configuration actually run: the recipe's values filled in; ``quick`` shrinks everything
    and writes to ``<out>/quick``."""
    dropout, decay, warmup, _ = RECIPES[config.recipe]
    c = replace(
        config,
        dropout=dropout if config.dropout is None else config.dropout,
        weight_decay=decay if config.weight_decay is None else config.weight_decay,
        warmup=warmup if config.warmup is None else config.warmup,
    )
    if not c.quick:
        return c
    return replace(
        c,
        out=config.out / "quick",
        vocab_size=200,
        d_model=32,
        layers=2,
        heads=2,
        d_hidden=64,
        batch_tokens=600,
        max_updates=16,
        warmup=4,
        eval_every=4,
        patience=2,
        checkpoint_every=4,
        beam=min(c.beam, 2),
        seeds=c.seeds[:1],
    )


def base_config(c: Config, system: str) -> tm.Config:
    """``system``'s model and evaluation settings as :mod:`thor_multi30k`'s Config, for its helpers."""
    _, experts, _ = SYSTEM_SPECS[system]
    assert c.dropout is not None and c.warmup is not None  # effective() filled them in
    return tm.Config(
        quick=c.quick,
        out=c.out,
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        layers=c.layers,
        heads=c.heads,
        d_hidden=c.d_hidden,
        num_experts=experts or c.num_experts,
        dropout=c.dropout,
        label_smoothing=c.label_smoothing,
        alpha=c.alpha,
        capacity_factor=c.capacity_factor,
        batch_tokens=c.batch_tokens,
        steps=c.max_updates,
        lr=c.lr,
        warmup=c.warmup,
        eval_every=c.eval_every,
        checkpoint_every=c.checkpoint_every,
        beam=c.beam,
        length_penalty=c.length_penalty,
        thor_mode=c.thor_mode,
    )


def build_model(c: Config, system: str, vocab: int, seed: int) -> Seq2SeqTransformer:
    """``system``'s model (thor_multi30k's dense/switch/thor model), initialised from ``seed``."""
    return tm.build_model(base_config(c, system), SYSTEM_SPECS[system][0], vocab, seed)


def lr_factor(step: int, c: Config) -> float:
    """The recipe's LR multiplier at 0-based ``step``: inverse-sqrt (official) or warm-up + cosine (old)."""
    assert c.warmup is not None
    if RECIPES[c.recipe][3] == "cosine":
        return tm._lr_factor(step, replace(base_config(c, "dense"), steps=c.max_updates))
    return min((step + 1) / c.warmup, math.sqrt(c.warmup / (step + 1)))


def training_loss(
    model: Seq2SeqTransformer,
    system: str,
    c: Config,
    src: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    net: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One batch's loss: THOR's two-pass consistency loss for ``thor*`` and ``dense_rdrop`` (on a dense
    model only dropout differs between the passes), label-smoothed CE (+ Switch's aux loss) otherwise.
    ``net``: what runs the forward passes (``model`` wrapped for data parallelism; default ``model``).

    Shape: ``src [B, S]``, ``tin``/``tout [B, T]``.
    """
    forward = model if net is None else net
    if SYSTEM_SPECS[system][2]:
        terms = thor_training_loss(
            lambda: forward(src, tin), tout, c.alpha, pad_id=m30k.PAD_ID, label_smoothing=c.label_smoothing
        )
        return {"loss": terms.total + model.aux_loss(), "ce": terms.ce_1, "kl": terms.kl}
    logits = forward(src, tin)
    terms = consistency_terms(logits, logits, tout, 0.0, pad_id=m30k.PAD_ID, label_smoothing=c.label_smoothing)
    return {"loss": terms.ce_1 + model.aux_loss(), "ce": terms.ce_1, "kl": terms.kl}


def _batch(corpus: Corpus, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    src = m30k.pad_batch([corpus.train.src[i] for i in idx], eos=True)
    tgt = m30k.pad_batch([corpus.train.tgt[i] for i in idx], bos=True, eos=True)
    return src, tgt[:, :-1], tgt[:, 1:]


def make_trainer(
    c: Config, corpus: Corpus, system: str, seed: int, ckpt: Path, callbacks: list[Any]
) -> tuple[Seq2SeqTransformer, Trainer]:
    """The run's model and trainer: early stopping on ``c.metric``, best weights kept and restored."""
    base = base_config(c, system)
    kind = SYSTEM_SPECS[system][0]
    model = build_model(c, system, corpus.tokenizer.vocab_size, seed)

    def evaluate() -> dict[str, float]:
        return {
            "val_ce": tm._val_loss(model, corpus, base),
            "val_bleu_greedy": tm._val_bleu_greedy(model, corpus, kind, base),
            "wall_seconds": trainer.seconds,
        }

    config = TrainConfig(
        steps=c.max_updates,
        lr=c.lr,
        seed=seed,
        weight_decay=c.weight_decay or 0.0,
        eval_every=c.eval_every,
        metric=c.metric,
        mode="max" if c.metric == "val_bleu_greedy" else "min",
        patience=c.patience,
        checkpoint_every=c.checkpoint_every,
        checkpoint_path=str(ckpt),
        checkpoint_at_end=False,  # the finished run is saved as a record; the file is deleted
    )
    net = data_parallel(model)  # under torchrun: DDP (the trainer gives each rank its shard); one process: model
    trainer = Trainer(
        net,
        lambda idx: training_loss(model, system, c, *_batch(corpus, idx), net=net),
        tm._Epochs(m30k.BatchOrder(corpus.train, c.batch_tokens, seed)),  # the same order for every system
        config,
        evaluate=evaluate,
        optimizer=lambda m, cfg: torch.optim.AdamW(
            m.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay
        ),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, c)),
        callbacks=callbacks,
    )
    return model, trainer


# ------------------------------------------------------------------------------------------- divergence
def _expert_vectors(layer: MoE) -> torch.Tensor:
    """Each expert's parameters as one row. Shape: ``[n, P]``."""
    n = layer.num_experts
    return torch.cat([p.detach().reshape(n, -1) for p in layer.experts.parameters()], 1)


def _relative_distance(rows: torch.Tensor) -> float:
    """Mean over pairs ``i < j`` of ``‖r_i - r_j‖ / mean(‖r_i‖, ‖r_j‖)`` (0: identical). Shape: ``[n, P]``."""
    values = [
        float((rows[i] - rows[j]).norm() / (0.5 * (rows[i].norm() + rows[j].norm())).clamp_min(1e-12))
        for i, j in itertools.combinations(range(rows.shape[0]), 2)
    ]
    return sum(values) / len(values)


def _moe_layers(model: torch.nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE) and m.num_experts > 1]


@torch.no_grad()
def expert_divergence(
    model: Seq2SeqTransformer, initial: Seq2SeqTransformer, corpus: Corpus, base: tm.Config, batches: int = 2
) -> dict[str, float]:
    """How different the experts became (empty for models without experts).

    ``weight_distance``/``weight_distance_init``: mean over MoE layers of the relative distance
    between experts' parameter vectors, trained and at initialisation (independent inits start near
    sqrt(2)); ``output_distance``: the same relative distance between the experts' outputs on the
    layer inputs of the first ``batches`` validation batches of 100 sentences (padding positions
    included), the model in evaluation mode; THOR also ``kl_fixed_expert_0_vs_1``: symmetric KL per
    val target token between the model with every layer fixed to expert 0 and to expert 1.
    """
    layers = _moe_layers(model)
    if not layers:
        return {}
    init_layers = dict(_moe_layers(initial))
    result = {
        "weight_distance": sum(_relative_distance(_expert_vectors(m)) for _, m in layers) / len(layers),
        "weight_distance_init": sum(_relative_distance(_expert_vectors(init_layers[n])) for n, _ in layers)
        / len(layers),
    }
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs[name].append(args[0].detach()))
        for name, m in layers
    ]
    model.eval()
    try:
        with tm._mode(model, base.thor_mode, seed=0):
            for src, tin, _ in tm._batches(corpus.val)[:batches]:
                model(src, tin)
    finally:
        for hook in hooks:
            hook.remove()
    distances = []
    for name, m in layers:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])  # [N, d_model]
        outputs = torch.stack([m.experts.forward_expert(e, x).reshape(-1) for e in range(m.num_experts)])
        distances.append(_relative_distance(outputs))
    result["output_distance"] = sum(distances) / len(distances)
    if thor_layers(model):
        result["kl_fixed_expert_0_vs_1"] = tm._pass_kl(
            model, corpus.val, lambda p: thor_inference(model, "fixed", expert=p)
        )
    return result


# ------------------------------------------------------------------------------------------- one run
def train_run(c: Config, corpus: Corpus, system: str, seed: int, ckpt: Path) -> dict[str, Any]:
    """Train ``system`` with ``seed`` until early stopping or the cap (resuming from ``ckpt``), then
    evaluate its best validation checkpoint."""
    label = f"{system} seed {seed}"
    with progress() as bar:
        model, trainer = make_trainer(
            c, corpus, system, seed, ckpt, [ProgressBar(label, bar), tm._LogEvaluation(bar, label)]
        )
        torch.manual_seed(seed)  # a resumed run restores the RNG states from the checkpoint instead
        result = trainer.run(ckpt if all_ranks(ckpt.exists()) else None)
    base = base_config(c, system)
    kind = SYSTEM_SPECS[system][0]
    start = time.perf_counter()
    model.eval()
    with tm._mode(model, c.thor_mode, seed):
        test_bleu = tm._bleu(model, corpus, corpus.test, c.beam, c.length_penalty)
    divergence = expert_divergence(model, build_model(c, system, corpus.tokenizer.vocab_size, seed), corpus, base)
    agreement = tm._agreement(model, kind, corpus, seed)
    return {
        "system": system,
        "seed": seed,
        "history": [{k: h[k] for k in tm._POINT} for h in result.history],
        "best_update": result.best_step,
        "best_value": result.best_value,
        "metric": c.metric,
        "updates": result.steps,
        "stopped_early": result.stopped_early,
        "capped": not result.stopped_early,
        "train_seconds": result.seconds,
        "train_cpu_seconds": result.cpu_seconds,
        "test_bleu": test_bleu,
        "inference_mode": c.thor_mode if kind == "thor" else "deterministic",
        "agreement": agreement,
        "divergence": divergence,
        "eval_seconds": time.perf_counter() - start,
        "params": model.parameter_counts(),
    }


def time_updates(c: Config, system: str, updates: int = 100) -> dict[str, float]:
    """Wall and CPU seconds per training update of ``system`` (no evaluation), for the budget plan;
    CPU seconds are the one-thread cost even on a busy machine."""
    corpus = tm._corpus(base_config(c, system))
    timed = replace(c, max_updates=updates, eval_every=updates + 1, checkpoint_every=updates + 1)
    ckpt = c.out / "timing" / f"{system}.safetensors"
    _, trainer = make_trainer(timed, corpus, system, 0, ckpt, [])
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.run()
    ckpt.unlink(missing_ok=True)
    return {"wall": (time.perf_counter() - wall) / updates, "cpu": (time.process_time() - cpu) / updates}


# ------------------------------------------------------------------------------------------- study
def _settings(c: Config) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()}


def run(config: Config) -> dict[str, Any]:
    """Train every (system, seed) not yet saved, then rebuild results.json, summary.json, table.md, curves.png."""
    rank, world = join_torchrun()  # under torchrun: every rank trains every run (DDP), rank 0 writes
    console.quiet = console.quiet or rank > 0
    c = effective(config)
    if rank == 0:
        corpus = tm._corpus(base_config(c, c.systems[0]))
    all_ranks(True)  # the other ranks read the tokenizer rank 0 cached
    if rank > 0:
        corpus = tm._corpus(base_config(c, c.systems[0]))
    with rank_output(c.out) as out:
        store = RunStore(out, _settings(c), selection=("quick", "out", "seeds", "systems"))
        jobs = {
            store.key(system=s, seed=seed): functools.partial(train_run, c, corpus, s, seed)
            for s in c.systems
            for seed in c.seeds
        }
        if note := store.reuse_note(jobs, "pass a new --out (or delete that folder) to retrain"):
            console.print(note, soft_wrap=True)
        store.run_missing(jobs, extra={"config": _settings(c)})
        runs = sorted(
            (r for r in store if r["system"] in SYSTEMS), key=lambda r: (SYSTEMS.index(r["system"]), r["seed"])
        )
    signature = m30k.corpus_bleu(["a"], ["a"])[1]
    by_system, summary = report.summaries(runs)
    verdicts = report.verdicts(summary)
    results = {
        "name": NAME,
        "quick": c.quick,
        "config": _settings(c),
        "sacrebleu_signature": signature,
        "test_sentences": len(corpus.test),
        "summary": by_system,
        "verdicts": verdicts,
        "runs": runs,
    }
    if world > 1:
        results["processes"] = world
    if rank > 0:
        return results  # rank 0 writes the results
    write_json(c.out / "results.json", results)
    write_json(c.out / "summary.json", summary)
    write_report(results, c.out)
    return results


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and curves.png into ``folder`` from ``results`` alone; returns their paths."""
    config = from_record(Config, results)
    by_system, summary = report.summaries(results["runs"])
    table = report.table(
        config,
        by_system,
        summary,
        results["verdicts"],
        results["sacrebleu_signature"],
        results["test_sentences"],
    )
    atomic_write_text(folder / "table.md", table)
    report.plot(config, results["runs"], folder / "curves.png")
    return [folder / "table.md", folder / "curves.png"]
