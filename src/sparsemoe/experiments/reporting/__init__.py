"""Every experiment's tables and plots: the shared pieces (:mod:`.common`) and one module per study.

A study module trains and stores runs; the functions that turn its results into table.md and PNGs live
here, so ``tools.rerender`` redraws them from results.json alone. A module here never imports its
study (the study imports it). Only the shared pieces are imported with the package: a study's module
is imported by that study.
"""

from __future__ import annotations

from .common import fmt, fmt_value, markdown_table, mean_std, pyplot, save_figure

__all__ = ["fmt", "fmt_value", "markdown_table", "mean_std", "pyplot", "save_figure"]
