"""Input checks shared by every family, run at the public boundary.

Every message names the layer (``name=`` from a patched/injected module, else the function),
the argument, the shape or dtype received and what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

from .function import autocast_cast_dtype, autocast_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def fail(where: str, message: str) -> None:
    raise ValueError(f"{where}: {message}")


def shape_str(t: torch.Tensor) -> str:
    return str(tuple(int(d) for d in t.shape))


def check_base(where: str, x, weight, bias) -> tuple[int, int]:
    """Checks x / weight / bias; returns ``(out, in)``."""
    for arg, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            fail(where, f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            fail(where, f"{arg} has dtype {t.dtype}; expected float32, bfloat16 or float16")
    if weight.dim() != 2:
        fail(where, f"weight must be 2-D (out, in), got shape {shape_str(weight)}")
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        fail(where, f"x has shape {shape_str(x)}; expected (..., {in_f}) to match weight {shape_str(weight)}")
    # Under autocast the op casts x, weight and bias to the autocast dtype first (function.py).
    cast = autocast_dtype(x.device.type)
    if autocast_cast_dtype(x, cast) != autocast_cast_dtype(weight, cast):
        fail(where, f"x is {x.dtype} but weight is {weight.dtype}; expected the same dtype")
    if weight.requires_grad:
        fail(where, "weight requires grad, but the frozen weight gets no gradient here; "
                    "call weight.requires_grad_(False) (only the delta parameters train)")
    if bias is not None:
        if bias.shape != (out_f,):
            fail(where, f"bias has shape {shape_str(bias)}; expected ({out_f},)")
        if autocast_cast_dtype(bias, cast) != autocast_cast_dtype(weight, cast):
            fail(where, f"bias is {bias.dtype} but weight is {weight.dtype}; expected the same dtype")
    return out_f, in_f


def check_param(where: str, arg: str, t, expected_shape: tuple | None = None, dim: int | None = None):
    if not isinstance(t, torch.Tensor):
        fail(where, f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        fail(where, f"{arg} has dtype {t.dtype}; expected a floating dtype")
    if dim is not None and t.dim() != dim:
        fail(where, f"{arg} must be {dim}-D, got shape {shape_str(t)}")
    if expected_shape is not None and tuple(t.shape) != tuple(expected_shape):
        fail(where, f"{arg} has shape {shape_str(t)}; expected {tuple(expected_shape)}")
    if t.dim() > 0 and 0 in t.shape:
        fail(where, f"{arg} has an empty dimension, shape {shape_str(t)} (rank 0 is not allowed)")


def check_same_device(where: str, **tensors) -> torch.device:
    check_unsharded(where, **tensors)
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    first = next(iter(devices.values()))
    for k, d in devices.items():
        if d != first:
            listing = ", ".join(f"{a} on {b}" for a, b in devices.items())
            fail(where, f"all tensors must be on one device; got {listing}")
    return first


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_unsharded(where: str, **tensors) -> None:
    """No argument may be a DTensor (a parameter FSDP2 keeps sharded): the ops compute on whole
    local tensors and would compute on a shard. FSDP2 unshards a module's parameters only around
    that module's own forward, and pypeft_fast reads ``base_layer`` / ``lora_A`` / ``lora_B``
    weights without calling those modules. Checked only for tensor subclasses (no cost else)."""
    for arg, t in tensors.items():
        if (isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter)
                and is_dtensor(t)):
            fail(where, f"{arg} is a DTensor (placements {tuple(t.placements)}, local shard "
                        f"{shape_str(t.to_local())} of {shape_str(t)}); pypeft_fast never computes on a "
                        "shard. Apply FSDP2's fully_shard to a module that contains the whole adapted "
                        "layer (the decoder layer, or the adapted layer itself) so its parameters are "
                        "unsharded in forward — not to base_layer, lora_A or lora_B alone")


def _real_number(scaling) -> float | None:
    """``scaling`` as a float when it is a real number (int/float/numpy scalar, not bool, or a
    0-d real tensor without grad), else None."""
    if isinstance(scaling, torch.Tensor):
        if (scaling.dim() != 0 or scaling.requires_grad or scaling.is_complex()
                or scaling.dtype == torch.bool):
            return None
        return float(scaling.item())
    if isinstance(scaling, numbers.Real) and not isinstance(scaling, bool):
        return float(scaling)
    return None


def check_scaling(where: str, scaling) -> float:
    """A finite real number — a Python/numpy number or a 0-d real tensor (peft may pass one);
    anything else (NaN, ±Inf, a string, a bool, a complex, a tensor with grad) is refused."""
    value = _real_number(scaling)
    if value is None or not math.isfinite(value):
        fail(where, f"scaling must be a finite real number (a Python number or a 0-d real tensor "
                    f"without grad), got {scaling!r}")
    return value


def check_dropout(where: str, dropout) -> float:
    """A probability p in [0, 1) given as a Python/numpy number (not a string, bool or tensor)."""
    ok = isinstance(dropout, numbers.Real) and not isinstance(dropout, bool)
    if not ok or not (0.0 <= float(dropout) < 1.0):
        fail(where, f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def check_seed(where: str, seed) -> torch.Tensor:
    """The dropout seed as a fresh 0-d int64 CPU tensor: an int in [-2⁶³, 2⁶³) or a 0-d int64
    tensor, copied (never aliased: the caller may reuse its tensor before backward); None draws
    one from torch's default generator."""
    from .philox import draw_seed
    if seed is None:
        return draw_seed()
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not -(2**63) <= int(seed) < 2**63:
            fail(where, f"seed {int(seed)} does not fit in int64 [-2**63, 2**63)")
        return torch.tensor(int(seed), dtype=torch.int64)
    if isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.dim() == 0:
        return seed.detach().to("cpu", copy=True)
    fail(where, f"seed must be an int or a 0-d int64 tensor, got {seed!r}")


def compute_dtype(x: torch.Tensor, *params: torch.Tensor) -> torch.dtype:
    """The delta branch accumulates in float32 (float64 when any input is float64)."""
    dt = torch.float32
    for t in (x, *params):
        dt = torch.promote_types(dt, t.dtype)
    return dt
