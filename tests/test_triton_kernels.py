"""Kernel-level tests of the Triton ops (kernels/), run on CPU under TRITON_INTERPRET=1.

Each op's forward and backward, fp32 / fp16 / bf16, ragged shapes (no dimension a multiple of
any block size, several tiles per dimension), against float64 with flash-attention's rule:
error ≤ 2 × the error of plain PyTorch in the same dtype + a few ulps. Plus the in-kernel
Philox mask bit for bit against :func:`pypeft_fast.philox.keep_mask`, opcheck on every op, and
torch.compile(fullgraph=True) through the ops.
"""
import pytest
import torch

import pypeft_fast as pf
from pypeft_fast import registry
from pypeft_fast.philox import keep_mask, keep_threshold
from numerics import assert_within, rand

pytestmark = pytest.mark.skipif(
    registry.why_unavailable("lowrank", "triton", torch.device("cpu")) is not None,
    reason="Triton backend unavailable on CPU (needs triton and TRITON_INTERPRET=1)")

if registry.why_unavailable("lowrank", "triton", torch.device("cpu")) is None:
    import triton
    import triton.language as tl

    from pypeft_fast.kernels._utils import _keep_mask

    @triton.jit
    def _mask_probe_kernel(seed_ptr, out_ptr, ROWS, row_len, threshold,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUPED: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        col0 = tl.program_id(1) * BLOCK_C
        cols = col0 + tl.arange(0, BLOCK_C)
        keep = _keep_mask(tl.load(seed_ptr), rows, col0, row_len, threshold, BLOCK_R, BLOCK_C,
                          GROUPED)
        ok = (rows[:, None] < ROWS) & (cols[None, :] < row_len)
        tl.store(out_ptr + rows[:, None] * row_len + cols[None, :], keep.to(tl.int8), mask=ok)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("row_len, grouped", [(129, False), (136, False), (136, True)])
@pytest.mark.parametrize("seed", [0, 7, 0x0123456789ABCDEF])
def test_keep_mask_bit_exact(row_len, grouped, seed):
    rows, p = 37, 0.3
    s = torch.tensor(seed, dtype=torch.int64)
    out = torch.full((rows, row_len), -1, dtype=torch.int8)
    _mask_probe_kernel[(triton.cdiv(rows, 16), triton.cdiv(row_len, 64))](
        s, out, rows, row_len, keep_threshold(p), BLOCK_R=16, BLOCK_C=64, GROUPED=grouped)
    want = keep_mask(s, rows * row_len, p).view(rows, row_len)
    got = out.bool()
    assert (out >= 0).all(), "elements left unwritten"
    assert torch.equal(got, want), f"{int((got != want).sum())} mask bits differ"


def _grads(fn, leaves, gy, frozen=()):
    """(y, {name: grad}) of ``fn(**leaves)`` under ``gy``; ``frozen`` leaves get no grad."""
    ls = {k: v.detach().clone().requires_grad_(k not in frozen) for k, v in leaves.items()}
    y = fn(**ls)
    y.backward(gy.to(y.dtype))
    return y.detach(), {k: v.grad for k, v in ls.items()}


def _check(name, got: dict, ref: dict, base: dict):
    for k in ref:
        assert_within(f"{name} {k}", got[k], ref[k], base[k], base[k].dtype)


# --------------------------------------------------------------------------- lowrank

def _lowrank_tensors(n, k, o, r, seed):
    return dict(x=rand(n, k, seed=seed), weight=rand(o, k, seed=seed + 1) / k**0.5,
                bias=rand(o, seed=seed + 2), A=rand(r, k, seed=seed + 3) / k**0.5,
                B=rand(o, r, seed=seed + 4))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n, k, o, r, p", [(74, 129, 67, 3, 0.0), (74, 136, 67, 20, 0.25),
                                          (70, 129, 131, 1, 0.4)])
