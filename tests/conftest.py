"""Shared fixtures: deterministic seeds and small problem sizes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sparsemoe import gates
from sparsemoe.data import data_dir
from sparsemoe.data._paths import data_root

# Gates that place a constant per-input weight sum of 1 on their experts.
NORMALISED_GATES = (
    "softmax",
    "topk",
    "hash",
    "random",
    "dselect_k",
    "comet",
    "sigmoid",
    "fixed",
    "mean",
    "sentence_draw",
    "token_draw",
)
# Gates whose k bounds the experts per input exactly (DSelect-k/COMET only once saturated).
EXACT_K_GATES = ("topk", "hash", "random", "sigmoid", "token_draw")

# The tests run tiny models: extra intra-op threads only add overhead (and thrash on a shared CPU).
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "SPARSEMOE_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["SPARSEMOE_DATA_DIR"] = str(SHARED_DATA)


def needs_data(*names: str) -> pytest.MarkDecorator:
    """Skip unless the data folder holds every data set in ``names``; the reason names the missing ones.

    CI points ``SPARSEMOE_DATA_DIR`` at the data, so these tests run there; a fresh clone skips them.
    """
    missing = []
    for name in names:
        try:
            data_dir(name)
        except FileNotFoundError:
            missing.append(name)
    return pytest.mark.skipif(
        bool(missing),
        reason=f"needs the {', '.join(missing)} data, not found in {data_root()}: "
        f"sparsemoe data fetch {' / '.join(missing)}, or set SPARSEMOE_DATA_DIR",
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=gates.available())
def gate_name(request: pytest.FixtureRequest) -> str:
    return request.param


def gate_kwargs(name: str, num_experts: int) -> dict:
    """Arguments that give each gate a real ``k`` where it has one."""
    return gates.k_options(name, min(2, num_experts))
