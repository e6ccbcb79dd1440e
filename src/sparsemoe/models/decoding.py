"""Greedy decoding and batched beam search for :class:`~sparsemoe.models.transformer.Seq2SeqTransformer`.

Both decode incrementally (each decoder layer caches its keys/values), so a step costs one token
per hypothesis. Beam search keeps ``beam`` live hypotheses per sentence in one flat batch and
ranks finished ones by ``log p / lp(len)`` with GNMT's length penalty
``lp(len) = ((5 + len) / 6) ** alpha`` (Wu et al., 2016); ``alpha = 0`` ranks by raw log-probability.
"""

from __future__ import annotations

import torch

from ..data.multi30k import BOS_ID, EOS_ID, ParallelData, SubwordTokenizer, pad_batch
from .transformer import LayerCache, Seq2SeqTransformer


def _max_len(src: torch.Tensor, pad_id: int, max_len_a: float, max_len_b: int, limit: int) -> int:
    longest = int((src != pad_id).sum(1).max())
    return min(int(max_len_a * longest + max_len_b), limit - 1)


def _reorder(cache: list[LayerCache], index: torch.Tensor) -> None:
    for layer in cache:
        for key in layer:
            layer[key] = layer[key].index_select(0, index)


@torch.no_grad()
def greedy_decode(
    model: Seq2SeqTransformer,
    src: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    sentence_ids: torch.Tensor | None = None,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[int]]:
    """The argmax continuation of each source sentence, without BOS/EOS. Shape: ``src [B, S]``."""
    pad_id = model.config.pad_id
    memory, src_pad = model.encode(src, sentence_ids)
    b = src.shape[0]
    cache = model.new_cache()
    token = torch.full((b, 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    out: list[torch.Tensor] = []
    for step in range(_max_len(src, pad_id, max_len_a, max_len_b, model.config.max_positions)):
        logits = model.decode(token, memory, src_pad, sentence_ids, cache, start=step)[:, -1]
        token = logits.argmax(-1, keepdim=True)
        token = token.masked_fill(done[:, None], eos_id)
        out.append(token)
        done |= token[:, 0] == eos_id
        if bool(done.all()):
            break
    seqs = torch.cat(out, 1).tolist() if out else [[] for _ in range(b)]
    return [s[: s.index(eos_id)] if eos_id in s else s for s in seqs]


def length_penalty(length: torch.Tensor | int, alpha: float) -> torch.Tensor | float:
    """GNMT's ``((5 + length) / 6) ** alpha``."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(
    model: Seq2SeqTransformer,
    src: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    beam: int = 5,
    alpha: float = 0.6,
    sentence_ids: torch.Tensor | None = None,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[int]]:
    """Best hypothesis per source sentence (without BOS/EOS) by length-normalised log-probability.

    At each step the ``2 * beam`` best extensions of a sentence's live hypotheses are ranked; those
    among the first ``beam`` that end in EOS are finished, the best ``beam`` others stay live. A
    sentence stops once it has ``beam`` finished hypotheses; at the length limit the live ones
    are finished too. With ``beam=1`` this is exactly :func:`greedy_decode`.
    Shape: ``src [B, S]``.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    pad_id = model.config.pad_id
    b, k = src.shape[0], beam
    device = src.device
    memory, src_pad = model.encode(src, sentence_ids)
    flat = torch.arange(b, device=device).repeat_interleave(k)  # [B*K] sentence of each hypothesis
    memory, src_pad = memory[flat], src_pad[flat]
    hyp_sentence_ids = None if sentence_ids is None else sentence_ids[flat]
    cache = model.new_cache()
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # only one live hypothesis at first
    tokens = torch.full((b * k, 1), bos_id, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    active = torch.ones(b, dtype=torch.bool)
    max_len = _max_len(src, pad_id, max_len_a, max_len_b, model.config.max_positions)
    for step in range(max_len):
        logits = model.decode(tokens[:, -1:], memory, src_pad, hyp_sentence_ids, cache, start=step)[:, -1]
        logp = torch.log_softmax(logits.float(), -1)  # [B*K, V]
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(b, k * vocab)
        top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)  # [B, 2K]
        top_beam, top_tok = top_idx // vocab, top_idx % vocab
        is_eos = top_tok == eos_id
        last = step == max_len - 1
        new_scores = torch.full((b, k), float("-inf"), device=device)
        new_src = torch.zeros((b, k), dtype=torch.long, device=device)
        new_tok = torch.full((b, k), eos_id, dtype=torch.long, device=device)
        top_scores_l, is_eos_l = top_scores.tolist(), is_eos.tolist()
        top_beam_l, top_tok_l = top_beam.tolist(), top_tok.tolist()
        prefixes = tokens[:, 1:].tolist()
        for i in range(b):
            if not active[i]:
                continue
            live = 0
            for rank in range(len(top_scores_l[i])):
                score = top_scores_l[i][rank]
                if score == float("-inf"):
                    break
                prefix = prefixes[i * k + top_beam_l[i][rank]]
                if is_eos_l[i][rank]:
                    if rank < k:
                        finished[i].append((score / float(length_penalty(len(prefix) + 1, alpha)), prefix))
                    continue
                if live < k:
                    new_scores[i, live], new_src[i, live], new_tok[i, live] = (
                        score,
                        top_beam_l[i][rank],
                        top_tok_l[i][rank],
                    )
                    live += 1
                    if last:
                        finished[i].append(
                            (score / float(length_penalty(len(prefix) + 2, alpha)), [*prefix, top_tok_l[i][rank]])
                        )
            if len(finished[i]) >= k or last or live == 0:
                active[i] = False
        if not bool(active.any()):
            break
        new_scores[~active.to(device)] = float("-inf")
        index = (torch.arange(b, device=device)[:, None] * k + new_src).view(-1)
        tokens = torch.cat([tokens[index], new_tok.view(-1, 1)], 1)
        _reorder(cache, index)
        scores = new_scores
    return [max(f, key=lambda pair: pair[0])[1] if f else [] for f in finished]


def translate(
    model: Seq2SeqTransformer,
    tokenizer: SubwordTokenizer,
    data: ParallelData,
    *,
    beam: int = 1,
    length_penalty: float = 0.6,
    batch_sentences: int = 100,
) -> list[str]:
    """Detokenised translations of ``data.src`` (greedy when ``beam == 1``), in corpus order.

    Sentences are decoded in batches of similar length (less padding); ``sentence_ids`` are the
    corpus indices, so per-sentence expert draws do not depend on the batching.
    """
    out: list[str] = [""] * len(data)
    order = sorted(range(len(data)), key=lambda i: len(data.src[i]))
    for start in range(0, len(order), batch_sentences):
        idx = order[start : start + batch_sentences]
        src = pad_batch([data.src[i] for i in idx], eos=True)
        ids = torch.tensor(idx, dtype=torch.long)
        if beam == 1:
            hyps = greedy_decode(model, src, bos_id=BOS_ID, eos_id=EOS_ID, sentence_ids=ids)
        else:
            hyps = beam_search(
                model, src, bos_id=BOS_ID, eos_id=EOS_ID, beam=beam, alpha=length_penalty, sentence_ids=ids
            )
        for i, text in zip(idx, tokenizer.decode(hyps), strict=True):
            out[i] = text
    return out