def test_lowrank_ops(dtype, n, k, o, r, p):
    dt, s, seed_t = DTYPES[dtype], 0.7, torch.tensor(12345)
    T = _lowrank_tensors(n, k, o, r, seed=3)
    gy = rand(n, o, seed=99)
    m = keep_mask(seed_t, n * k, p).view(n, k).double() / (1 - p) if p else None

    def ref(x, weight, bias, A, B):
        xd = x * m.to(x.dtype) if p else x
        return x @ weight.t() + bias + s * (xd @ A.t()) @ B.t()

    def case(d):
        y, g = _grads(ref, {kk: v.to(d) for kk, v in T.items()}, gy)
        xd = T["x"].to(d) * m.to(d) if p else T["x"].to(d)
        return dict(y=y, u=xd @ T["A"].to(d).t(), dx=g["x"], dA=g["A"], dB=g["B"])

    want, base = case(torch.float64), case(dt)
    x, W, b, A, B = (T[kk].to(dt) for kk in ("x", "weight", "bias", "A", "B"))
    seed = seed_t if p else None
    y, u = torch.ops.pypeft_fast.lowrank_fwd(x, W, b, A, B, seed, s, p)
    dx, dA, dB = torch.ops.pypeft_fast.lowrank_bwd(gy.to(dt), x, W, A, B, u, seed, s, p,
                                                   True, True, True)
    assert u.dtype == torch.float32
    base["u"] = base["u"].float() if dt == torch.float32 else base["u"]
    _check(f"lowrank[{dtype}, p={p}]", dict(y=y, u=u.to(base["u"].dtype), dx=dx, dA=dA, dB=dB),
           want, base)
    # t = gy·B from the skinny pass (no dx GEMM) gives the same dA; unneeded grads are empty
    dx2, dA2, dB2 = torch.ops.pypeft_fast.lowrank_bwd(gy.to(dt), x, W, A, B, u, seed, s, p,
                                                      False, True, False)
    assert dx2.numel() == 0 and dB2.numel() == 0
    assert_within(f"lowrank[{dtype}, p={p}] dA (no dx)", dA2, want["dA"], base["dA"], dt)


def test_lowrank_fp64_and_mixed_adapter():
    """fp64 accumulates in fp64; a bf16 base with fp32 factors takes the hi/lo split MMAs."""
    T = _lowrank_tensors(70, 129, 67, 5, seed=5)
    gy = rand(70, 67, seed=6)
    want = None
    for act, par in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        ls = {kk: v.to(act if kk in ("x", "weight", "bias") else par) for kk, v in T.items()}
        fn = lambda x, weight, bias, A, B: pf.lowrank_linear(x, weight, bias, A, B, 0.5, 0.0,  # noqa: E731
                                                             None, "triton")
        y, g = _grads(fn, ls, gy, frozen=("weight",))
        if want is None:
            want = (T["x"] @ T["weight"].t() + T["bias"] + 0.5 * T["x"] @ T["A"].t() @ T["B"].t())
            assert (y - want).abs().max() < 1e-12
            continue
        ref = lambda x, weight, bias, A, B: (x @ weight.t() + bias  # noqa: E731
                                             + 0.5 * (x.to(A.dtype) @ A.t()) @ B.t()).to(x.dtype)
        y64, g64 = _grads(ref, {kk: v for kk, v in T.items()}, gy)
        yb, gb = _grads(ref, ls, gy)
        assert_within("mixed y", y, y64, yb, act)
        for kk in ("x", "A", "B"):
            assert_within(f"mixed d{kk}", g[kk], g64[kk], gb[kk], gb[kk].dtype)


# --------------------------------------------------------------------------- kronecker / phm

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("h, a, b", [(1, (5, 3), (14, 43)), (3, (2, 7), (37, 19))])
def test_kronecker_ops(dtype, h, a, b):
    dt, s, n = DTYPES[dtype], 0.6, 74
    out_f, in_f = a[0] * b[0], a[1] * b[1]
    T = dict(x=rand(n, in_f, seed=1), weight=rand(out_f, in_f, seed=2) / in_f**0.5,
             bias=rand(out_f, seed=3), A=rand(h, *a, seed=4), B=rand(h, *b, seed=5) / in_f**0.5)
    gy = rand(n, out_f, seed=6)

    def ref(x, weight, bias, A, B):
        dw = sum(torch.kron(A[i], B[i]) for i in range(h)) * s
        return x @ weight.t() + bias + x @ dw.t()

    y64, g64 = _grads(ref, T, gy)
    yb, gb = _grads(ref, {kk: v.to(dt) for kk, v in T.items()}, gy)
    x, W, bias, A, B = (T[kk].to(dt) for kk in ("x", "weight", "bias", "A", "B"))
    y = torch.ops.pypeft_fast.kronecker_fwd(x, W, bias, A, B, s)
    dx, dA, dB = torch.ops.pypeft_fast.kronecker_bwd(gy.to(dt), x, W, A, B, s, True, True, True)
    _check(f"kronecker[{dtype}, h={h}]", dict(y=y, x=dx, A=dA, B=dB),
           dict(y=y64, x=g64["x"], A=g64["A"], B=g64["B"]),
           dict(y=yb, x=gb["x"], A=gb["A"], B=gb["B"]))


