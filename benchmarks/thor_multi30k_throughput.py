"""Training throughput of the thor-multi30k models on one CPU thread (sizing the study).

``python -m benchmarks.thor_multi30k_throughput [--d-hidden 512] [--updates 25]`` times updates of
the dense, Switch and THOR models of the experiment's default configuration on real Multi30k
batches, after 5 warm-up updates. It reports target tokens per CPU-second (process time, so other
jobs on a shared machine do not distort it) and the CPU-minutes one epoch and one full run
(``--steps`` updates) would take; wall-clock time is that divided by the CPU share the job gets.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from sparsemoe.data import multi30k as m30k
from sparsemoe.experiments.thor_multi30k import Config, build_model
from sparsemoe.thor import consistency_terms, thor_training_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-hidden", type=int, default=Config.d_hidden)
    parser.add_argument("--vocab-size", type=int, default=Config.vocab_size)
    parser.add_argument("--updates", type=int, default=25)
    parser.add_argument("--models", nargs="+", default=["dense", "switch", "thor"])
    parser.add_argument("--cache", type=Path, default=Path("results/thor-multi30k/cache"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    c = replace(Config(out=args.cache.parent), d_hidden=args.d_hidden, vocab_size=args.vocab_size)
    corpus = m30k.load_corpus(c.out / "cache", c.vocab_size)
    order = m30k.BatchOrder(corpus.train, c.batch_tokens, 0)
    epoch_tokens = sum(len(t) + 1 for t in corpus.train.tgt)
    updates_per_epoch = len(order.epoch(0))
    print(f"vocab {corpus.tokenizer.vocab_size}, {updates_per_epoch} updates/epoch of <= {c.batch_tokens} tokens")
    for kind in args.models:
        model = build_model(c, kind, corpus.tokenizer.vocab_size, 0).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        tokens, start = 0, 0.0
        for step in range(5 + args.updates):
            if step == 5:
                tokens, start = 0, time.process_time()
            idx = order(step)
            src = m30k.pad_batch([corpus.train.src[i] for i in idx], eos=True)
            tgt = m30k.pad_batch([corpus.train.tgt[i] for i in idx], bos=True, eos=True)
            tin, tout = tgt[:, :-1], tgt[:, 1:]
            if kind == "thor":
                loss = thor_training_loss(lambda: model(src, tin), tout, c.alpha, pad_id=m30k.PAD_ID).total  # noqa: B023
            else:
                logits = model(src, tin)
                loss = consistency_terms(logits, logits, tout, 0.0, pad_id=m30k.PAD_ID).ce_1 + model.aux_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tokens += int((tout != m30k.PAD_ID).sum())
        rate = tokens / (time.process_time() - start)
        epoch_min = epoch_tokens / rate / 60
        print(
            f"{kind:7s} params {model.parameter_counts()}: {rate:6.0f} target tokens/CPU-s; "
            f"epoch {epoch_min:5.1f} CPU-min; {c.steps} updates {epoch_min * c.steps / updates_per_epoch:5.1f} CPU-min"
        )


if __name__ == "__main__":
    main()
