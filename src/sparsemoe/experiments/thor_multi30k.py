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

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_write_text, save_figure
from ..data import multi30k as m30k
from ..models.decoding import beam_search, greedy_decode
from ..models.transformer import MultiHeadAttention, Seq2SeqTransformer, TransformerConfig
from ..thor import consistency_terms, symmetric_kl, thor_inference, thor_layers, thor_training_loss
from ..training import Batches, Callback, ProgressBar, TrainConfig, Trainer
from .progress import progress
from .store import RunStore, data_dir, write_json

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
            raise ValueError(f"models: unknown {unknown}; choose from {', '.join(MODELS)}")
        for name in ("seeds", "vocab_size", "d_model", "layers", "heads", "d_hidden", "num_experts", "batch_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "eval_every", "checkpoint_every", "beam"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.thor_mode not in THOR_MODES:
            raise ValueError(f"thor_mode must be one of {', '.join(THOR_MODES)}, got {self.thor_mode!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")


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
@dataclass
class Corpus:
    tokenizer: m30k.SubwordTokenizer
    train: m30k.ParallelData
    val: m30k.ParallelData
    test: m30k.ParallelData


def _corpus(c: Config) -> Corpus:
    folder = data_dir("multi30k")
    limit = 400 if c.quick else None
    eval_limit = 24 if c.quick else None
    tokenizer = m30k.train_tokenizer(folder, c.out / "cache", c.vocab_size, max_sentences=limit)
    return Corpus(
        tokenizer,
        m30k.encode_split(folder, "train", tokenizer, limit),
        m30k.encode_split(folder, "val", tokenizer, eval_limit),
        m30k.encode_split(folder, "test", tokenizer, eval_limit),
    )


def _model(c: Config, kind: str, vocab: int, seed: int) -> Seq2SeqTransformer:
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


class BatchOrder:
    """The batch of each update: a pure function of (seed, update), so a resumed run replays the order.

    Epoch ``e`` is shuffled with seed ``seed * 1000 + e``; epochs are built once and kept.
    """

    def __init__(self, c: Config, corpus: Corpus, seed: int) -> None:
        self.c, self.corpus, self.seed = c, corpus, seed
        self.epochs: list[list[list[int]]] = []

    def _epoch(self, epoch: int) -> list[list[int]]:
        while len(self.epochs) <= epoch:
            generator = torch.Generator().manual_seed(self.seed * 1000 + len(self.epochs))
            self.epochs.append(m30k.token_batches(self.corpus.train, self.c.batch_tokens, generator))
        return self.epochs[epoch]

    def __call__(self, step: int) -> list[int]:
        epoch, offset = 0, step
        while offset >= len(self._epoch(epoch)):
            offset -= len(self._epoch(epoch))
            epoch += 1
        return self._epoch(epoch)[offset]


# ------------------------------------------------------------------------------------------- decoding
def translate(
    model: Seq2SeqTransformer,
    corpus: Corpus,
    data: m30k.ParallelData,
    *,
    beam: int = 1,
    length_penalty: float = 0.6,
    batch_sentences: int = 100,
) -> list[str]:
    """Detokenised translations of ``data.src`` (greedy when ``beam == 1``), in corpus order."""
    out: list[str] = [""] * len(data)
    order = sorted(range(len(data)), key=lambda i: len(data.src[i]))
    for start in range(0, len(order), batch_sentences):
        idx = order[start : start + batch_sentences]
        src = m30k.pad_batch([data.src[i] for i in idx], eos=True)
        ids = torch.tensor(idx, dtype=torch.long)
        if beam == 1:
            hyps = greedy_decode(model, src, bos_id=m30k.BOS_ID, eos_id=m30k.EOS_ID, sentence_ids=ids)
        else:
            hyps = beam_search(
                model, src, bos_id=m30k.BOS_ID, eos_id=m30k.EOS_ID, beam=beam, alpha=length_penalty, sentence_ids=ids
            )
        for i, text in zip(idx, corpus.tokenizer.decode(hyps), strict=True):
            out[i] = text
    return out


def _bleu(model: Seq2SeqTransformer, corpus: Corpus, data: m30k.ParallelData, beam: int, lp: float) -> float:
    return m30k.corpus_bleu(translate(model, corpus, data, beam=beam, length_penalty=lp), data.tgt_text)[0]


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
                hyps.append(translate(model, corpus, corpus.test))
        else:
            _dropout_only(model)
            hyps.append(translate(model, corpus, corpus.test))
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
    """A :class:`BatchOrder` as the training loop's batch order (epoch ``e``: its batches)."""

    def __init__(self, order: BatchOrder, c: Config) -> None:
        self.order, self.c = order, c

    def epoch(self, index: int) -> list[list[int]]:
        return self.order._epoch(index)

    def describe(self) -> dict[str, Any]:
        return {"seed": self.order.seed, "batch_tokens": self.c.batch_tokens, "sentences": len(self.order.corpus.train)}


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
    model = _model(c, kind, corpus.tokenizer.vocab_size, seed)

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
            _Epochs(BatchOrder(c, corpus, seed), c),
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


# ------------------------------------------------------------------------------------------- reporting
def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _summaries(c: Config, runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    by_model: dict[str, Any] = {}
    summary_json: dict[str, Any] = {}
    for kind in c.models:
        rs = [r for r in runs if r["model"] == kind]
        if not rs:
            continue
        default = c.thor_mode if kind == "thor" else "deterministic"
        modes = {
            mode: {split: _mean_std([r["bleu"][mode][split] for r in rs]) for split in ("val", "test")}
            for mode in rs[0]["bleu"]
        }
        agreement = {key: _mean_std([r["agreement"][key] for r in rs]) for key in rs[0]["agreement"]}
        hours = [r["train_seconds"] / 3600 for r in rs]
        by_model[kind] = {"bleu": modes, "agreement": agreement, "train_hours_per_run": _mean_std(hours)}
        summary_json[kind] = {
            "test_bleu": modes[default]["test"]["mean"],
            "test_bleu_std": modes[default]["test"]["std"],
            "seeds": sorted(r["seed"] for r in rs),
            "params": rs[0]["params"]["total"],
            "active_params_per_token": rs[0]["params"]["active_per_token"],
            "train_hours": sum(hours),
            "train_cpu_hours": sum(r["train_cpu_seconds"] for r in rs) / 3600,
            "inference_mode": default,
        }
    return by_model, summary_json


def _merged_runs(c: Config, runs: list[dict[str, Any]]) -> list[str]:
    """One sentence per run trained in another output folder and copied into this study's store,
    naming any setting that differs from the study's (the folder, the seed count and the model list
    only select runs: the run store ignores them too)."""
    study = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()}
    notes = []
    for r in runs:
        trained = r.get("config", {})
        if not trained or str(trained.get("out")) == str(study["out"]):
            continue
        other = sorted(k for k in study if k not in ("out", "seeds", "models") and trained.get(k) != study[k])
        same = f"settings differ in {', '.join(other)}" if other else "every other setting is this study's"
        notes.append(
            f"{r['model']} seed {r['seed']} was trained with `--out {trained['out']}` and its record merged into "
            f"this study ({same})."
        )
    return notes


def _table(
    c: Config,
    by_model: dict[str, Any],
    summary: dict[str, Any],
    signature: str,
    num_test: int,
    runs: list[dict[str, Any]] | None = None,
) -> str:
    title = f"# THOR vs Switch vs dense on Multi30k En-De{' (quick smoke run, not a result)' if c.quick else ''}"
    lines = [
        title,
        "",
        f"Test = test2016 ({num_test:,} sentences), beam {c.beam}, GNMT length penalty {c.length_penalty}; "
        f"sacrebleu `{signature}`; mean ± std over seeds. `train h`: single-thread training hours, each run's "
        f"training time on one thread added over the model's runs (runs in parallel processes overlap in wall "
        f"clock); THOR does two forward/backward passes per update. " + " ".join(_merged_runs(c, runs or [])),
        "",
        "| model | inference | val BLEU | test BLEU | seeds | params | active params/token | train h |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, s in by_model.items():
        for mode, b in s["bleu"].items():
            star = " (default)" if kind == "thor" and mode == summary[kind]["inference_mode"] else ""
            lines.append(
                f"| {kind} | {mode}{star} | {b['val']['mean']:.2f} ± {b['val']['std']:.2f} | "
                f"{b['test']['mean']:.2f} ± {b['test']['std']:.2f} | {b['test']['n']} | {summary[kind]['params']:,} | "
                f"{summary[kind]['active_params_per_token']:,} | {summary[kind]['train_hours']:.2f} |"
            )
    lines += ["", "**Agreement of two stochastic passes**", "", "| model | measure | mean ± std |", "|---|---|---|"]
    for kind, s in by_model.items():
        for key, v in s["agreement"].items():
            lines.append(f"| {kind} | {key} | {v['mean']:.4f} ± {v['std']:.4f} |")
    lines += [
        "",
        "kl_*: mean symmetric KL (nats) per val target token between two teacher-forced passes "
        "(dropout: dropout on; experts: a random expert per token). test_bleu_draw_*: greedy test BLEU "
        "under two draws (THOR: expert draws, no dropout; others: dropout on). bleu_between_draws: BLEU "
        "of draw 2 against draw 1 as reference (100 = identical).",
    ]
    return "\n".join(lines) + "\n"


def _plot(c: Config, runs: list[dict[str, Any]], path: Path) -> None:
    """Curves per run: colour = system, marker = seed, solid = train / dashed = val. The legends
    name each system once and give the seed and split keys separately."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"dense": "tab:blue", "switch": "tab:orange", "thor": "tab:green"}
    markers = ["o", "s", "^", "D", "v"]
    for r in runs:
        h = r["history"]
        steps = [p["step"] for p in h]
        style = {"color": colours[r["model"]], "marker": markers[r["seed"] % len(markers)], "ms": 3.5, "lw": 1}
        ax1.plot(steps, [p["train_ce"] for p in h], **style)
        ax1.plot(steps, [p["val_ce"] for p in h], ls="--", fillstyle="none", **style)
        ax2.plot(steps, [p["val_bleu_greedy"] for p in h], **style)
    systems = [Line2D([], [], color=colours[m], lw=2, label=m) for m in colours if any(r["model"] == m for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    seed_keys = [
        Line2D([], [], color="0.3", marker=markers[s % len(markers)], ls="none", label=f"seed {s}") for s in seeds
    ]
    split_keys = [Line2D([], [], color="0.3", label="train"), Line2D([], [], color="0.3", ls="--", label="val")]
    ax1.set(
        xlabel="update",
        ylabel="cross-entropy per token (nats)",
        title="Loss (train: label-smoothed, pass 1; val: plain)",
    )
    ax2.set(xlabel="update", ylabel="val BLEU (greedy)", title="Validation BLEU", ylim=(0, None))
    ax1.legend(handles=systems + seed_keys + split_keys, fontsize=7, loc="upper right")  # the corners the
    ax2.legend(handles=systems + seed_keys, fontsize=7, loc="lower right")  # curves leave empty
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"THOR / Switch / dense on Multi30k En-De{' — quick smoke run' if c.quick else ''}")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def run(config: Config) -> dict[str, Any]:
    """Train every (model, seed) not yet saved, then rebuild results.json, table.md, summary.json, curves.png."""
    c = _effective(config)
    corpus = _corpus(c)
    store = RunStore(c.out, asdict(c), selection=("quick", "out", "seeds", "models", "thor_mode"))
    for kind in c.models:
        for seed in range(c.seeds):
            key = store.key(model=kind, seed=seed)
            if store.get(key) is not None:
                continue
            ckpt = c.out / "checkpoints" / f"{key}.safetensors"
            record = train_run(c, corpus, kind, seed, ckpt)
            record["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()}
            store.put(key, record)
            ckpt.unlink(missing_ok=True)
    runs = [r for r in store if r["model"] in c.models and r["seed"] < c.seeds]
    signature = m30k.corpus_bleu(["a"], ["a"])[1]
    by_model, summary = _summaries(c, runs)
    results = {
        "name": NAME,
        "quick": c.quick,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()},
        "sacrebleu_signature": signature,
        "tokenizer": {
            "kind": "sentencepiece unigram, joint en+de, train only",
            "vocab_size": corpus.tokenizer.vocab_size,
        },
        "summary": by_model,
        "runs": runs,
    }
    write_json(c.out / "results.json", results)
    write_json(c.out / "summary.json", summary)
    atomic_write_text(c.out / "table.md", _table(c, by_model, summary, signature, len(corpus.test), runs))
    _plot(c, runs, c.out / "curves.png")
    return results
