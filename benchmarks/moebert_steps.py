"""``python -m benchmarks.moebert_steps``: seconds per training step of the moebert-sst2 study.

Sizes the study's budget: one fine-tuning step of the dense MiniLM and one distillation step of
each student (student forward + backward, teacher forward, AdamW update), on real SST-2 batches
(batch 32, at most 64 tokens, dynamic padding), single thread unless ``--threads``. Prints a
markdown table of the median and range over ``--steps`` steps, gates interleaved.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from sparsemoe.data import sst2
from sparsemoe.experiments.moebert_sst2 import pretrained_path, read_split
from sparsemoe.hf import moefy
from sparsemoe.hf.train import batch_rows, collate, distillation_loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.moebert_steps", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gates", nargs="+", default=["hash", "topk", "comet", "comet+"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(pretrained_path(), local_files_only=True)
    data = read_split(sst2.split_path("train"), tokenizer, 64, 20_000)
    teacher = AutoModelForSequenceClassification.from_pretrained(pretrained_path(), num_labels=2).eval()
    models = {"dense (fine-tune)": None, **{g: moefy(copy.deepcopy(teacher), gate=g).train() for g in args.gates}}
    dense = copy.deepcopy(teacher).train()
    times: dict[str, list[float]] = {name: [] for name in models}
    optimizers = {
        name: torch.optim.AdamW((dense if model is None else model).parameters(), lr=1e-5)
        for name, model in models.items()
    }
    for step in range(args.steps + 1):
        batch = collate(data, batch_rows(len(data), args.batch_size, 0, step))
        for name, model in models.items():
            start = time.perf_counter()
            student = dense if model is None else model
            loss = distillation_loss(student, None if model is None else teacher, batch, 1.0)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - start)
    print(f"| model | s/step median [min-max] (batch {args.batch_size}, {args.threads} thread(s)) |")
    print("|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} [{min(t):.2f}-{max(t):.2f}] |")


if __name__ == "__main__":
    main()
