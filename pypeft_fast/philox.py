"""Counter-based dropout masks: the same bits from a seed on every backend, rebuilt in backward.

The mask of an ``(n, in)`` input is defined element by element, so a kernel on any device (the
torch path here, ``csrc/philox/philox.h``, ``tl.randint4x`` in Triton) can regenerate any part of
it without storing it::

    e        = i * in + j                        # row-major index of x[i, j] in the 2-D view
    r0..r3   = Philox4x32-10(key = (seed & 0xffffffff, seed >> 32),
                             counter = (e >> 3 low 32 bits, e >> 3 high 32 bits, 0, 0))
    u16      = (r_{(e >> 1) & 3} >> (16 * (e & 1))) & 0xffff
    keep     = u16 >= threshold(p),   threshold(p) = round(p * 65536)

16 random bits per element (8 elements per Philox call) set the keep probability to within
2**-17 of ``1 - p``; the kept values are scaled by exactly ``1 / (1 - p)``. Philox4x32-10 is
Random123's generator (Salmon et al., SC'11), the one Triton's ``tl.randint4x`` and CUDA's
curand Philox use; counter ``(c0, 0, 0, 0)`` is exactly Triton's ``randint4x(seed, c0)``.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
BITS_PER_ELEMENT = 16
ELEMENTS_PER_CALL = 128 // BITS_PER_ELEMENT  # 8


def keep_threshold(p: float) -> int:
    """Elements whose 16-bit draw is below this are dropped."""
    return int(round(p * (1 << BITS_PER_ELEMENT)))


def philox4x32(counter_lo: torch.Tensor, counter_hi: torch.Tensor, seed: torch.Tensor):
    """Philox4x32-10 on int64 tensors holding uint32 values; counter words 2 and 3 are zero.

    ``seed`` is a 0-d int64 tensor (so that torch.compile and checkpointing see a tensor).
    Returns four int64 tensors of uint32 values. 32×32→64-bit products wrap in int64 but keep
    their bit pattern, so ``>> 32 & 0xffffffff`` is the exact high word.
    """
    keys0, keys1 = round_keys(seed)
    c0, c1 = counter_lo, counter_hi
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for k0, k1 in zip(keys0, keys1):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c2 = (
            (p1 >> 32).bitwise_and_(_M32).bitwise_xor_(c1).bitwise_xor_(k0),
            (p0 >> 32).bitwise_and_(_M32).bitwise_xor_(c3).bitwise_xor_(k1),
        )
        c1 = p1.bitwise_and_(_M32)
        c3 = p0.bitwise_and_(_M32)
    return c0, c1, c2, c3


def round_keys(seed: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The key words of every round as 0-d tensors: ``(k0 + i·W0) mod 2³², (k1 + i·W1) mod 2³²``
    for round i, each list formed by three ops. (Bumping the key after every round, as the
    definition reads, is 40 ops on 0-d tensors per call: more than the rounds themselves for a
    small mask.)"""
    rounds = torch.arange(PHILOX_ROUNDS, dtype=torch.int64, device=seed.device)
    k0 = ((seed & _M32) + rounds * PHILOX_W0).bitwise_and_(_M32)
    k1 = (((seed >> 32) & _M32) + rounds * PHILOX_W1).bitwise_and_(_M32)
    return k0.unbind(), k1.unbind()


def keep_mask(seed: torch.Tensor, numel: int, p: float, device=None, start: int = 0) -> torch.Tensor:
    """Bool keep-mask for elements ``start .. start+numel`` of the flat index ``e`` (see module doc)."""
    device = seed.device if device is None else device
    first, last = start // ELEMENTS_PER_CALL, (start + numel - 1) // ELEMENTS_PER_CALL
    g = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox4x32(g & _M32, g >> 32, seed.to(device))
    thr = keep_threshold(p)
    lanes = []
    for w in words:  # element order inside a call: word 0 low, word 0 high, word 1 low, ...
        lanes.append((w & 0xFFFF) >= thr)
        lanes.append((w >> 16) >= thr)
    mask = torch.stack(lanes, dim=1).view(-1)
    off = start - first * ELEMENTS_PER_CALL
    return mask[off : off + numel]


def dropout_rows(x2d: torch.Tensor, seed: torch.Tensor, p: float, dtype=None,
                 out: torch.Tensor | None = None, rows_per_chunk: int | None = None) -> torch.Tensor:
    """``drop(x) = x ⊙ keep / (1-p)`` for a 2-D ``x2d: (n, in)``, in ``dtype`` (default x's).

    Built a block of rows at a time so that the Philox temporaries stay cache-sized. The result
    is a fresh (n, in) tensor (or ``out``, which may be ``x2d`` itself to apply the mask in
    place) that callers use and drop: it is never saved for backward.
    """
    dtype = x2d.dtype if dtype is None else dtype
    n, k = x2d.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=x2d.device)
    if n == 0 or k == 0:
        return out
    scale = 1.0 / (1.0 - p)
    step = rows_per_chunk or max(1, (1 << 17) // max(k, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        keep = keep_mask(seed, (r1 - r0) * k, p, device=x2d.device, start=r0 * k).view(r1 - r0, k)
        torch.mul(x2d[r0:r1], keep, out=out[r0:r1]).mul_(scale)
    return out


def keep_rows(seed: torch.Tensor, n: int, k: int, p: float, device=None) -> torch.Tensor:
    """The bool keep-mask of an (n, k) input (a transient: 1 byte per element)."""
    return keep_mask(seed, n * k, p, device=device).view(n, k)


def apply_keep(t: torch.Tensor, keep: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """``t ⊙ keep / (1-p)`` (in place on ``t`` when ``inplace``)."""
    out = t.mul_(keep) if inplace else t * keep
    return out.mul_(1.0 / (1.0 - p))


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 63-bit seed from torch's default CPU generator (restored by checkpointing)."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator)
