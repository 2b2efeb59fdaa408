"""DoRA on the low-rank family (``lowrank_linear(..., magnitude=m)``, peft ``use_dora=True``).

peft 0.21.2's semantics (``peft/tuners/lora/dora.py``, ``variants.py``), with c = m / ‖V‖ per
output row, ‖V‖ᵢ = ‖Wᵢ + s·(B·A)ᵢ + s·b_Bᵢ·1‖ (peft builds its ``lora_weight`` as
``lora_B(lora_A(I))ᵀ``, so a ``lora_bias`` b_B enters the norm broadcast over the row) and the
norm treated as a constant (detached: no gradient flows through it)::

    p = 0:  y = c ⊙ (x·Wᵀ + s·u·Bᵀ + s·b_B) + b,                 u = x·Aᵀ
    p > 0:  y = x·Wᵀ + b + (c-1) ⊙ (x̃·Wᵀ) + c ⊙ s·(u·Bᵀ + b_B),   u = x̃·Aᵀ, x̃ = drop(x)

(p > 0 is peft's "base layer applied to dropout(x)": one more frozen-size GEMM forward and one
backward.) The norm never forms W + s·B·A:

    ‖V‖ᵢ² = ‖Wᵢ‖² + 2s·Bᵢ·(W·Aᵀ)ᵢᵀ + s²·Bᵢ·(A·Aᵀ)·Bᵢᵀ
            + 2s·b_Bᵢ·ΣWᵢ + 2s²·b_Bᵢ·Bᵢ·(A·1) + s²·in·b_Bᵢ²

‖Wᵢ‖² and ΣWᵢ are cached per frozen weight (its identity, view geometry and ``_version``);
W·Aᵀ (out × r) is one pass over W, r·in·out multiply-adds (the frozen GEMM's n·in·out, r/n of it).
The norm reads W as the caller passed it (:func:`norm_weight`): under autocast the float32
Parameter (peft's norm for a float32 x), while the frozen GEMMs take autocast's bf16 cast — a
new tensor every step, which missed the cache and was converted back to float32 for W·Aᵀ.

Backward, with z = x·Wᵀ + s·u·Bᵀ + s·b_B (p = 0; x̃·Wᵀ in place of x·Wᵀ for p > 0),
g = c ⊙ gy, P = gyᵀ·u (out × r), t = s·g·B (n × r)::

    dx  = g·W + t·A                            (p = 0)
    dx  = gy·W + drop'(((c-1) ⊙ gy)·W + t·A)   (p > 0: the second frozen-size GEMM)
    dA  = tᵀ·x̃,   dB = s·c ⊙ P,   db_B = s·Σᵢ gᵢ
    dm  = Σᵢ gyᵢ ⊙ zᵢ / ‖V‖

The magnitude gradient needs Σᵢ gy ⊙ (x·Wᵀ), which costs either n × out saved or one more
frozen-size GEMM in backward (bench/NOTES.md "DoRA", measured side by side). Default
(``dm_source``):

* p = 0 — ``"output"``: the op's own output y is saved (the same storage the caller gets, no
  copy) and dm = (Σᵢ gyᵢ ⊙ yᵢ − b·Σᵢ gyᵢ) / m, since y − b = c ⊙ z and c·‖V‖ = m. (A magnitude
  entry exactly 0 would make this 0/0: those entries are recomputed from x·W_jᵀ.)
* p > 0 — ``"saved"``: x̃·Wᵀ, which peft's math computes in forward anyway, is kept (n × out):
  2 frozen GEMMs over LoRA's, as peft, instead of 3. (The cpp backend on CPU — auto's choice —
  runs ``native.NativeDoRA``'s dropped-set identity instead: no second frozen GEMM, the output
  kept as at p = 0.)

``PYPEFT_FAST_DORA_DM=recompute`` recomputes x·Wᵀ / x̃·Wᵀ in backward instead (nothing n × out
kept, one more frozen GEMM); ``=saved`` makes the cpp backend run the torch kernels' "saved"
source at p > 0; ``=sparse`` is the cpp default. Results agree to rounding.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from ..philox import apply_keep, dropout_rows, keep_rows
from ..validate import compute_dtype
from ._accumulate import gemm_into, rank_nt_mm, rank_t_mm

ROWS_PER_CHUNK_ELEMENTS = 1 << 20
"""W is read in blocks of rows of at most this many elements (a low-precision W is converted to
the accumulation dtype a block at a time: the transient stays far below W's size)."""

_ROW_STATS: dict[int, tuple] = {}


def _row_blocks(weight: torch.Tensor):
    out_f, in_f = weight.shape
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(in_f, 1))
    for j0 in range(0, out_f, step):
        yield j0, min(out_f, j0 + step)


