"""The README's gate table, rendered from the gates' class traits (so it cannot go stale).

``python -m tools.gate_table`` writes it into the README; a test checks the README holds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Gate

HEADER = (
    "| name | what | `k` | experts per input | ids read | losses (in `aux_losses`) |",
    "|---|---|---|---|---|---|",
)
_SPARSITY = {
    "dense": "all n",
    "sparse": "k from the first step",
    "learned": "all n until its smooth-steps saturate, then ≤ k",
}
_IDS = {None: "—", "token": "token ids", "sequence": "sequence index"}


def _k_cell(cls: type[Gate]) -> str:
    if cls.k_policy == "dense":
        return "— (all n)"
    if cls.k_policy == "fixed":
        return cls.k_note or "fixed"
    return f"yes ({cls.k_note})" if cls.k_note else "yes"


def _summary(cls: type[Gate]) -> str:
    if cls.summary:
        return cls.summary
    lines = (cls.__doc__ or "").strip().splitlines()
    return lines[0].rstrip(".") if lines else cls.__name__


def row(name: str, cls: type[Gate]) -> str:
    """One table row: ``| `name` | summary | k | sparsity | ids | losses |``."""
    losses = ", ".join(f"`{loss}` ({what})" for loss, what in sorted(cls.aux_losses.items())) or "—"
    cells = (f"`{name}`", _summary(cls), _k_cell(cls), _SPARSITY[cls.sparsity], _IDS[cls.uses_ids], losses)
    return "| " + " | ".join(cells) + " |"


def render_table(gates: Sequence[tuple[str, type[Gate]]]) -> str:
    """The Markdown table of ``(name, class)`` rows, without a trailing newline."""
    return "\n".join([*HEADER, *(row(name, cls) for name, cls in gates)])
