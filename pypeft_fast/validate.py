"""Input checks shared by every family, run at the public boundary.

Every message names the layer (``name=`` from a patched/injected module, else the function),
the argument, the shape or dtype received and what was expected.
"""
from __future__ import annotations

import torch

from .function import autocast_cast, autocast_dtype

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
    if autocast_cast(x, cast).dtype != autocast_cast(weight, cast).dtype:
        fail(where, f"x is {x.dtype} but weight is {weight.dtype}; expected the same dtype")
    if weight.requires_grad:
        fail(where, "weight requires grad, but the frozen weight gets no gradient here; "
                    "call weight.requires_grad_(False) (only the delta parameters train)")
    if bias is not None:
        if bias.shape != (out_f,):
            fail(where, f"bias has shape {shape_str(bias)}; expected ({out_f},)")
        if autocast_cast(bias, cast).dtype != autocast_cast(weight, cast).dtype:
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
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    first = next(iter(devices.values()))
    for k, d in devices.items():
        if d != first:
            listing = ", ".join(f"{a} on {b}" for a, b in devices.items())
            fail(where, f"all tensors must be on one device; got {listing}")
    return first


def check_scaling(where: str, scaling) -> float:
    if isinstance(scaling, torch.Tensor):
        fail(where, "scaling must be a Python number, not a tensor")
    return float(scaling)


def compute_dtype(x: torch.Tensor, *params: torch.Tensor) -> torch.dtype:
    """The delta branch accumulates in float32 (float64 when any input is float64)."""
    dt = torch.float32
    for t in (x, *params):
        dt = torch.promote_types(dt, t.dtype)
    return dt