def weight_row_stats(weight: torch.Tensor, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖Wᵢ‖², ΣWᵢ) per output row in ``cd``, cached per weight version.

    The key is the tensor that owns the storage (a Conv1D's ``W.t()`` view is made afresh on
    every call; its ``_base`` is the Parameter), the view's geometry and the shared version
    counter, so an in-place update of W (``merge``, ``load_state_dict``) recomputes them.
    Under ``torch.compile`` they are computed in the graph, uncached: the key's
    ``storage_offset``/``_version``/weakref are Python-side state dynamo cannot trace (a graph
    break per DoRA layer call)."""
    if torch.compiler.is_compiling():
        return _row_stats(weight, cd)
    anchor = weight if weight._base is None else weight._base
    key = id(anchor)
    geometry = (tuple(weight.shape), tuple(weight.stride()), weight.storage_offset(), cd,
                weight.device)
    hit = _ROW_STATS.get(key)
    if hit is not None:
        ref, geo, version, stats = hit
        if ref() is anchor and geo == geometry and version == weight._version:
            return stats
    stats = _row_stats(weight, cd)
    _ROW_STATS[key] = (weakref.ref(anchor, lambda _r, k=key: _ROW_STATS.pop(k, None)), geometry,
                       weight._version, stats)
    return stats


def _row_stats(weight: torch.Tensor, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖Wᵢ‖², ΣWᵢ) per output row in ``cd``, W converted a block of rows at a time."""
    sq = torch.empty(weight.shape[0], dtype=cd, device=weight.device)
    rs = torch.empty_like(sq)
    for j0, j1 in _row_blocks(weight):
        wc = weight[j0:j1].to(cd)
        torch.linalg.vector_norm(wc, dim=1, out=sq[j0:j1]).square_()
        torch.sum(wc, dim=1, out=rs[j0:j1])
    return sq, rs


