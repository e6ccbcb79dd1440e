"""Argument checks shared by the public API.

Every check raises an error that names the argument, what it got, and what is allowed, so a user can
fix the call without reading our source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if low is not None and value < low:
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and value > high:
        bound = f"between {low} and {high}" if low is not None else f"<= {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_float(
    name: str, value: object, *, low: float | None = None, strict: bool = False, allow_inf: bool = False
) -> float:
    """Return ``value`` as a float if it is a real number above ``low`` (``> low`` when strict).

    Infinity is rejected unless ``allow_inf`` (where it has a meaning, e.g. "no limit"): a weight or
    width of inf turns every loss or activation it touches into inf or NaN.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if not allow_inf and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return value


#: the seeds ``torch.Generator.manual_seed`` takes
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def check_seed(name: str, value: object) -> int:
    """Return ``value`` if it is an int that ``torch.Generator.manual_seed`` accepts."""
    return check_int(name, value, low=SEED_RANGE[0], high=SEED_RANGE[1])


def check_float_dtype(name: str, dtype: object) -> torch.dtype | None:
    """Return ``dtype`` if it is ``None`` or a floating-point dtype parameters can have.

    Checked at construction: an integer dtype fails inside ``nn.Linear`` ("only floating point ...
    can require gradients"), a complex one only at the first forward (no complex softmax).
    """
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point dtype (torch.float16, torch.bfloat16, torch.float32 or "
            f"torch.float64) or None, got {dtype!r}"
        )
    return dtype


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # narrowed to str by the membership test


def device_side_checks(t: torch.Tensor) -> bool:
    """Whether checks of ``t``'s values are device-side asserts rather than host reads.

    On CUDA a host read waits for every queued kernel (a synchronisation that stalls the forward),
    and a compiled graph cannot read values at all; there a failed check raises asynchronously: a
    CUDA "device-side assert triggered" error at a later synchronisation, with the check's message
    in the device log, after which the CUDA context is unusable (rerun on CPU, or with
    ``CUDA_LAUNCH_BLOCKING=1``, to see the clear ``ValueError``). Elsewhere checks raise that
    ``ValueError`` at once.
    """
    return t.is_cuda or torch.compiler.is_compiling()


def skip_value_checks() -> bool:
    """Whether a ``torch.func`` transform runs: ``vmap`` can neither read values on the host nor
    assert on them on the device, so checks of values (finite inputs, id ranges) are skipped there."""
    return torch._C._are_functorch_transforms_active()


def _all_finite(x: torch.Tensor) -> bool:
    """Exactly ``isfinite(x).all()``, usually for the cost of one sum (on the host).

    A NaN or infinity anywhere makes the sum non-finite, so a finite sum proves the check; only a
    non-finite sum (a bad value, or an overflow of large finite ones) pays for the elementwise test.
    With :func:`device_side_checks` it is an asynchronous assert instead, and returns True.
    """
    if skip_value_checks():
        return True
    x = x.detach()
    if device_side_checks(x):
        torch._assert_async(torch.isfinite(x).all(), "input contains NaN or infinite values")
        return True
    return math.isfinite(x.sum().item()) or bool(torch.isfinite(x).all())  # a host float: 2 ops, not 6


def check_input(x: object, width: int | None, *, name: str = "x", check_finite: bool = True) -> torch.Tensor:
    """Validate a ``[..., width]`` floating-point input (``width=None``: any trailing shape).

    ``check_finite`` costs one reduction over ``x``; layers expose it as a flag so that users who
    trust their inputs can switch it off.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}; convert it with {name}.float()"
        )
    if width is not None and (x.dim() < 1 or x.shape[-1] != width):
        raise ValueError(
            f"{name} must have shape [..., {width}] (its last dimension is the input width), got shape {tuple(x.shape)}"
        )
    if check_finite and x.numel() and not _all_finite(x):
        raise ValueError(
            f"{name} contains NaN or infinite values; fix the input, or pass check_finite=False to skip this check"
        )
    return x


def check_dtype(x: torch.Tensor, module: torch.nn.Module, *, layer: str, name: str = "x") -> None:
    """``x`` must have the dtype of ``module``'s floating-point parameters (autocast excepted).

    Without this check a float64 input into a float32 layer ends in a raw matmul error deep inside.
    """
    if torch.is_autocast_enabled(x.device.type):
        return
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is not None and param.dtype != x.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the {layer} layer's parameters are {param.dtype}; convert the input "
            f"with {name}.to({param.dtype}) or build the layer with dtype={x.dtype} (or call layer.to({x.dtype}))"
        )


def check_ids(ids: object, num_rows: int, *, name: str = "ids") -> torch.Tensor:
    """Validate an integer id per input row (token ids, user ids, sequence index)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    ids = ids.reshape(-1)
    if ids.numel() != num_rows:
        raise ValueError(f"{name} must hold one id per input row ({num_rows}), got {ids.numel()}")
    if skip_value_checks():
        return ids.long()
    if ids.numel() and device_side_checks(ids):  # no host read on CUDA or in a compiled graph
        torch._assert_async((ids >= 0).all(), f"{name} must be non-negative")
    elif ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {int(ids.min())}")
    return ids.long()
