"""Training helpers shared by the demo and the experiments."""

from .loop import FitResult, fit, minibatches

__all__ = ["FitResult", "fit", "minibatches"]
