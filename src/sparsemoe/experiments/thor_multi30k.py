"""THOR vs Switch vs dense Transformer on Multi30k English->German (test2016).

Every model has the same size, the same active FFN compute per token and the same training
budget (updates of ``batch_tokens`` tokens): dense FFNs everywhere, or every other FFN of encoder
and decoder (layers 0, 2, ...) replaced by 2 experts routed by Switch (top-1, capacity factor,
load-balancing loss) or by THOR (one random expert per layer per pass, two passes per update with
the consistency loss; so THOR costs about twice the compute per update, as in the paper).

Each run (model, seed) is saved when it finishes and skipped when the command is rerun; a run in
progress writes a checkpoint every ``checkpoint_every`` updates and continues from it, so the study
can be spread over several sittings. BLEU is sacrebleu on detokenised output (signature in
``results.json``); THOR is decoded in each inference mode. Agreement (THOR's consistency claim):
the mean symmetric KL per target token between two stochastic passes (dropout + expert draws
for THOR, dropout only for dense/Switch), and the BLEU of the same model under two different draws.

Cost of the default study (3 models x 2 seeds, 1,600 updates of 4,096 tokens, about 6 epochs), from
``benchmarks/thor_multi30k_throughput.py`` on one thread: about 55 CPU-minutes per dense or Switch
run and about 100 per THOR run (two passes per update), evaluation included; about 7 CPU-hours in all.
On a 2-core machine run two processes on the same ``--out``, e.g. ``--models thor`` and
``--models dense switch`` (each about 3.5 hours when it has a core to itself), then once more with
all models, which trains nothing and writes the combined tables.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..data import data_dir
from ..data import multi30k as m30k
from ..data.multi30k import Corpus
from ..models.decoding import translate
from ..models.transformer import MultiHeadAttention, Seq2SeqTransformer, TransformerConfig
from ..thor import consistency_terms, symmetric_kl, thor_inference, thor_layers, thor_training_loss
from ..training import Batches, Callback, ProgressBar, TrainConfig, Trainer
from .config import ConfigError, from_record
from .progress import console, progress
from .reporting import thor as report
from .store import RunStore, write_json

NAME = "thor-multi30k"
MODELS = ("dense", "switch", "thor")
THOR_MODES = ("random-token", "random-sentence", "fixed-0", "fixed-1", "mean")
#: each model's MoE gate spec and options (dense: no MoE); THOR draws one expert per layer per pass
#: for the whole batch, as the official code
MODEL_GATES: dict[str, tuple[str | None, dict[str, Any]]] = {
    "dense": (None, {}),
    "switch": ("switch", {"balance_weight": 0.01, "z_loss_weight": 0.0}),
    "thor": ("random", {"granularity": "batch"}),
}
SWITCH_EVAL_CAPACITY = 2.0  # the Switch layers' capacity_limit in evaluation mode


@dataclass
class Config:
    quick: bool = field(default=False, metadata={"help": "tiny smoke run (CI): small model, few steps, few sentences"})
    out: Path = field(default=Path("results/thor-multi30k"), metadata={"help": "output folder"})
    seeds: int = field(default=2, metadata={"help": "seeds per model"})
    models: list[str] = field(default_factory=lambda: list(MODELS), metadata={"help": "models to train"})
    vocab_size: int = field(default=8000, metadata={"help": "joint SentencePiece vocabulary"})
    d_model: int = field(default=256, metadata={"help": "model width"})
    layers: int = field(default=3, metadata={"help": "encoder and decoder layers (each)"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    d_hidden: int = field(default=512, metadata={"help": "FFN / expert hidden width"})
    num_experts: int = field(default=2, metadata={"help": "experts per MoE layer (switch, thor)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and residual branches"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing (fairseq form)"})
    alpha: float = field(default=5.0, metadata={"help": "THOR consistency weight (5 in THOR's IWSLT recipe)"})
    capacity_factor: float = field(default=1.25, metadata={"help": "Switch capacity_limit in training (2.0 at eval)"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded source+target tokens per update"})
    steps: int = field(default=1600, metadata={"help": "updates per run (the training budget)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (Adam, betas 0.9/0.98)"})
    warmup: int = field(default=300, metadata={"help": "linear warm-up updates, then cosine decay to 0"})
    eval_every: int = field(default=200, metadata={"help": "updates between validation BLEU (greedy) points"})
    checkpoint_every: int = field(default=200, metadata={"help": "updates between mid-run checkpoints"})
    beam: int = field(default=5, metadata={"help": "beam size for the final val/test BLEU"})
    length_penalty: float = field(default=0.6, metadata={"help": "GNMT length-penalty alpha for beam search"})
    thor_mode: str = field(default="random-sentence", metadata={"help": "THOR's inference mode for summary.json"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise ConfigError("models", f"unknown {unknown}; choose from {', '.join(MODELS)}")
        for name in ("seeds", "vocab_size", "d_model", "layers", "heads", "d_hidden", "num_experts", "batch_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be at least 1 (got {getattr(self, name)})")
        for name in ("steps", "eval_every", "checkpoint_every", "beam"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be at least 1 (got {getattr(self, name)})")
        if self.thor_mode not in THOR_MODES:
            raise ConfigError("thor_mode", f"must be one of {', '.join(THOR_MODES)} (got {self.thor_mode!r})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("label_smoothing", f"must lie in [0, 1) (got {self.label_smoothing})")
        if self.d_model % self.heads:
            raise ConfigError("d_model", f"{self.d_model} must be divisible by --heads {self.heads}")


def _effective(config: Config) -> Config:
    """The configuration actually run: ``quick`` shrinks everything and writes to ``<out>/quick``."""
    if not config.quick:
        return config
    c = Config(**{**asdict(config), "out": config.out / "quick"})
    c.vocab_size, c.d_model, c.layers, c.heads, c.d_hidden = 200, 32, 2, 2, 64
    c.batch_tokens, c.steps, c.warmup, c.eval_every, c.checkpoint_every = 600, 24, 4, 12, 10
    c.beam = min(c.beam, 2)
    c.seeds = min(c.seeds, 2)
    return c


# ------------------------------------------------------------------------------------------- data
def _corpus(c: Config) -> Corpus:
    """The study's corpus: quick runs read 400 training and 24 val/test pairs."""
    return m30k.load_corpus(c.out / "cache", c.vocab_size, 400 if c.quick else None, 24 if c.quick else None)