def w_times_at(weight: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """W·Aᵀ (out × r) in A's dtype: one pass over W, by row blocks when W must be converted.
    (The same numbers as (A·Wᵀ)ᵀ; W on the left runs 1.4–2× faster through the CPU BLAS, whose
    skinny-GEMM kernels stream the big operand as the row-major left factor: bench/NOTES.md.)"""
    if weight.dtype == A.dtype:
        return weight @ A.t()
    out = torch.empty(weight.shape[0], A.shape[0], dtype=A.dtype, device=A.device)
    for j0, j1 in _row_blocks(weight):
        torch.mm(weight[j0:j1].to(A.dtype), A.t(), out=out[j0:j1])
    return out


_SUM_DTYPE = {torch.float32: torch.float64, torch.float16: torch.float32, torch.bfloat16: torch.float32}
"""The dtype the norm's row sums are combined in, per compute dtype: one step wider. c = m/‖V‖
scales every output of the row coherently, so its rounding does not average out downstream: with
the terms combined in float32, a 2-layer model's gradients after a DoRA p = 0.3 step were 2.5×
peft's error against float64 (median over tensors; ‖V‖ 1.2e-7 relative error vs peft's 7e-8);
combined in float64, 0.96-0.98× (bench/NOTES.md "DoRA's norm in float64")."""


def weight_row_norms(weight: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """‖Wᵢ‖ per output row in ``cd``, exactly as :func:`factored_norm` forms it for B = 0 (DoRA's
    initial magnitude: c = 1 at the start)."""
    sq, _ = weight_row_stats(weight, _SUM_DTYPE.get(cd, cd))
    return sq.sqrt().to(cd)


def norm_weight(weight, aux, hp) -> torch.Tensor:
    """The frozen weight DoRA's norm reads: W as the caller gave it. Under autocast
    ``lowrank_linear`` passes it last in aux (the float32 Parameter, where the kernels'
    ``weight`` is its bf16 cast); otherwise it is ``weight`` itself (not passed twice: dynamo
    cannot trace an autograd.Function given one tensor as two inputs)."""
    return aux[-1] if len(aux) > (hp.dropout > 0.0) else weight


def factored_norm(weight, A, B, scaling, b_B, cd) -> torch.Tensor:
    """‖W + s·B·A (+ s·b_B·1ᵀ)‖ per output row (out,), in ``cd``, from factor-sized products
    and one pass over W (module docstring); A, B, b_B already in ``cd``."""
    s = scaling
    sd = _SUM_DTYPE.get(cd, cd)
    sq, rs = weight_row_stats(weight, sd)
    wa = w_times_at(weight, A)                        # (out, r)
    ba = B @ (A @ A.t())                              # (out, r)
    Bs = B.to(sd)
    n2 = sq + (2 * s) * (Bs * wa.to(sd)).sum(1) + (s * s) * (ba.to(sd) * Bs).sum(1)
    if b_B is not None:
        bBs = b_B.to(sd)
        n2 = n2 + (2 * s) * bBs * rs + (2 * s * s) * bBs * (B @ A.sum(1)).to(sd) \
            + (s * s * weight.shape[1]) * bBs * bBs
    return n2.clamp_min_(0).sqrt_().to(cd)


def dm_source(p: float) -> str:
    forced = os.environ.get("PYPEFT_FAST_DORA_DM")
    if forced in ("recompute", "saved", "sparse"):
        forced = "recompute" if forced == "sparse" else forced  # sparse: native.NativeDoRA only
        return forced if p > 0 else ("recompute" if forced == "recompute" else "output")
    return "output" if p == 0 else "saved"


def _scaled_epilogue(xw, u, B, s, c, shift):
    """c ⊙ (xw + s·u·Bᵀ) + shift, summed in u's dtype and rounded once to xw's dtype."""
    acc = xw.addmm_(u, B.t(), alpha=s) if xw.dtype == u.dtype else torch.addmm(xw.to(u.dtype), u, B.t(), alpha=s)
    acc.mul_(c)
    if shift is not None:
        acc.add_(shift)
    return acc.to(xw.dtype)


class TorchDoRA:
    """The pure-PyTorch DoRA kernels (module docstring). params = (A, B, m[, b_B]).

    A backend reuses them with its own dropout mask ops (``dropped``, ``keep``, ``masked``,
    ``dropped_t_x``: the same Philox mask) and token sums (``t_mm``) by subclassing."""

    t_mm = staticmethod(rank_t_mm)  # aᵀ·b over tokens: dA = tᵀ·x, (gyᵀ·u)ᵀ
    nt_mm = staticmethod(rank_nt_mm)  # a·bᵀ against a factor: u = x·Aᵀ, t = s·(c ⊙ gy)·B

    @staticmethod
    def operand(t, cd):
        """x or gy as the rank products take it: in the accumulation dtype ``cd`` (a backend whose
        products read a narrower activation dtype returns it as it is)."""
        return t.to(cd)

    @staticmethod
    def supports(x, weight, params, aux, hp) -> str | None:
        return None

    @staticmethod
    def dropped(x2d, seed, p):
        return dropout_rows(x2d, seed, p)

    @staticmethod
    def keep(seed, n, k, p, device):
        return keep_rows(seed, n, k, p, device=device)

    @classmethod
    def scaled_linear(cls, x2d, weight, A, B, s, c, shift):
        """(y = c ⊙ (x·Wᵀ + s·u·Bᵀ) + shift, u = x·Aᵀ): DoRA's p = 0 forward."""
        u = cls.nt_mm(cls.operand(x2d, A.dtype), A)
        return cls.scaled_epilogue(F.linear(x2d, weight), u, B, s, c, shift), u

    @staticmethod
    def scaled_epilogue(xw, u, B, s, c, shift):
        """c ⊙ (xw + s·u·Bᵀ) + shift, summed in u's dtype and rounded once to xw's dtype."""
        return _scaled_epilogue(xw, u, B, s, c, shift)

    @staticmethod
    def grad_prologue(gy2d, c, y):
        """(g = c ⊙ gy, Σᵢ gyᵢ, Σᵢ gyᵢ ⊙ yᵢ or None) in c's dtype."""
        gyc = gy2d.to(c.dtype)
        return gyc * c, gyc.sum(0), None if y is None else (gyc * y.to(c.dtype)).sum(0)

    @staticmethod
    def scale(x2d, weight, params, aux, hp):
        """(cd, A, B, b_B in cd, ‖V‖, c = m / ‖V‖): what every forward source starts from; the
        norm from :func:`norm_weight`."""
        A, B, m = params[:3]
        b_B = params[3] if len(params) > 3 else None
        cd = compute_dtype(x2d, A, B, m)
        Ac, Bc = A.to(cd), B.to(cd)
        bBc = None if b_B is None else b_B.to(cd)
        norm = factored_norm(norm_weight(weight, aux, hp), Ac, Bc, hp.scaling, bBc, cd)
        return cd, Ac, Bc, bBc, norm, m.to(cd) / norm

    @classmethod
    def forward(cls, x2d, weight, bias, params, aux, hp, scaled=None):
        """``scaled``: :meth:`scale`'s result when the caller (a subclass) has it already."""
        cd, Ac, Bc, bBc, norm, c = scaled or cls.scale(x2d, weight, params, aux, hp)
        s = hp.scaling
        src = dm_source(hp.dropout)
        if hp.dropout == 0.0:
            shift = None if bias is None else bias.to(cd)
            if bBc is not None:
                shift = c * (s * bBc) if shift is None else shift + c * (s * bBc)
            y, u = cls.scaled_linear(x2d, weight, Ac, Bc, s, c, shift)
            if src == "output":
                return y, (u, norm, weight, y, None if bias is None else bias.to(cd))
            return y, (u, norm, weight)
        xd = cls.dropped(x2d, aux[0], hp.dropout)         # transient, never saved
        u = xd.to(cd) @ Ac.t()
        v = F.linear(xd, weight)                          # peft's base_layer(dropout(x)), no bias
        del xd
        # y = x·Wᵀ + b + (c−1) ⊙ v + u·(s·c ⊙ B)ᵀ + s·c ⊙ b_B: the delta first (the small GEMM
        # writes y once, b and s·c·b_B as its bias), v added once, then the frozen GEMM x·Wᵀ
        # accumulates into it (``gemm_into``): no separate pass adds the frozen result.
        shift = None if bias is None else bias.to(cd)
        if bBc is not None:
            shift = c * (s * bBc) if shift is None else shift + c * (s * bBc)
        cB = Bc * (c * s).unsqueeze(1)
        y = u @ cB.t() if shift is None else torch.addmm(shift, u, cB.t())
        y.addcmul_(v if v.dtype == cd else v.to(cd), c - 1)
        y = gemm_into(y, x2d, weight.t()).to(x2d.dtype)
        if src == "saved":
            return y, (u, norm, weight, v)
        return y, (u, norm, weight)

    @classmethod
    def dropped_t_x(cls, t, x2d, A, seed, p):
        """tᵀ·drop(x) (r, in) in t's dtype (A: (r, in) in t's dtype, for the native op's checks),
        drop(x) a transient."""
        return t.t() @ cls.dropped(x2d, seed, p).to(t.dtype)

    @classmethod
    def masked(cls, h, seed, p):
        """drop'(h) = h ⊙ keep / (1−p) for an (n, in) h: the forward's mask over x's index."""
        return apply_keep(h, cls.keep(seed, *h.shape, p, h.device), p, inplace=True)

    @classmethod
    def backward(cls, gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        """The module docstring's backward. Each frozen-size GEMM accumulates into the small
        product it is added to (``gemm_into``): dx = t·A first, then (c ⊙ gy)·W into it; at
        p > 0 h = t·A + ((c−1) ⊙ gy)·W, drop'(h), then gy·W into it."""
        A, B, m = params[:3]
        b_B = params[3] if len(params) > 3 else None
        u, norm, *kept = extras
        cd = compute_dtype(x2d, A, B, m)
        s, p = hp.scaling, hp.dropout
        Ac, Bc, mc = A.to(cd), B.to(cd), m.to(cd)
        c = mc / norm
        need_dA, need_dB, need_dm = needs_dparams[:3]
        need_dbB = b_B is not None and needs_dparams[3]
        seed = aux[0] if p else None
        # g = c ⊙ gy (p = 0) or (c − 1) ⊙ gy (p > 0): (n, out), with Σᵢ gyᵢ and Σᵢ gyᵢ ⊙ (the
        # kept y (p = 0) or x̃·Wᵀ (p > 0, "saved")) from the same read of gy.
        dm_rows = kept[1] if (need_dm and len(kept) in (2, 3)) else None
        g, colsum, coldot = cls.grad_prologue(gy2d, c if p == 0 else c - 1, dm_rows)
        gyc = cls.operand(gy2d, cd)
        dx = dA = dB = dm = dbB = None
        t = None
        if needs_dx or need_dA:
            t = cls.nt_mm(gyc, (Bc * (c * s).unsqueeze(1)).t())  # s·(c ⊙ gy)·B: (n, r)
        if needs_dx:
            h = gemm_into(t @ Ac, g, weight)               # (n, in) in cd
            if p:
                h = gemm_into(cls.masked(h, seed, p), gy2d, weight)
            dx = h.to(gy2d.dtype)
        if need_dA:
            dA = (cls.t_mm(t, cls.operand(x2d, cd)) if p == 0 else cls.dropped_t_x(t, x2d, Ac, seed, p)).to(A.dtype)
        P = cls.t_mm(u, gyc).t() if (need_dB or (need_dm and len(kept) != 3)) else None  # (out, r)
        if need_dB:
            dB = (P * (c * s).unsqueeze(1)).contiguous().to(B.dtype)
        if need_dbB:
            dbB = (colsum * c * s).to(b_B.dtype)
        if need_dm:
            xd = cls.dropped(x2d, seed, p) if (p and len(kept) == 1) else None  # "recompute"
            dm = _magnitude_grad(gyc, x2d, xd, u, Bc, s, b_B, mc, norm, P, kept, cd, colsum,
                                 coldot)
            dm = dm.to(m.dtype)
        grads = (dA, dB, dm) + ((dbB,) if b_B is not None else ())
        return dx, grads


def _recomputed_z(x2d, w_rows, u, B_rows, s, bB_rows, cd):
    """z = x·Wⱼᵀ + s·(u·Bⱼᵀ + b_Bⱼ) for the output rows j given (in ``cd``)."""
    z = F.linear(x2d, w_rows).to(cd) + s * (u @ B_rows.t())
    return z if bB_rows is None else z + s * bB_rows.to(cd)


def _zero_magnitude_grad(dm, zero, gyc, x2d, weight, u, Bc, s, b_B, norm, cd):
    """dm with the entries where m = 0 (there y − b = 0 carries no z) from a recomputed z, every
    row (the traced form of the branch below: shapes static)."""
    z = _recomputed_z(x2d, weight, u, Bc, s, b_B, cd)
    return torch.where(zero, (gyc * z).sum(0) / norm, dm)


def _magnitude_grad(gyc, x2d, xd, u, Bc, s, b_B, mc, norm, P, kept, cd, colsum, coldot):
    """dm = Σᵢ gyᵢ ⊙ zᵢ / ‖V‖ (module docstring), z from what forward kept: (W, y, b) — the
    output —, (W, x̃·Wᵀ) or (W,) to recompute; ``colsum``/``coldot`` are the prologue's Σᵢ gyᵢ and
    Σᵢ gyᵢ ⊙ (the kept y or x̃·Wᵀ). ``xd``: drop(x) in x's dtype when recomputing at p > 0, else
    None."""
    weight = kept[0]
    if len(kept) == 3:                                     # the saved output y (and b), p = 0
        b = kept[2]
        acc = coldot.clone()                               # Σᵢ gyᵢ ⊙ yᵢ
        if b is not None:
            acc.sub_(colsum * b)
        dm = acc / mc
        zero = mc == 0
        if torch.compiler.is_compiling():                  # no data-dependent branch in a graph
            return torch.cond(zero.any(), _zero_magnitude_grad, lambda *a: a[0].clone(),
                              (dm, zero, gyc, x2d, weight, u, Bc, s, b_B, norm, cd))
        if bool(zero.any()):                               # y − b = 0 there: z from x·W_jᵀ
            j = zero.nonzero().squeeze(1)
            zj = _recomputed_z(x2d, weight[j], u, Bc[j], s, None if b_B is None else b_B[j], cd)
            dm[j] = (gyc[:, j] * zj).sum(0) / norm[j]
        return dm
    if len(kept) == 2:                                     # the saved x̃·Wᵀ (p > 0, "saved")
        acc = coldot                                       # Σᵢ gyᵢ ⊙ (x̃·Wᵀ)ᵢ, from the prologue
    else:                                                  # recompute x·Wᵀ or x̃·Wᵀ
        acc = (gyc * F.linear(x2d if xd is None else xd, weight).to(cd)).sum(0)
    acc = acc + s * (P * Bc).sum(1)
    if b_B is not None:
        acc.add_(colsum * (s * b_B.to(cd)))
    return acc / norm
