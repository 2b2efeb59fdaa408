"""The Triton backend: registers the kernels of ``kernels/`` (the subpackage
``pypeft_fast.kernels``) for the four families, and its availability probe.

Usable on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported (the kernels are decorated in interpreter mode then; CI proves them that way).
Importing this module never initialises CUDA. Without triton its import fails with
ModuleNotFoundError, which ``pypeft_fast.backends`` records (``python -m pypeft_fast info``) and
logs; nothing is registered, the torch path keeps working and ``backend="triton"`` raises.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from . import registry
from .families.lowrank_dora import TorchDoRA, _magnitude_grad


def _import_kernels():
    """``pypeft_fast.kernels`` when installed (wheel or editable); from a source checkout that
    was not installed (``kernels/`` beside ``pypeft_fast/``), the same package loaded by path."""
    try:
        return importlib.import_module("pypeft_fast.kernels")
    except ModuleNotFoundError as e:
        if e.name != "pypeft_fast.kernels":
            raise
    root = Path(__file__).resolve().parent.parent / "kernels"
    if not (root / "__init__.py").is_file():
        raise ModuleNotFoundError("pypeft_fast.kernels is not installed and no kernels/ folder "
                                  f"sits at {root}", name="pypeft_fast.kernels")
    spec = importlib.util.spec_from_file_location(
        "pypeft_fast.kernels", root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["pypeft_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["pypeft_fast.kernels"]
        raise
    return module


import triton  # noqa: E402,F401  (missing: backends.py records and logs why; torch path unaffected)

_import_kernels()
from pypeft_fast.kernels import kronecker as _kronecker  # noqa: E402,F401
from pypeft_fast.kernels import lowrank as _lowrank  # noqa: E402,F401
from pypeft_fast.kernels import sparse as _sparse  # noqa: E402,F401
from pypeft_fast.kernels._utils import interpreting  # noqa: E402

# Kernels are decorated for the interpreter or for the GPU when they are defined.
_INTERPRET_AT_IMPORT = interpreting()


def probe(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" and _INTERPRET_AT_IMPORT:
            return None
        return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                "before anything imports triton")
    return f"no Triton kernels for device type {device.type!r}"


def _seed(aux, hp, device):
    return aux[0].to(device, non_blocking=True) if hp.dropout > 0.0 else None


def _none_if_empty(t: torch.Tensor, wanted: bool):
    return t if wanted else None


class TritonLowRank:
    """``pypeft_fast::lowrank_fwd`` / ``lowrank_bwd`` (kernels/lowrank.py)."""

    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        A, B = params
        y, u = torch.ops.pypeft_fast.lowrank_fwd(x2d, weight, bias, A, B,
                                                 _seed(aux, hp, x2d.device), hp.scaling, hp.dropout)
        return y, (u,)

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        A, B = params
        (u,) = extras
        need_dA, need_dB = bool(needs_dparams[0]), bool(needs_dparams[1])
        dx, dA, dB = torch.ops.pypeft_fast.lowrank_bwd(
            gy2d, x2d, weight, A, B, u, _seed(aux, hp, x2d.device), hp.scaling, hp.dropout,
            bool(needs_dx), need_dA, need_dB)
        return _none_if_empty(dx, needs_dx), (_none_if_empty(dA, need_dA),
                                              _none_if_empty(dB, need_dB))


class TritonDoRA(TorchDoRA):
    """DoRA at dropout 0 (``families/lowrank_dora.py``): the forward is ``lowrank_fwd`` with
    c = m / ‖W + s·B·A‖ in its epilogue (``col_scale``; the shift b + c·s·b_B as its bias), the
    backward ``lowrank_bwd`` on c ⊙ gy (dx = (c⊙gy)·W + s·(c⊙gy)·B·A, dA, dB = s·(c⊙gy)ᵀ·u
    in its one kernel); the row norm's W·Aᵀ and dm's column sums are torch ops. Dropout > 0
    (peft's base(drop(x)) terms) is declined (``supports``): auto runs the torch kernels."""

    @staticmethod
    def supports(x, weight, params, aux, hp) -> str | None:
        """Declines DoRA with dropout > 0."""
        if hp.dropout > 0.0:
            return "dora with dropout > 0: peft's base(drop(x)) terms have no Triton path"
        return None

    @classmethod
    def scaled_linear(cls, x2d, weight, A, B, s, c, shift):
        return torch.ops.pypeft_fast.lowrank_fwd(x2d, weight, shift, A, B, None, s, 0.0, c)

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        u, norm, *kept = extras
        if hp.dropout > 0.0 or len(kept) != 3:  # not a p = 0 "output" forward
            return TorchDoRA.backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx,
                                      needs_dparams)
        A, B, m = params[:3]
        b_B = params[3] if len(params) > 3 else None
        cd = u.dtype
        s = hp.scaling
        mc = m.to(cd)
        c = mc / norm
        g, colsum, coldot = cls.grad_prologue(gy2d, c, kept[1])
        need_dA, need_dB, need_dm = (bool(v) for v in needs_dparams[:3])
        dx, dA, dB = torch.ops.pypeft_fast.lowrank_bwd(
            g.to(gy2d.dtype), x2d, weight, A.to(cd), B.to(cd), u, None, s, 0.0, bool(needs_dx),
            need_dA, need_dB)
        dm = dbB = None
        if need_dm:
            dm = _magnitude_grad(gy2d.to(cd), x2d, None, u, B.to(cd), s, b_B, mc, norm, None, kept,
                                 cd, colsum, coldot).to(m.dtype)
        if b_B is not None and needs_dparams[3]:
            dbB = (colsum * c * s).to(b_B.dtype)
        grads = (dA.to(A.dtype) if need_dA else None, dB.to(B.dtype) if need_dB else None, dm)
        return _none_if_empty(dx, needs_dx), grads + ((dbB,) if b_B is not None else ())