def build_model(c: Config, kind: str, vocab: int, seed: int) -> Seq2SeqTransformer:
    """The study's ``kind`` model (dense, switch or thor), initialised from ``seed`` (the benchmark builds it too)."""
    torch.manual_seed(seed)
    gate, gate_options = MODEL_GATES[kind]
    switch = kind == "switch"
    return Seq2SeqTransformer(
        TransformerConfig(
            vocab_size=vocab,
            pad_id=m30k.PAD_ID,
            d_model=c.d_model,
            num_heads=c.heads,
            encoder_layers=c.layers,
            decoder_layers=c.layers,
            d_hidden=c.d_hidden,
            dropout=c.dropout,
            gate=gate,
            gate_options=gate_options,
            num_experts=c.num_experts,
            capacity_limit=c.capacity_factor if switch else None,
            eval_capacity_limit=SWITCH_EVAL_CAPACITY if switch else None,
            gate_seed=seed,
        )
    )


def _lr_factor(step: int, c: Config) -> float:
    """Linear warm-up to 1 over ``warmup`` updates, then cosine decay to 0 at ``steps``."""
    if step < c.warmup:
        return (step + 1) / c.warmup
    progress_ = (step - c.warmup) / max(c.steps - c.warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))


# ------------------------------------------------------------------------------------------- evaluation
def _bleu(model: Seq2SeqTransformer, corpus: Corpus, data: m30k.ParallelData, beam: int, lp: float) -> float:
    hypotheses = translate(model, corpus.tokenizer, data, beam=beam, length_penalty=lp)
    return m30k.corpus_bleu(hypotheses, data.tgt_text)[0]


def _dropout_only(model: nn.Module) -> None:
    """Evaluation mode except dropout (and attention dropout), which stays on."""
    model.eval()
    for module in model.modules():
        if isinstance(module, (nn.Dropout, MultiHeadAttention)):
            module.train()


def _batches(data: m30k.ParallelData, size: int = 100) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for start in range(0, len(data), size):
        idx = list(range(start, min(start + size, len(data))))
        src = m30k.pad_batch([data.src[i] for i in idx], eos=True)
        tgt = m30k.pad_batch([data.tgt[i] for i in idx], bos=True, eos=True)
        out.append((src, tgt[:, :-1], tgt[:, 1:]))
    return out


