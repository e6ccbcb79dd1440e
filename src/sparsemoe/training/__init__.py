"""Training helpers shared by the demo and the experiments."""

from .config import TrainConfig
from .loop import FitResult, fit, minibatches

__all__ = ["FitResult", "TrainConfig", "fit", "minibatches"]
