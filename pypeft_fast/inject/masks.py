"""Sparse masks for the ``sparse`` family: which entries of W (out, in) get a trainable delta.

Every strategy returns ``indices: (2, nnz)`` int64 = (rows, cols), sorted row-major, with
``nnz = round(density·out·in)`` (``"block"``: the nearest whole number of blocks, so within half a
block of that count).

* ``"random"``: nnz positions drawn uniformly without replacement (SHiRA-rand, SparseAdapter).
* ``"largest"``: the nnz entries of largest |W| (SHiRA-WM); ties broken by position (stable sort).
* ``"block"``: ``round(nnz / (bo·bi))`` blocks of ``block_size`` (bo, bi), drawn uniformly among
  the blocks tiling W (bo must divide out, bi must divide in) — a mask for block-sparse kernels.

Random choices use a CPU ``torch.Generator`` seeded from ``seed`` and the layer's dotted name, so
a seed gives the same masks on every machine and every layer gets its own mask.
"""
from __future__ import annotations

import zlib

import torch

STRATEGIES = ("random", "largest", "block")


def layer_seed(seed: int, layer: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(layer.encode())) % (2**63 - 1)


def mask_nnz(where: str, density: float, out_f: int, in_f: int, strategy: str = "random",
             block_size: tuple[int, int] | None = None) -> int:
    """The number of entries the mask will hold; ``ValueError`` naming the layer if it is 0 or
    the blocks do not tile the weight."""
    target = density * out_f * in_f
    if strategy == "block":
        bo, bi = block_size
        if out_f % bo or in_f % bi:
            raise ValueError(f"{where}: block_size ({bo}, {bi}) does not tile weight ({out_f}, {in_f}); "
                             f"expected {bo} to divide {out_f} and {bi} to divide {in_f}")
        nnz = round(target / (bo * bi)) * bo * bi
        unit = f"blocks of ({bo}, {bi})"
    else:
        nnz = round(target)
        unit = "entries"
    if nnz < 1:
        raise ValueError(f"{where}: density {density} of weight ({out_f}, {in_f}) gives 0 {unit}; "
                         f"expected a larger density")
    return nnz


def sparse_mask(where: str, weight: torch.Tensor, density: float, strategy: str, seed: int,
                block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """indices (2, nnz) int64 on ``weight``'s device for weight (out, in) (any strides)."""
    out_f, in_f = weight.shape
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: mask {strategy!r}; expected one of {STRATEGIES}")
    nnz = mask_nnz(where, density, out_f, in_f, strategy, block_size)
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, where))
    if strategy == "random":
        flat = torch.randperm(out_f * in_f, generator=gen)[:nnz].sort().values
    elif strategy == "largest":
        mag = weight.detach().abs().float().reshape(-1).cpu()
        flat = torch.sort(mag, descending=True, stable=True).indices[:nnz].sort().values
    else:
        bo, bi = block_size
        gr, gc = out_f // bo, in_f // bi
        chosen = torch.zeros(gr * gc, dtype=torch.bool)
        chosen[torch.randperm(gr * gc, generator=gen)[: nnz // (bo * bi)]] = True
        dense = chosen.view(gr, gc).repeat_interleave(bo, 0).repeat_interleave(bi, 1)
        flat = dense.reshape(-1).nonzero().squeeze(1)
    rows, cols = flat // in_f, flat % in_f
    return torch.stack([rows, cols]).to(device=weight.device, dtype=torch.int64)
