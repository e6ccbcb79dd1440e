"""Models built from sparsemoe layers: the COMET paper's MMoEs and a seq2seq Transformer with MoE FFNs."""

from .cnn import CNNExpert, CNNExperts, VisionMMoE
from .mmoe import MMoE, Tower
from .ple import PLE
from .recsys import RecsysMMoE, UserItemEmbedding
from .transformer import (
    DecoderOnlyLM,
    Seq2SeqTransformer,
    TransformerConfig,
    TransformerDecoderBlock,
    TransformerEncoderBlock,
)

__all__ = [
    "PLE",
    "CNNExpert",
    "CNNExperts",
    "DecoderOnlyLM",
    "MMoE",
    "RecsysMMoE",
    "Seq2SeqTransformer",
    "Tower",
    "TransformerConfig",
    "TransformerDecoderBlock",
    "TransformerEncoderBlock",
    "UserItemEmbedding",
    "VisionMMoE",
]
