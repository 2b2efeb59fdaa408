"""Factors given either as one tensor or as a low-rank pair ``(L, R)`` meaning ``L @ R``.

A pair's product is factor-sized (never ΔW-sized), so it is formed with plain autograd and the
fused op sees a dense factor; gradients reach L and R through that product.
"""
from __future__ import annotations

import torch

from ..function import without_autocast
from ..validate import check_param, fail, shape_str


def check_factor(where: str, arg: str, f, batched: bool = False):
    """Checks ``f`` (a tensor, or a pair whose inner dimensions agree); returns it with a pair
    as a tuple. ``factor_shape`` gives the shape it stands for."""
    dim = 3 if batched else 2
    if isinstance(f, (tuple, list)):
        if len(f) != 2:
            fail(where, f"{arg} must be a tensor or a pair (L, R), got a sequence of {len(f)}")
        L, R = f
        check_param(where, f"{arg}[0]", L, dim=dim)
        check_param(where, f"{arg}[1]", R, dim=dim)
        if L.shape[-1] != R.shape[-2] or (batched and L.shape[0] != R.shape[0]):
            fail(where, f"{arg} = L @ R needs L (..., m, k) and R (..., k, n) with matching k"
                        f"{' and batch' if batched else ''}; got L {shape_str(L)}, R {shape_str(R)}")
        return (L, R)
    check_param(where, arg, f, dim=dim)
    return f


def factor_shape(f) -> tuple:
    if isinstance(f, tuple):
        return (*f[0].shape[:-1], f[1].shape[-1])
    return tuple(f.shape)


def compose_factor(where: str, arg: str, f, batched: bool = False) -> torch.Tensor:
    """``f`` or ``L @ R`` for a pair (factor-sized), after checking it."""
    f = check_factor(where, arg, f, batched)
    return factor_product(*f) if isinstance(f, tuple) else f


def factor_product(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``L @ R`` in the factors' own dtype, autocast or not: the adapter stays float32 under
    autocast (function.py), so no bf16 copies of L and R are made and kept for backward."""
    return without_autocast(L.device.type, torch.matmul, L, R)


def factor_tensors(f) -> tuple:
    """The leaf tensors of a factor given as a tensor or a pair (for device checks)."""
    return tuple(f) if isinstance(f, (tuple, list)) else (f,)
