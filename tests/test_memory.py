"""Memory-lean by construction, for every family and CPU backend:

* no aten op in forward+backward allocates anything of the size of ΔW (out × in);
* what autograd saves beyond the parameters is x itself plus factor-sized tensors — for lowrank
  with dropout 0.1 at most bytes(x) + bytes(n × r float32) + bytes(x)/8.
"""
import pytest
import torch

import pypeft_fast as pf
from pypeft_fast.families import kronecker, lowrank, phm, sparse
from pypeft_fast.measure import LargestAllocation, saved_bytes
from pypeft_fast.reference import reference_linear
from numerics import cpu_backends

N, IN, OUT, R = 16, 512, 384, 4   # out × in = 196 608 dwarfs n × in = 8 192


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=g, requires_grad=True)
    W = torch.randn(OUT, IN, generator=g)
    b = torch.randn(OUT, generator=g, requires_grad=True)
    idx = torch.randperm(OUT * IN, generator=g)[: 2 * (IN + OUT)]
    return g, x, W, b, torch.stack([idx // IN, idx % IN])


def family_calls():
    """``family -> (params, call(x, W, b, params, backend), materialising reference call)``."""
    g, _, _, _, idx = _inputs()
    p = lambda *s: torch.randn(*s, generator=g).requires_grad_(True)  # noqa: E731
    return {
        "lowrank": ((p(R, IN), p(OUT, R)),
                    lambda x, W, b, P, be: pf.lowrank_linear(x, W, b, *P, 0.5, 0.1, 3, be),
                    lambda x, W, b, P: reference_linear(x, W, b, lowrank.delta_weight(*P))),
        "kronecker": (((p(16, 2), p(2, 16)), p(24, 32)),
                      lambda x, W, b, P, be: pf.kronecker_linear(x, W, b, *P, 0.5, be),
                      lambda x, W, b, P: reference_linear(x, W, b, kronecker.delta_weight(*P))),
        "phm": ((p(4, 16, 16), p(4, 24, 32)),
                lambda x, W, b, P, be: pf.phm_linear(x, W, b, *P, 0.5, be),
                lambda x, W, b, P: reference_linear(x, W, b, phm.delta_weight(*P))),
        "sparse": ((p(idx.shape[1]),),
                   lambda x, W, b, P, be: pf.sparse_linear(x, W, b, P[0], idx, 0.5, be),
                   lambda x, W, b, P: reference_linear(x, W, b, sparse.delta_weight(P[0], idx, (OUT, IN)))),
    }


CASES = [(f, b) for f in ("lowrank", "kronecker", "phm", "sparse") for b in cpu_backends(f)]


def _leaves(P):
    return [t for p in P for t in (p if isinstance(p, tuple) else (p,))]


@pytest.mark.parametrize("family, backend", CASES)
def test_no_full_size_delta_or_weight_gradient(family, backend):
    _, x, W, b, _ = _inputs()
    P, call, _ = family_calls()[family]
    call(x, W, b, P, backend)  # warm caches (sparse layout) outside the recording
    with LargestAllocation() as rec:
        call(x, W, b, P, backend).sum().backward()
    assert rec.largest < OUT * IN // 4, (
        f"{family}/{backend}: {rec.op} produced {rec.largest} elements; ΔW has {OUT * IN}")


def test_the_detector_catches_a_materialised_delta():
    _, x, W, b, _ = _inputs()
    P, _, ref = family_calls()["lowrank"]
    with LargestAllocation() as rec:
        ref(x, W, b, P).sum().backward()
    assert rec.largest >= OUT * IN


@pytest.mark.parametrize("backend", cpu_backends("lowrank"))
def test_lowrank_dropout_saves_x_the_rank_product_and_a_seed_only(backend):
    _, x, W, b, _ = _inputs()
    x3 = x.detach().view(2, N // 2, IN).requires_grad_(True)
    A, B = torch.randn(R, IN, requires_grad=True), torch.randn(OUT, R, requires_grad=True)
    total, ptrs, y = saved_bytes(lambda: pf.lowrank_linear(x3, W, b, A, B, 0.5, 0.1, None, backend),
                                 exclude=(W, b, A, B))
    x_bytes = x3.numel() * x3.element_size()
    assert x3.untyped_storage().data_ptr() in ptrs, "x itself (the caller's tensor) must be what is saved"
    assert total <= x_bytes + N * R * 4 + x_bytes // 8, f"saved {total} bytes; x is {x_bytes}"
    y.sum().backward()  # and the saved state is enough for backward
    assert A.grad is not None and x3.grad is not None


@pytest.mark.parametrize("family, backend", CASES)
def test_every_family_saves_x_plus_factor_sized_tensors(family, backend):
    _, x, W, b, _ = _inputs()
    P, call, ref = family_calls()[family]
    x_bytes = x.numel() * x.element_size()
    total, ptrs, _ = saved_bytes(lambda: call(x, W, b, P, backend), exclude=(W, b, *_leaves(P)))
    assert x.untyped_storage().data_ptr() in ptrs
    factor_bytes = 4 * (N * R + 2 * (IN + OUT) * 8 + 4 * 16 * 16 * 2 + 4 * 24 * 32)
    assert total <= x_bytes + factor_bytes, f"{family}/{backend}: saved {total} bytes; x is {x_bytes}"
    ref_total, _, _ = saved_bytes(lambda: ref(x, W, b, P), exclude=(W, b, *_leaves(P)))
    assert total < ref_total, f"{family}/{backend}: saves {total} bytes, the materialising reference {ref_total}"


@pytest.mark.parametrize("family, backend", CASES)
def test_frozen_weight_is_saved_only_when_x_needs_a_gradient(family, backend):
    """Like F.linear: the first adapted layers after a frozen embedding need no dx, so nothing
    of the frozen weight is kept for them."""
    _, x, W, b, _ = _inputs()
    P, call, _ = family_calls()[family]
    for needs_dx in (False, True):
        xi = x.detach().requires_grad_(needs_dx)
        _, ptrs, y = saved_bytes(lambda: call(xi, W, b, P, backend))
        assert (W.untyped_storage().data_ptr() in ptrs) == needs_dx
        y.sum().backward()
        assert all(t.grad is not None for t in _leaves(P))
