"""Models built from sparsemoe layers, as used by the demo and the experiments."""

from .cnn import CNNExpert, CNNExperts, VisionMMoE
from .mmoe import MMoE, Tower
from .recsys import RecsysMMoE, UserItemEmbedding

__all__ = ["CNNExpert", "CNNExperts", "MMoE", "RecsysMMoE", "Tower", "UserItemEmbedding", "VisionMMoE"]
