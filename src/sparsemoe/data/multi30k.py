"""Multi30k English-German (Elliott et al., 2016): raw text, a joint subword model, token batches.

The folder ``$SPARSEMOE_DATA_DIR/multi30k`` holds line-aligned ``{train,val,test}.{en,de}``
(test = the 2016 Flickr test set). The subword model is a SentencePiece unigram model trained on
the English and German TRAINING sentences only (a joint vocabulary, so source, target and output
embeddings can be tied), cached on disk under a name that includes its settings.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ._paths import data_dir

NAME = "multi30k"
SPLITS = ("train", "val", "test")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def read_split(folder: Path, split: str, src: str = "en", tgt: str = "de") -> tuple[list[str], list[str]]:
    """Source and target sentences of ``split`` (stripped lines), checked to be aligned."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sources = (folder / f"{split}.{src}").read_text(encoding="utf-8").splitlines()
    targets = (folder / f"{split}.{tgt}").read_text(encoding="utf-8").splitlines()
    if len(sources) != len(targets):
        raise ValueError(f"{split}.{src} has {len(sources)} lines but {split}.{tgt} has {len(targets)}")
    return [s.strip() for s in sources], [t.strip() for t in targets]


class SubwordTokenizer:
    """A SentencePiece model with pad=0, unk=1, bos=2, eos=3; ``decode`` detokenises."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, sentences: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.sp.encode(sentences)]

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [str(s) for s in self.sp.decode(ids)]


def train_tokenizer(
    folder: Path, cache_dir: Path, vocab_size: int = 8000, max_sentences: int | None = None
) -> SubwordTokenizer:
    """A joint unigram SentencePiece model on train.en + train.de, trained once and cached.

    The cache file name carries the vocabulary size and a hash of the training text, so changing
    either retrains. ``max_sentences`` (quick runs) trains on the first sentences only.
    """
    en, de = read_split(folder, "train")
    if max_sentences is not None:
        en, de = en[:max_sentences], de[:max_sentences]
    return sentencepiece_tokenizer(en + de, cache_dir, vocab_size)


def sentencepiece_tokenizer(sentences: list[str], cache_dir: Path, vocab_size: int) -> SubwordTokenizer:
    """A unigram SentencePiece model (pad=0, unk=1, bos=2, eos=3) on ``sentences``, trained once and cached.

    The cache file name carries the vocabulary size and a hash of the text, so changing either retrains.
    """
    import sentencepiece as spm

    text = "\n".join(sentences) + "\n"
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    prefix = cache_dir / f"spm-unigram-{vocab_size}-{digest}"
    model_file = prefix.with_suffix(".model")
    if not model_file.exists():
        # Train under a private name, then rename: two studies starting together never see half a model.
        cache_dir.mkdir(parents=True, exist_ok=True)
        private = cache_dir / f".{prefix.name}-pid{os.getpid()}"  # no dot: with_suffix stays safe
        corpus = private.with_suffix(".txt")
        corpus.write_text(text, encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(private),
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            minloglevel=2,
            hard_vocab_limit=False,
        )
        corpus.unlink()
        private.with_suffix(".vocab").unlink(missing_ok=True)
        os.replace(private.with_suffix(".model"), model_file)
    return SubwordTokenizer(model_file)


@dataclass
class ParallelData:
    """Token ids of one split: ``src[i]`` plain, ``tgt[i]`` plain (BOS/EOS added by batching)."""

    src: list[list[int]]
    tgt: list[list[int]]
    src_text: list[str]
    tgt_text: list[str]

    def __len__(self) -> int:
        return len(self.src)


def encode_split(
    folder: Path, split: str, tokenizer: SubwordTokenizer, max_sentences: int | None = None, max_tokens: int = 100
) -> ParallelData:
    """Tokenised ``split``; training pairs longer than ``max_tokens`` subwords are dropped."""
    en, de = read_split(folder, split)
    if max_sentences is not None:
        en, de = en[:max_sentences], de[:max_sentences]
    src, tgt = tokenizer.encode(en), tokenizer.encode(de)
    if split == "train":
        keep = [i for i in range(len(src)) if 0 < len(src[i]) <= max_tokens and 0 < len(tgt[i]) <= max_tokens]
        return ParallelData(
            [src[i] for i in keep], [tgt[i] for i in keep], [en[i] for i in keep], [de[i] for i in keep]
        )
    return ParallelData(src, tgt, en, de)


def pad_batch(seqs: list[list[int]], bos: bool = False, eos: bool = False) -> torch.Tensor:
    """``LongTensor[B, T]`` of ``seqs`` (with BOS/EOS if asked), right-padded with ``PAD_ID``."""
    rows = [([BOS_ID] if bos else []) + s + ([EOS_ID] if eos else []) for s in seqs]
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def token_batches(data: ParallelData, max_tokens: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Sentence indices grouped into batches of at most ``max_tokens`` (padded) target+source tokens.

    Sentences are sorted by length (with random tie-breaking when ``generator`` is given) so that
    batches hold similar lengths and little padding; the batch order is shuffled with ``generator``.
    """
    n = len(data)
    noise = torch.rand(n, generator=generator).tolist() if generator is not None else [0.0] * n
    order = sorted(range(n), key=lambda i: (len(data.tgt[i]), len(data.src[i]), noise[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = max(len(data.src[i]), len(data.tgt[i])) + 2
        if current and (len(current) + 1) * max(longest, length) * 2 > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if generator is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


class BatchOrder:
    """The batch of each update: a pure function of (seed, update), so a resumed run replays the order.

    Epoch ``e`` is :func:`token_batches` of ``data`` shuffled with seed ``seed * 1000 + e``; epochs
    are built once and kept.
    """

    def __init__(self, data: ParallelData, batch_tokens: int, seed: int) -> None:
        self.data, self.batch_tokens, self.seed = data, batch_tokens, seed
        self.epochs: list[list[list[int]]] = []

    def epoch(self, epoch: int) -> list[list[int]]:
        while len(self.epochs) <= epoch:
            generator = torch.Generator().manual_seed(self.seed * 1000 + len(self.epochs))
            self.epochs.append(token_batches(self.data, self.batch_tokens, generator))
        return self.epochs[epoch]

    def __call__(self, step: int) -> list[int]:
        epoch, offset = 0, step
        while offset >= len(self.epoch(epoch)):
            offset -= len(self.epoch(epoch))
            epoch += 1
        return self.epoch(epoch)[offset]


@dataclass
class Corpus:
    """The tokenizer and the tokenised splits of one study."""

    tokenizer: SubwordTokenizer
    train: ParallelData
    val: ParallelData
    test: ParallelData


def load_corpus(
    cache_dir: Path, vocab_size: int, max_sentences: int | None = None, eval_sentences: int | None = None
) -> Corpus:
    """Multi30k from the data folder: the tokenizer (trained on ``max_sentences`` training pairs, cached
    in ``cache_dir``) and the splits (``max_sentences`` training and ``eval_sentences`` val/test pairs)."""
    folder = data_dir(NAME)
    tokenizer = train_tokenizer(folder, cache_dir, vocab_size, max_sentences=max_sentences)
    return Corpus(
        tokenizer,
        encode_split(folder, "train", tokenizer, max_sentences),
        encode_split(folder, "val", tokenizer, eval_sentences),
        encode_split(folder, "test", tokenizer, eval_sentences),
    )


def corpus_bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """SacreBLEU on detokenised text (its default 13a tokenisation): ``(score 0-100, signature)``."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())
