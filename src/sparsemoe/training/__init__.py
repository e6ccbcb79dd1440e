"""The one training loop (:class:`Trainer`) and its configuration, data orders and callbacks.

Every trainer in the package runs through it: the loss is a callable, everything else a setting
of :class:`TrainConfig` or a :class:`Callback`. :func:`fit` is the common case (Adam on shuffled
rows, the best validation epoch restored).
"""

from .callbacks import MetricsLog, ProgressBar, RoutingMonitor, TensorBoardLog
from .config import TrainConfig
from .data import Batches, RandomBatches, ShardedBatches, minibatches
from .loop import Callback, Trainer, TrainResult, adam, clip_grad_norm, fit, train

__all__ = [
    "Batches",
    "Callback",
    "MetricsLog",
    "ProgressBar",
    "RandomBatches",
    "RoutingMonitor",
    "ShardedBatches",
    "TensorBoardLog",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "adam",
    "clip_grad_norm",
    "fit",
    "minibatches",
    "train",
]