# --------------------------------------------------------------------------- sparse

def _mask(out_f, in_f, density, seed, block=None):
    g = torch.Generator().manual_seed(seed)
    if block:  # a block mask: whole block × block tiles on
        tiles = torch.rand(-(-out_f // block), -(-in_f // block), generator=g) < density
        dense = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
        rows, cols = dense.nonzero(as_tuple=True)
        return torch.stack([rows, cols])
    nnz = max(1, round(density * out_f * in_f))
    flat = torch.randperm(out_f * in_f, generator=g)[:nnz]
    return torch.stack([flat // in_f, flat % in_f])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("density, block", [(0.05, None), (0.3, 8)])
def test_sparse_ops(dtype, density, block):
    from pypeft_fast.families.sparse import build_layout
    dt, s, n, out_f, in_f = DTYPES[dtype], 0.9, 74, 67, 129
    idx = _mask(out_f, in_f, density, seed=4, block=block)
    nnz = idx.shape[1]
    T = dict(x=rand(n, in_f, seed=1), weight=rand(out_f, in_f, seed=2) / in_f**0.5,
             bias=rand(out_f, seed=3), v=rand(nnz, seed=5) / in_f**0.5)
    gy = rand(n, out_f, seed=6)

    def ref(x, weight, bias, v):
        dw = torch.zeros(out_f, in_f, dtype=v.dtype).index_put((idx[0], idx[1]), v) * s
        return x @ weight.t() + bias + x @ dw.t()

    y64, g64 = _grads(ref, T, gy)
    yb, gb = _grads(ref, {kk: v.to(dt) for kk, v in T.items()}, gy)
    L = build_layout(idx, out_f, in_f)
    x, W, bias, v = (T[kk].to(dt) for kk in ("x", "weight", "bias", "v"))
    y = torch.ops.pypeft_fast.sparse_fwd(x, W, bias, v, L.csr_perm, L.row_ptr, L.csr_col, s)
    dx, dv = torch.ops.pypeft_fast.sparse_bwd(gy.to(dt), x, W, v, *L.tensors(), s, True, True)
    _check(f"sparse[{dtype}, density={density}]", dict(y=y, x=dx, v=dv),
           dict(y=y64, x=g64["x"], v=g64["v"]), dict(y=yb, x=gb["x"], v=gb["v"]))


# --------------------------------------------------------------------------- ops, compile

def _op_samples():
    from pypeft_fast.families.sparse import build_layout
    g = torch.Generator().manual_seed(0)
    r = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    x, W, b, gy = r(5, 24), r(18, 24), r(18), r(5, 18)
    A, B = r(3, 24), r(18, 3)
    seed = torch.tensor(3)
    _, u = torch.ops.pypeft_fast.lowrank_fwd(x, W, b, A, B, seed, 0.5, 0.1)
    KA, KB = r(2, 3, 4), r(2, 6, 6)
    idx = torch.stack([torch.arange(0, 18, 2), torch.arange(0, 27, 3)[:9] % 24])
    L = build_layout(idx, 18, 24)
    v = r(9)
    ops = torch.ops.pypeft_fast
    return {
        "lowrank_fwd": (ops.lowrank_fwd.default, (x, W, b, A, B, seed, 0.5, 0.1)),
        "lowrank_bwd": (ops.lowrank_bwd.default, (gy, x, W, A, B, u, seed, 0.5, 0.1, True, True, True)),
        "kronecker_fwd": (ops.kronecker_fwd.default, (x, W, b, KA, KB, 0.5)),
        "kronecker_bwd": (ops.kronecker_bwd.default, (gy, x, W, KA, KB, 0.5, True, True, True)),
        "sparse_fwd": (ops.sparse_fwd.default, (x, W, b, v, L.csr_perm, L.row_ptr, L.csr_col, 0.5)),
        "sparse_bwd": (ops.sparse_bwd.default, (gy, x, W, v, *L.tensors(), 0.5, True, True)),
    }


@pytest.mark.parametrize("name", ["lowrank_fwd", "lowrank_bwd", "kronecker_fwd", "kronecker_bwd",
                                  "sparse_fwd", "sparse_bwd"])
def test_opcheck(name):
    op, args = _op_samples()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("family", ["lowrank", "kronecker", "sparse"])
def test_compile_fullgraph_triton(family):
    """torch.compile sees the Triton ops (no graph break) and gives the eager numbers."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    r = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    W, x = r(35, 24), r(3, 5, 24)
    idx = torch.stack([torch.arange(35), torch.arange(35) % 24])
    calls = {
        "lowrank": ((r(3, 24), r(35, 3)),
                    lambda x, P: pf.lowrank_linear(x, W, None, *P, 0.5, 0.1, torch.tensor(7), "triton")),
        "kronecker": ((r(5, 2), r(7, 12)),
                      lambda x, P: pf.kronecker_linear(x, W, None, *P, 0.5, "triton")),
        "sparse": ((r(35),), lambda x, P: pf.sparse_linear(x, W, None, P[0], idx, 0.5, "triton")),
    }
    P, call = calls[family]

    def run(fn):
        xs = x.clone().requires_grad_(True)
        ps = tuple(p.clone().requires_grad_(True) for p in P)
        y = fn(xs, ps)
        y.square().sum().backward()
        return [y.detach(), xs.grad] + [p.grad for p in ps]

    eager = run(call)
    compiled = run(torch.compile(call, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["lowrank", "kronecker", "phm", "sparse"])
def test_strided_inputs_through_public_api(family):
    """x a column slice of a wider tensor (row stride ≠ in) and W a transposed view: the
    launchers pass strides, never copy; output and gradients vs the torch backend in float64,
    with the tolerance rule against the torch backend in float32."""
    g = torch.Generator().manual_seed(2)
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)  # noqa: E731
    n, in_f, out_f = 70, 96, 80
    x_wide, W_t = r(n, in_f + 13), r(in_f, out_f)
    idx = torch.stack([torch.arange(0, out_f), (torch.arange(0, out_f) * 7) % in_f])
    P = {"lowrank": (r(4, in_f), r(out_f, 4)), "kronecker": (r(8, 6), r(10, 16)),
         "phm": (r(2, 8, 6), r(2, 10, 16)), "sparse": (r(out_f),)}[family]
    call = {
        "lowrank": lambda x, W, P, b: pf.lowrank_linear(x, W, None, *P, 0.5, 0.2, 5, b),
        "kronecker": lambda x, W, P, b: pf.kronecker_linear(x, W, None, *P, 0.5, b),
        "phm": lambda x, W, P, b: pf.phm_linear(x, W, None, *P, 0.5, b),
        "sparse": lambda x, W, P, b: pf.sparse_linear(x, W, None, P[0], idx, 0.5, b),
    }[family]

    def run(backend, dtype):
        x = x_wide.to(dtype)[:, 5:5 + in_f].detach().requires_grad_(True)
        W = W_t.to(dtype).t()  # (out, in), non-contiguous
        assert not x.is_contiguous() and not W.is_contiguous()
        ps = tuple(p.detach().to(dtype).clone().requires_grad_(True) for p in P)
        y = call(x, W, ps, backend)
        y.backward(torch.ones_like(y))
        return [y.detach(), x.grad] + [p.grad for p in ps]

    ref, base, got = run("torch", torch.float64), run("torch", torch.float32), run("triton", torch.float32)
    for i, (a, b, c) in enumerate(zip(got, ref, base)):
        assert_within(f"{family} strided output/grad #{i}", a, b, c, torch.float32)


def test_probe_says_why_on_cpu_without_interpreter(monkeypatch):
    from pypeft_fast import triton_backend
    assert triton_backend.probe(torch.device("cpu")) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = triton_backend.probe(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert "meta" in triton_backend.probe(torch.device("meta"))
