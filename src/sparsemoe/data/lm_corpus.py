"""An offline English language-modelling corpus from the data folder: Multi30k (en) + SST-2 sentences.

Training text: Multi30k ``train.en`` and the SST-2 ``train.tsv`` + ``dev.tsv`` sentences (GLUE's
training set; its phrases deduplicated). Held-out text: Multi30k ``val.en`` and SST-2 ``test.tsv``
(GLUE's validation set), less any sentence that also occurs in the training text. The subword model
is a unigram SentencePiece model trained on the training text only. Each split is packed GPT-style:
every sentence's subwords followed by EOS, concatenated, cut into blocks of ``seq_len + 1`` tokens
(inputs ``block[:-1]``, next-token targets ``block[1:]``); the tail shorter than a block is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import multi30k, sst2
from ._paths import data_dir
from .multi30k import EOS_ID, SubwordTokenizer, sentencepiece_tokenizer


def _unique(sentences: list[str]) -> list[str]:
    """Non-empty sentences, first occurrence kept, order kept."""
    return list(dict.fromkeys(s for s in sentences if s))


def lm_sentences(max_sentences: int | None = None) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` sentences; ``max_sentences`` (quick runs) takes the first of each training
    source and a quarter as many of each held-out one."""
    cut = slice(None, max_sentences)
    held_cut = slice(None, None if max_sentences is None else max(max_sentences // 4, 1))
    en_train, _ = multi30k.read_split(data_dir(multi30k.NAME), "train")
    en_val, _ = multi30k.read_split(data_dir(multi30k.NAME), "val")
    sst_train = sst2.read_tsv(sst2.split_path("train"))[0] + sst2.read_tsv(sst2.split_path("dev"))[0]
    sst_test = sst2.read_tsv(sst2.split_path("test"))[0]
    train = _unique(en_train[cut] + sst_train[cut])
    seen = set(train)
    held_out = [s for s in _unique(en_val[held_cut] + sst_test[held_cut]) if s not in seen]
    return train, held_out


def pack(ids: list[list[int]], seq_len: int) -> torch.Tensor:
    """``LongTensor[N, seq_len + 1]``: the sentences' ids, each followed by EOS, concatenated and cut into blocks."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    stream = torch.tensor([t for sentence in ids for t in (*sentence, EOS_ID)], dtype=torch.long)
    blocks = stream.numel() // (seq_len + 1)
    if blocks == 0:
        raise ValueError(f"the text holds {stream.numel()} tokens, fewer than one block of seq_len + 1 = {seq_len + 1}")
    return stream[: blocks * (seq_len + 1)].view(blocks, seq_len + 1)


@dataclass
class LMCorpus:
    """Packed token blocks ``[N, seq_len + 1]`` of the training and held-out text, and the tokenizer."""

    tokenizer: SubwordTokenizer
    train: torch.Tensor
    val: torch.Tensor


def load_lm_corpus(cache_dir: Path, vocab_size: int, seq_len: int, max_sentences: int | None = None) -> LMCorpus:
    """The corpus described in the module docstring; the tokenizer is cached in ``cache_dir``."""
    train, held_out = lm_sentences(max_sentences)
    tokenizer = sentencepiece_tokenizer(train, cache_dir, vocab_size)
    return LMCorpus(tokenizer, pack(tokenizer.encode(train), seq_len), pack(tokenizer.encode(held_out), seq_len))