@torch.no_grad()
def _pass_kl(model: Seq2SeqTransformer, data: m30k.ParallelData, setup: Callable[[int], Any]) -> float:
    """Mean symmetric KL per non-pad target token between two passes prepared by ``setup(pass)``."""
    total, tokens = 0.0, 0
    for src, tin, tout in _batches(data):
        logps = []
        for p in (0, 1):
            with setup(p):
                logps.append(torch.log_softmax(model(src, tin).float(), -1))
        keep = tout != m30k.PAD_ID
        total += float(symmetric_kl(logps[0][keep], logps[1][keep]).sum())
        tokens += int(keep.sum())
    return total / max(tokens, 1)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def _agreement(model: Seq2SeqTransformer, kind: str, corpus: Corpus, seed: int) -> dict[str, float]:
    """THOR's consistency measures; see the module docstring."""
    result: dict[str, float] = {}
    # Two stochastic passes as in training: dropout on (+ a random expert per layer for THOR).
    _dropout_only(model)
    torch.manual_seed(seed + 101)
    if kind == "thor":
        result["kl_dropout_and_experts"] = _pass_kl(
            model, corpus.val, lambda p: thor_inference(model, "random-token", seed=seed * 7 + p)
        )
    else:
        result["kl_dropout"] = _pass_kl(model, corpus.val, lambda p: _Null())
    # BLEU under two different draws (greedy): THOR's expert draws without dropout; dropout for others.
    hyps = []
    for draw in (1, 2):
        torch.manual_seed(seed * 100 + draw)
        if kind == "thor":
            model.eval()
            with thor_inference(model, "random-token", seed=1000 + draw):
                hyps.append(translate(model, corpus.tokenizer, corpus.test))
        else:
            _dropout_only(model)
            hyps.append(translate(model, corpus.tokenizer, corpus.test))
    model.eval()
    if kind == "thor":
        result["kl_experts_only"] = _pass_kl(
            model, corpus.val, lambda p: thor_inference(model, "random-token", seed=seed * 7 + p)
        )
    refs = corpus.test.tgt_text
    result["test_bleu_draw_1"] = m30k.corpus_bleu(hyps[0], refs)[0]
    result["test_bleu_draw_2"] = m30k.corpus_bleu(hyps[1], refs)[0]
    result["bleu_between_draws"] = m30k.corpus_bleu(hyps[1], hyps[0])[0]
    return result


# ------------------------------------------------------------------------------------------- training
@torch.no_grad()
def _val_loss(model: Seq2SeqTransformer, corpus: Corpus, c: Config) -> float:
    model.eval()
    total, tokens = 0.0, 0
    with _mode(model, c.thor_mode, seed=0):
        for src, tin, tout in _batches(corpus.val):
            logits = model(src, tin)
            terms = consistency_terms(logits, logits, tout, 0.0, pad_id=m30k.PAD_ID, label_smoothing=0.0)
            total += float(terms.ce_1) * terms.num_tokens
            tokens += terms.num_tokens
    return total / max(tokens, 1)


def _val_bleu_greedy(model: Seq2SeqTransformer, corpus: Corpus, kind: str, c: Config) -> float:
    model.eval()
    with _mode(model, c.thor_mode, seed=0):
        return _bleu(model, corpus, corpus.val, 1, c.length_penalty)


def _mode(model: Seq2SeqTransformer, mode: str, seed: int) -> Any:
    """A context running THOR layers in ``mode`` (``fixed-<j>`` = expert j); a no-op for other models."""
    if not thor_layers(model):
        return _Null()
    name, _, expert = mode.rpartition("-") if mode.startswith("fixed-") else (mode, "", "0")
    return thor_inference(model, name, expert=int(expert), seed=seed)


class _Epochs(Batches):
    """A :class:`~sparsemoe.data.multi30k.BatchOrder` as the training loop's batch order."""

    def __init__(self, order: m30k.BatchOrder) -> None:
        self.order = order

    def epoch(self, index: int) -> list[list[int]]:
        return self.order.epoch(index)

    def describe(self) -> dict[str, Any]:
        return {"seed": self.order.seed, "batch_tokens": self.order.batch_tokens, "sentences": len(self.order.data)}


class _LogEvaluation(Callback):
    def __init__(self, bar: Any, label: str) -> None:
        self.bar, self.label = bar, label

    def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.bar.console.log(
            f"{self.label} step {record['step']}: train CE {record['train_ce']:.3f}, val CE {record['val_ce']:.3f}, "
            f"val BLEU (greedy) {record['val_bleu_greedy']:.2f}"
        )


#: the keys of a history point in results.json, in order
_POINT = ("step", "train_ce", "train_loss", "train_kl", "val_ce", "val_bleu_greedy", "wall_seconds")


