"""``translate``: a corpus split decoded in length-sorted batches, returned in corpus order."""

from __future__ import annotations

import pytest
import torch

from sparsemoe.data.multi30k import BOS_ID, EOS_ID, PAD_ID, ParallelData, pad_batch
from sparsemoe.models.decoding import beam_search, greedy_decode, translate
from sparsemoe.models.transformer import Seq2SeqTransformer, TransformerConfig


class _Ids:
    """A stand-in tokenizer: ``decode`` writes the ids out, so the test sees exactly what was decoded."""

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [" ".join(map(str, s)) for s in ids]


def _model() -> Seq2SeqTransformer:
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=24, pad_id=PAD_ID, d_model=16, num_heads=2, encoder_layers=1, decoder_layers=1, d_hidden=32
    )
    return Seq2SeqTransformer(config).eval()


@pytest.mark.parametrize("beam", [1, 3])
def test_translate_returns_corpus_order(beam: int) -> None:
    sources = [[5, 6, 7, 8, 9], [10], [11, 12, 13], [14, 15], [16, 17, 18, 19]]
    data = ParallelData(sources, [[4]] * len(sources), [""] * len(sources), [""] * len(sources))
    model = _model()
    # translate decodes the sentences sorted by length; the reference decodes them in corpus order
    out = translate(model, _Ids(), data, beam=beam, length_penalty=0.6)  # type: ignore[arg-type]
    src, ids = pad_batch(sources, eos=True), torch.arange(len(sources))
    if beam == 1:
        hyps = greedy_decode(model, src, bos_id=BOS_ID, eos_id=EOS_ID, sentence_ids=ids)
    else:
        hyps = beam_search(model, src, bos_id=BOS_ID, eos_id=EOS_ID, beam=beam, alpha=0.6, sentence_ids=ids)
    assert out == _Ids().decode(hyps)
    assert len(set(out)) > 1  # the sentences decode differently, so a mix-up would show