class TritonLowRankVariants(TritonLowRank):
    """The lowrank family on Triton: LoRA (``TritonLowRank``) and DoRA at dropout 0; parallel
    adapters (activation, gate) are declined."""

    @staticmethod
    def supports(x, weight, params, aux, hp) -> str | None:
        """Declines parallel adapters (activation/gate) and DoRA with dropout > 0."""
        if hp.variant == "adapter":
            return "adapter (activation/gate): the Triton low-rank kernels have no parallel-adapter path"
        if hp.variant == "dora":
            return TritonDoRA.supports(x, weight, params, aux, hp)
        return None

    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        if hp.magnitude:
            return TritonDoRA.forward(x2d, weight, bias, params, aux, hp)
        return TritonLowRank.forward(x2d, weight, bias, params, aux, hp)

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        if hp.magnitude:
            return TritonDoRA.backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx,
                                       needs_dparams)
        return TritonLowRank.backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx,
                                      needs_dparams)


class TritonKronecker:
    """``pypeft_fast::kronecker_fwd`` / ``kronecker_bwd`` (kernels/kronecker.py), for both the
    kronecker (h = 1) and phm families; params A (h, a_out, a_in), B (h, b_out, b_in)."""

    @staticmethod
    def supports(x, weight, params, aux, hp) -> str | None:
        """Declines B as rank-k factors (S, T)."""
        if len(params) == 3:
            return "B as rank-k factors (S, T): the Triton kernels take a dense B"
        return None

    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        A, B = params
        return torch.ops.pypeft_fast.kronecker_fwd(x2d, weight, bias, A, B, hp.scaling), ()

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        A, B = params
        need_dA, need_dB = bool(needs_dparams[0]), bool(needs_dparams[1])
        dx, dA, dB = torch.ops.pypeft_fast.kronecker_bwd(gy2d, x2d, weight, A, B, hp.scaling,
                                                       bool(needs_dx), need_dA, need_dB)
        return _none_if_empty(dx, needs_dx), (_none_if_empty(dA, need_dA),
                                              _none_if_empty(dB, need_dB))


class TritonSparse:
    """``pypeft_fast::sparse_fwd`` / ``sparse_bwd`` (kernels/sparse.py); aux is the mask's
    SparseLayout tensors (csr_perm, row_ptr, csr_col, csc_perm, col_ptr, csc_row)."""

    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        (values,) = params
        csr_perm, row_ptr, csr_col = aux[:3]
        y = torch.ops.pypeft_fast.sparse_fwd(x2d, weight, bias, values, csr_perm, row_ptr,
                                             csr_col, hp.scaling)
        return y, ()

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        (values,) = params
        need_dv = bool(needs_dparams[0])
        dx, dv = torch.ops.pypeft_fast.sparse_bwd(gy2d, x2d, weight, values, *aux, hp.scaling,
                                                  bool(needs_dx), need_dv)
        return _none_if_empty(dx, needs_dx), (_none_if_empty(dv, need_dv),)


registry.register_kernels("lowrank", "triton", TritonLowRankVariants, auto=True)
registry.register_kernels("sparse", "triton", TritonSparse, auto=True)
# Not auto (yet): no GPU has timed them, and the roofline in bench/NOTES.md predicts 2.1–4.0×
# (kronecker) and 4.5–11× (phm) the frozen GEMM — cuBLAS batched GEMMs on the torch path are
# expected to be no slower. `backend="triton"` runs them; a GPU run of scripts/gpu_check.sh decides.
registry.register_kernels("kronecker", "triton", TritonKronecker, auto=False)
registry.register_kernels("phm", "triton", TritonKronecker, auto=False)
registry.register_availability("triton", probe)