def train_run(c: Config, corpus: Corpus, kind: str, seed: int, ckpt: Path) -> dict[str, Any]:
    """Train one model for ``c.steps`` updates (resuming from ``ckpt``) and evaluate it."""
    model = build_model(c, kind, corpus.tokenizer.vocab_size, seed)

    def loss(idx: list[int]) -> dict[str, torch.Tensor]:
        src = m30k.pad_batch([corpus.train.src[i] for i in idx], eos=True)
        tgt = m30k.pad_batch([corpus.train.tgt[i] for i in idx], bos=True, eos=True)
        tin, tout = tgt[:, :-1], tgt[:, 1:]
        if kind == "thor":
            terms = thor_training_loss(
                lambda: model(src, tin), tout, c.alpha, pad_id=m30k.PAD_ID, label_smoothing=c.label_smoothing
            )
            return {"loss": terms.total, "ce": terms.ce_1, "kl": terms.kl}
        logits = model(src, tin)
        terms = consistency_terms(logits, logits, tout, 0.0, pad_id=m30k.PAD_ID, label_smoothing=c.label_smoothing)
        return {"loss": terms.ce_1 + model.aux_loss(), "ce": terms.ce_1, "kl": terms.kl}

    def evaluate() -> dict[str, float]:
        return {
            "val_ce": _val_loss(model, corpus, c),
            "val_bleu_greedy": _val_bleu_greedy(model, corpus, kind, c),
            "wall_seconds": trainer.seconds,
        }

    config = TrainConfig(
        steps=c.steps,
        lr=c.lr,
        seed=seed,
        eval_every=c.eval_every,
        checkpoint_every=c.checkpoint_every,
        checkpoint_path=str(ckpt),
        checkpoint_at_end=False,  # the finished run is saved as a record; the file is deleted
    )
    label = f"{kind} seed {seed}"
    with progress() as bar:
        trainer = Trainer(
            model,
            loss,
            _Epochs(m30k.BatchOrder(corpus.train, c.batch_tokens, seed)),
            config,
            evaluate=evaluate,
            optimizer=lambda m, cfg: torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8),
            scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, c)),
            callbacks=[ProgressBar(label, bar), _LogEvaluation(bar, label)],
        )
        torch.manual_seed(seed)  # a resumed run restores the RNG states from the checkpoint instead
        result = trainer.run(ckpt if ckpt.exists() else None)
    record = {
        "model": kind,
        "seed": seed,
        "history": [{k: h[k] for k in _POINT} for h in result.history],
        "train_seconds": result.seconds,
        "train_cpu_seconds": result.cpu_seconds,
        **_evaluate(model, kind, corpus, c, seed),
    }
    record["params"] = model.parameter_counts()
    return record


def _evaluate(model: Seq2SeqTransformer, kind: str, corpus: Corpus, c: Config, seed: int) -> dict[str, Any]:
    """Val/test BLEU (beam search; every inference mode for THOR) and the agreement measures."""
    model.eval()
    start = time.perf_counter()
    bleu: dict[str, dict[str, float]] = {}
    modes = THOR_MODES if kind == "thor" else ("deterministic",)
    for mode in modes:
        with _mode(model, mode, seed):
            bleu[mode] = {
                split: _bleu(model, corpus, data, c.beam, c.length_penalty)
                for split, data in (("val", corpus.val), ("test", corpus.test))
            }
    agreement = _agreement(model, kind, corpus, seed)
    return {"bleu": bleu, "agreement": agreement, "eval_seconds": time.perf_counter() - start}


def run(config: Config) -> dict[str, Any]:
    """Train every (model, seed) not yet saved, then rebuild results.json, table.md, summary.json, curves.png."""
    c = _effective(config)
    corpus = _corpus(c)
    store = RunStore(c.out, asdict(c), selection=("quick", "out", "seeds", "models", "thor_mode"))
    jobs = {
        store.key(model=kind, seed=seed): functools.partial(train_run, c, corpus, kind, seed)
        for kind in c.models
        for seed in range(c.seeds)
    }
    if note := store.reuse_note(jobs, "pass a new --out (or delete that folder) to retrain"):
        console.print(note, soft_wrap=True)
    store.run_missing(jobs, extra={"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()}})
    runs = [r for r in store if r["model"] in c.models and r["seed"] < c.seeds]
    signature = m30k.corpus_bleu(["a"], ["a"])[1]
    by_model, summary = report.summaries(c, runs)
    results = {
        "name": NAME,
        "quick": c.quick,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()},
        "sacrebleu_signature": signature,
        "test_sentences": len(corpus.test),
        "tokenizer": {
            "kind": "sentencepiece unigram, joint en+de, train only",
            "vocab_size": corpus.tokenizer.vocab_size,
        },
        "summary": by_model,
        "runs": runs,
    }
    write_json(c.out / "results.json", results)
    write_json(c.out / "summary.json", summary)
    write_report(results, c.out)
    return results


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and curves.png into ``folder`` from ``results``; returns their paths.

    Records written before ``test_sentences`` was kept need the data to count the test sentences.
    """
    config = from_record(Config, results)
    num_test = results.get("test_sentences") or len(m30k.read_split(data_dir(m30k.NAME), "test")[0])
    by_model, summary = report.summaries(config, results["runs"])
    table = report.table(config, by_model, summary, results["sacrebleu_signature"], num_test, results["runs"])
    atomic_write_text(folder / "table.md", table)
    report.plot(config, results["runs"], folder / "curves.png")
    return [folder / "table.md", folder / "curves.png"]
