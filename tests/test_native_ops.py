"""Op-level tests of the native kernels (``csrc/`` → ``torch.ops.pypeft_fast.*``).

Every op: ``torch.library.opcheck`` (schema, fake kernel, autograd registration); numbers
against float64 dense references on ragged shapes with the flash-attention rule of
tests/numerics.py (error ≤ 2 × plain PyTorch's error in the same dtype + eps); Philox bit for bit
against pypeft_fast/philox.py and Random123's known answers; argument errors that name shapes;
the build info. Family-level outputs and gradients of backend="cpp" are tested by
tests/test_<family>.py, which parametrize over every usable backend.

Skipped when ``pypeft_fast._C`` is not built, unless PYPEFT_FAST_REQUIRE_NATIVE=1 (CI sets it:
there a missing build is a failure, not a skip).
"""
import os

import pytest
import torch

from numerics import assert_within as _assert_within, rand

try:
    from pypeft_fast import native
except ImportError as e:  # not built, or a stale build refused by native.py
    if os.environ.get("PYPEFT_FAST_REQUIRE_NATIVE") == "1":
        raise
    pytest.skip(f"native extension unavailable: {e}", allow_module_level=True)

from pypeft_fast import philox  # noqa: E402
from pypeft_fast.families.sparse import build_layout  # noqa: E402

ops = torch.ops.pypeft_fast
DEVICES = ["cpu"] + (["cuda"] if native.WITH_CUDA and torch.cuda.is_available() else [])

# (n tokens, C = in, R = out): ragged on purpose.
SHAPES = [(97, 37, 53), (6, 123, 431), (1025, 59, 111), (1, 8, 3)]


def assert_within(name, got, ref, base, dtype):
    """tests/numerics.py's rule; in float64 plain PyTorch *is* the reference (its error is 0),
    so there a reduction-length-aware bound replaces it: 1e-12 relative to the largest |ref|."""
    if dtype == torch.float64:
        assert got.dtype == torch.float64, f"{name}: dtype {got.dtype}, expected float64"
        scale = ref.abs().max().item() if ref.numel() else 0.0
        torch.testing.assert_close(got, ref.to(got.device), rtol=0, atol=1e-12 * max(scale, 1.0),
                                   msg=lambda m: f"{name}: {m}")
        return
    _assert_within(name, got, ref, base, dtype)


def _mask(R, C, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(R * C, generator=g)[:nnz]
    return torch.stack([flat // C, flat % C])


def _sparse_case(n, C, R, density, seed, device="cpu"):
    nnz = max(0, min(R * C, round(density * R * C)))
    idx = _mask(R, C, nnz, seed)
    layout = build_layout(idx.to(device), R, C)
    vals = rand(nnz, seed=seed + 1)
    S = torch.zeros(R, C, dtype=torch.float64)
    S[idx[0], idx[1]] = vals
    return layout, vals.to(device), S.to(device)


# ---------------------------------------------------------------- sparse: SpMM and SDDMM


@pytest.fixture(params=["32", "64"])
def cpu_width(request, monkeypatch):
    """Both CPU vector widths (csrc/common/cpu_width.h) on any machine: each is correct
    everywhere, only its speed depends on the ISA."""
    monkeypatch.setenv("PYPEFT_FAST_CPU_VECTOR_BYTES", request.param)
    return int(request.param)


@pytest.fixture(params=["16", "32", "64"])
def philox_isa(request, monkeypatch):
    """The Philox rounds' variants — portable (16), AVX2 (32), AVX-512 (64) — each capped by what
    the CPU has (csrc/common/cpu_width.h): every one the CPU can run must be bit-exact."""
    monkeypatch.setenv("PYPEFT_FAST_CPU_VECTOR_BYTES", request.param)
    return int(request.param)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_dtype,acc", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                         (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_spmm_matches_dense(device, shape, x_dtype, acc, cpu_width):
    n, C, R = shape
    layout, vals, S = _sparse_case(n, C, R, 0.2, seed=n + C, device=device)
    x = rand(n, C, seed=7).to(device=device, dtype=x_dtype)
    v = vals[layout.csr_perm].to(acc)
    ref = x.double() @ S.t()
    base = x.to(acc) @ S.to(acc).t()
    got = ops.sparse_spmm_csr_t(layout.row_ptr, layout.csr_col, v, C, x)
    assert_within("spmm x·Sᵀ", got, ref, base, acc)
    # transpose direction (backward dx): gy (n, R) · S over the CSR of Sᵀ
    gy = rand(n, R, seed=8).to(device=device, dtype=x_dtype)
    vt = vals[layout.csc_perm].to(acc)
    got_t = ops.sparse_spmm_csr_t(layout.col_ptr, layout.csc_row, vt, R, gy)
    assert_within("spmm gy·S", got_t, gy.double() @ S, gy.to(acc) @ S.to(acc), acc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_spmm_accumulates_into_out_rounding_once(device, out_dtype, cpu_width):
    n, C, R = 97, 37, 53
    layout, vals, S = _sparse_case(n, C, R, 0.3, seed=3, device=device)
    x = rand(n, C, seed=4).to(device=device, dtype=out_dtype)
    y0 = rand(n, R, seed=5).to(device=device, dtype=out_dtype)
    y = y0.clone()
    ops.sparse_spmm_csr_t_acc(y, layout.row_ptr, layout.csr_col, vals[layout.csr_perm].float(), x)
    ref = y0.double() + x.double() @ S.t()
    base = (y0.float() + x.float() @ S.float().t()).to(out_dtype)  # summed in fp32, rounded once
    assert_within("spmm_acc", y, ref, base, out_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [0.0, 1 / (53 * 37), 0.05, 1.0])
def test_spmm_and_sddmm_mask_densities(device, density, cpu_width):
    n, C, R = 97, 37, 53
    layout, vals, S = _sparse_case(n, C, R, density, seed=11, device=device)
    x = rand(n, C, seed=12).to(device=device, dtype=torch.float32)
    gy = rand(n, R, seed=13).to(device=device, dtype=torch.float32)
    y = ops.sparse_spmm_csr_t(layout.row_ptr, layout.csr_col, vals[layout.csr_perm].float(), C, x)
    assert_within("spmm", y, x.double() @ S.t(), x @ S.float().t(), torch.float32)
    g = ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, gy, x)
    rows, cols = layout_rows_cols(layout, R)
    full64, full32 = gy.double().t() @ x.double(), gy.t() @ x
    assert_within("sddmm", g, full64[rows, cols], full32[rows, cols], torch.float32)


def layout_rows_cols(layout, R):
    """(row, col) of each CSR entry, in CSR order."""
    counts = layout.row_ptr[1:] - layout.row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(R, device=counts.device), counts)
    return rows, layout.csr_col


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,acc", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                       (torch.bfloat16, torch.float32)])
def test_sddmm_matches_dense(device, shape, dtype, acc, cpu_width):
    n, C, R = shape
    layout, _, _ = _sparse_case(n, C, R, 0.2, seed=2 * n + R, device=device)
    a = rand(n, R, seed=21).to(device=device, dtype=dtype)
    b = rand(n, C, seed=22).to(device=device, dtype=dtype)
    rows, cols = layout_rows_cols(layout, R)
    ref = (a.double().t() @ b.double())[rows, cols]
    base = (a.to(acc).t() @ b.to(acc))[rows, cols]
    got = ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, a, b)
    assert_within("sddmm", got, ref, base, acc)


def test_spmm_is_bit_identical_across_cpu_widths_and_sddmm_agrees_to_rounding(monkeypatch):
    """SpMM sums each token's entries in CSR order whatever the width (the width only changes how
    many tokens share a vector); SDDMM's sum over tokens is associated per width."""
    n, C, R = 203, 45, 77
    layout, vals, _ = _sparse_case(n, C, R, 0.15, seed=31)
    x, gy = rand(n, C, seed=32).float(), rand(n, R, seed=33).float()
    v = vals[layout.csr_perm].float()
    got = {}
    for width in ("32", "64"):
        monkeypatch.setenv("PYPEFT_FAST_CPU_VECTOR_BYTES", width)
        got[width] = (ops.sparse_spmm_csr_t(layout.row_ptr, layout.csr_col, v, C, x),
                      ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, gy, x))
    assert torch.equal(got["32"][0], got["64"][0])
    torch.testing.assert_close(got["32"][1], got["64"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_sparse_ops_on_transposed_views(cpu_width, x_dtype):
    """Operands and outputs given as transposed views (stride 1 along tokens: the CPU kernels'
    plain-copy paths, which native.NativeDoRA's x_d·Wᵀ and SDDMM use) equal the contiguous
    calls bit for bit."""
    n, C, R = 77, 45, 53
    layout, vals, S = _sparse_case(n, C, R, 0.2, seed=41)
    v = vals[layout.csr_perm].float()
    x = rand(n, C, seed=42).to(x_dtype)
    xt = x.t().contiguous().t()                                  # same values, strides (1, n)
    y0 = rand(n, R, seed=43).to(x_dtype)
    out_c, out_t = y0.clone(), y0.t().contiguous().t()
    ops.sparse_spmm_csr_t_acc(out_c, layout.row_ptr, layout.csr_col, v, x)
    ops.sparse_spmm_csr_t_acc(out_t, layout.row_ptr, layout.csr_col, v, xt)
    assert out_t.stride() == (1, n) and torch.equal(out_t, out_c)
    base = (y0.float() + x.float() @ S.float().t()).to(x_dtype)  # summed in fp32, rounded once
    assert_within("spmm_acc on views", out_t, y0.double() + x.double() @ S.t(), base, x_dtype)
    a = rand(n, R, seed=44).to(x_dtype)
    got_t = ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, a.t().contiguous().t(), xt)
    assert torch.equal(got_t, ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, a, x))


def test_cpu_width_override_must_be_16_32_or_64(monkeypatch):
    layout, vals, _ = _sparse_case(9, 7, 5, 0.5, seed=1)
    monkeypatch.setenv("PYPEFT_FAST_CPU_VECTOR_BYTES", "48")
    with pytest.raises(RuntimeError, match=r"PYPEFT_FAST_CPU_VECTOR_BYTES must be 16, 32 or 64, got '48'"):
        ops.sparse_spmm_csr_t(layout.row_ptr, layout.csr_col, vals[layout.csr_perm].float(), 7,
                              torch.randn(9, 7))


def test_sddmm_and_spmm_dtype_rules():
    layout, vals, _ = _sparse_case(33, 20, 30, 0.3, seed=5)
    a, b = rand(33, 30, seed=1), rand(33, 20, seed=2)
    assert ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, a, b).dtype == torch.float64
    assert ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, a.half(), b.half()).dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"a has dtype Double but b has Float; expected the same"):
        ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, a, b.float())
    v = vals[layout.csr_perm]
    with pytest.raises(RuntimeError, match=r"out has dtype BFloat16 but x has Float; expected the same"):
        ops.sparse_spmm_csr_t_acc(torch.zeros(33, 30, dtype=torch.bfloat16), layout.row_ptr,
                                  layout.csr_col, v, b.float())


def test_sparse_ops_name_the_bad_argument_and_shapes():
    layout, vals, _ = _sparse_case(9, 7, 5, 0.5, seed=1)
    v = vals[layout.csr_perm].float()
    with pytest.raises(RuntimeError, match=r"sparse_spmm_csr_t: x has shape \[9, 6\]; expected \(n, 7\)"):
        ops.sparse_spmm_csr_t(layout.row_ptr, layout.csr_col, v, 7, torch.randn(9, 6))
    with pytest.raises(RuntimeError, match=r"val has shape \[3\] but col has shape"):
        ops.sparse_spmm_csr_t(layout.row_ptr, layout.csr_col, v[:3], 7, torch.randn(9, 7))
    with pytest.raises(RuntimeError, match=r"val has dtype BFloat16; expected float32 or float64"):
        ops.sparse_spmm_csr_t(layout.row_ptr, layout.csr_col, v.bfloat16(), 7, torch.randn(9, 7))
    with pytest.raises(RuntimeError, match=r"out has shape \[9, 4\]; expected \(9, 5\)"):
        ops.sparse_spmm_csr_t_acc(torch.zeros(9, 4), layout.row_ptr, layout.csr_col, v, torch.randn(9, 7))
    with pytest.raises(RuntimeError, match=r"sparse_sddmm_csr: a has shape \[9, 4\]; expected \(n, 5\)"):
        ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, torch.randn(9, 4), torch.randn(9, 7))
    with pytest.raises(RuntimeError, match=r"b has shape \[8, 7\] but a has shape \[9, 5\]"):
        ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col, torch.randn(9, 5), torch.randn(8, 7))
    with pytest.raises(RuntimeError, match=r"row_ptr has dtype Int; expected Long"):
        ops.sparse_sddmm_csr(layout.row_ptr.int(), layout.csr_col, torch.randn(9, 5), torch.randn(9, 7))
    with pytest.raises(RuntimeError, match=r"row_ptr ends at \d+ but col has 2 entries"):
        ops.sparse_sddmm_csr(layout.row_ptr, layout.csr_col[:2], torch.randn(9, 5), torch.randn(9, 7))
    bad_col = layout.csr_col.clone()
    bad_col[-1] = 7
    with pytest.raises(RuntimeError, match=r"col\[\d+\] = 7 is outside \[0, 7\)"):
        ops.sparse_spmm_csr_t(layout.row_ptr, bad_col, v, 7, torch.randn(9, 7))
    bad_ptr = layout.row_ptr.clone()
    bad_ptr[0] = 1
    with pytest.raises(RuntimeError, match=r"row_ptr starts at 1; expected 0"):
        ops.sparse_sddmm_csr(bad_ptr, layout.csr_col, torch.randn(9, 5), torch.randn(9, 7))


# ---------------------------------------------------------------- Philox: bit for bit


# Random123 kat_vectors, "philox4x32 10": counter (4 words), key (2 words) -> output (4 words).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_random123_known_answers():
    counter = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64)
    for i, (_, key, expected) in enumerate(KAT):
        got = ops.philox4x32_10(counter[i : i + 1], torch.tensor(key, dtype=torch.int64))
        assert tuple(got[0].tolist()) == expected, f"KAT {i}: {[hex(v) for v in got[0].tolist()]}"


def test_philox_matches_the_python_definition_on_many_counters():
    g = torch.arange(0, 5000, 7, dtype=torch.int64) * 0x10001 + (1 << 33)  # uses both counter words
    seed = torch.tensor(0x1234_5678_9ABC_DEF, dtype=torch.int64)
    key = torch.stack([seed & 0xFFFFFFFF, seed >> 32])
    counter = torch.stack([g & 0xFFFFFFFF, g >> 32, torch.zeros_like(g), torch.zeros_like(g)], 1)
    got = ops.philox4x32_10(counter, key)
    want = torch.stack(philox.philox4x32(g & 0xFFFFFFFF, g >> 32, seed), 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", [0, 1, 987654321, 2**63 - 1, 0x7F3A_0000_0000_0001])
@pytest.mark.parametrize("start,numel", [(0, 1), (0, 1000), (3, 777), (13, 5), (2**33 + 5, 131), (21, 4099)])
@pytest.mark.parametrize("p", [0.05, 0.37, 0.5])
def test_keep_mask_is_bit_exact(seed, start, numel, p, philox_isa):
    s = torch.tensor(seed, dtype=torch.int64)
    assert torch.equal(ops.philox_keep_mask(s, numel, p, start), philox.keep_mask(s, numel, p, start=start))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(37, 27), (1, 1), (5, 1031), (257, 3)])
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, None), (torch.float64, None),
                                               (torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32)])
def test_dropout_is_bit_exact_to_the_torch_path(device, shape, x_dtype, out_dtype, philox_isa):
    seed = torch.tensor(20261121, dtype=torch.int64)
    x = rand(*shape, seed=3).to(device=device, dtype=x_dtype)
    got = ops.philox_dropout(x, seed, 0.1, out_dtype)
    want = philox.dropout_rows(x, seed, 0.1, dtype=out_dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_dropout_keep_rate():
    keep = ops.philox_keep_mask(torch.tensor(5), 1 << 20, 0.05)
    assert abs(keep.float().mean().item() - (1 - philox.keep_threshold(0.05) / 65536)) < 1e-3


# ---------------------------------------------------------------- fused low-rank dropout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,r", [(97, 37, 5), (1, 8, 1), (300, 1031, 16), (33, 7, 3)])
@pytest.mark.parametrize("x_dtype,acc", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                         (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("p", [0.3, 0.0], ids=["p0.3", "p0-no-mask"])  # p = 0: the mixed-dtype products
def test_lowrank_dropout_down_and_bwd(device, n, k, r, x_dtype, acc, p, philox_isa):
    seed = torch.tensor(77 + n, dtype=torch.int64)
    x = rand(n, k, seed=1).to(device=device, dtype=x_dtype)
    A = rand(r, k, seed=2).to(device=device, dtype=acc)
    t = rand(n, r, seed=3).to(device=device, dtype=acc)
    keep = philox.keep_mask(seed, n * k, p).view(n, k).to(device).double() / (1 - p)
    xd64 = x.double() * keep
    xd = philox.dropout_rows(x, seed, p, dtype=acc)  # plain PyTorch, same dtype

    u = ops.lowrank_dropout_down(x, A, seed, p)
    assert_within("u = drop(x)·Aᵀ", u, xd64 @ A.double().t(), xd @ A.t(), acc)

    dx0 = rand(n, k, seed=4).to(device=device, dtype=x_dtype)
    dx = dx0.clone()
    dA = ops.lowrank_dropout_bwd(t, x, A, seed, p, dx, True)
    assert_within("dA = tᵀ·drop(x)", dA, t.double().t() @ xd64, t.t() @ xd, acc)
    z = t @ A
    base_dx = (philox.dropout_rows(z, seed, p, out=z) + dx0.to(acc)).to(x_dtype)
    assert_within("dx += drop(t·A)", dx, dx0.double() + (t.double() @ A.double()) * keep, base_dx, x_dtype)

    # each output alone
    assert ops.lowrank_dropout_bwd(t, x, A, seed, p, None, True).shape == (r, k)
    dx2 = dx0.clone()
    assert ops.lowrank_dropout_bwd(t, x, A, seed, p, dx2, False).numel() == 0
    assert torch.equal(dx2, dx)


def test_lowrank_ops_with_inputs_that_require_grad_on_every_thread():
    """The ops run GEMMs inside at::parallel_for, whose workers do not inherit grad mode: inputs
    that require grad (as in DeltaLinearFunction) must work with several threads and blocks."""
    s = torch.tensor(5)
    x, A = torch.randn(700, 97), torch.randn(4, 97, requires_grad=True)
    t, dx = torch.randn(700, 4, requires_grad=True), torch.zeros(700, 97)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode):
                u = ops.lowrank_dropout_down(x, A, s, 0.1)
                dA = ops.lowrank_dropout_bwd(t, x, A, s, 0.1, dx, True)
            if not grad_mode:
                assert not u.requires_grad and not dA.requires_grad
            torch.testing.assert_close(u.detach(), philox.dropout_rows(x, s, 0.1) @ A.detach().t())
    finally:
        torch.set_num_threads(threads)


def test_lowrank_ops_name_the_bad_argument_and_shapes():
    s = torch.tensor(1)
    with pytest.raises(RuntimeError, match=r"lowrank_dropout_down: A has shape \[4, 9\] but x has shape \[3, 8\]"):
        ops.lowrank_dropout_down(torch.randn(3, 8), torch.randn(4, 9), s, 0.1)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\), got 1"):
        ops.lowrank_dropout_down(torch.randn(3, 8), torch.randn(4, 8), s, 1.0)
    with pytest.raises(RuntimeError, match=r"seed must be a 0-d int64 CPU tensor, got shape \[1\]"):
        ops.philox_dropout(torch.randn(3), torch.tensor([1]), 0.1)
    with pytest.raises(RuntimeError, match=r"t has shape \[3, 5\]; expected \(3, 4\)"):
        ops.lowrank_dropout_bwd(torch.randn(3, 5), torch.randn(3, 8), torch.randn(4, 8), s, 0.1, None, True)
    with pytest.raises(RuntimeError, match=r"dx has shape \[3, 7\]; expected \(3, 8\) like x"):
        ops.lowrank_dropout_bwd(torch.randn(3, 4), torch.randn(3, 8), torch.randn(4, 8), s, 0.1,
                                torch.zeros(3, 7), True)


# ---------------------------------------------------------------- skinny_t_mm: aᵀ·b over tokens

# (n, r, k): r across the 6-row register tile and its tails (1–5), k across the two-vector, one-
# vector and single-column tiles of both widths (7 < 8 floats, 37, 1031), one token, a token
# count over several 256-token blocks.
T_MM_SHAPES = [(97, 5, 37), (1, 1, 8), (300, 16, 1031), (33, 7, 3), (700, 13, 64), (5, 32, 130)]


@pytest.mark.parametrize("n,r,k", T_MM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_skinny_t_mm_matches_float64(n, r, k, dtype, cpu_width):
    a = rand(n, r, seed=n + r).to(dtype)
    b = rand(n, k + 3, seed=k)[:, 2:k + 2].to(dtype)  # rows with a stride of k + 3: a view
    got = ops.skinny_t_mm(a, b)
    assert got.shape == (r, k) and got.dtype == dtype
    assert_within("aᵀ·b", got, a.double().t() @ b.double(), a.t() @ b, dtype)


def test_skinny_t_mm_does_not_depend_on_the_thread_count():
    """Column chunks per thread; every element sums its tokens in row order."""
    a, b = rand(777, 11, seed=1), rand(777, 1000, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.skinny_t_mm(a, b)
        torch.set_num_threads(2)
        assert torch.equal(ops.skinny_t_mm(a, b), one)
    finally:
        torch.set_num_threads(threads)


def test_skinny_t_mm_edge_sizes_and_errors():
    assert torch.equal(ops.skinny_t_mm(torch.randn(0, 3), torch.randn(0, 5)), torch.zeros(3, 5))
    assert ops.skinny_t_mm(torch.randn(4, 0), torch.randn(4, 5)).shape == (0, 5)
    with pytest.raises(RuntimeError, match=r"skinny_t_mm: a has shape \[4, 2\] and b has shape "
                                           r"\[5, 3\]; expected the same number of rows"):
        ops.skinny_t_mm(torch.randn(4, 2), torch.randn(5, 3))
    with pytest.raises(RuntimeError, match=r"skinny_t_mm: b has dtype Double; expected Float"):
        ops.skinny_t_mm(torch.randn(4, 2), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"skinny_t_mm: a has dtype BFloat16; expected float32 or float64"):
        ops.skinny_t_mm(torch.randn(4, 2).bfloat16(), torch.randn(4, 3).bfloat16())
    with pytest.raises(RuntimeError, match=r"must have unit-stride rows"):
        ops.skinny_t_mm(torch.randn(4, 2), torch.randn(3, 4).t())


def test_native_rank_t_mm_serves_what_the_op_cannot_with_the_torch_form():
    """native_rank_t_mm (the cpp kernels' aᵀ·b): the op for a skinny float a and unit-stride b,
    the torch form for a wider a or a column-strided b — the same numbers."""
    b = rand(50, 9, seed=3).float()
    for a, bb in [(rand(50, 4, seed=1), b), (rand(50, native.SKINNY_T_MM_MAX_RANK + 1, seed=2), b),
                  (rand(50, 4, seed=1), rand(9, 50, seed=4).float().t())]:
        a = a.float()
        got = native.native_rank_t_mm(a, bb)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), a.double().t() @ bb.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- skinny_mm: a·b against a factor

# (n, k, r): r across the two-vector, one-vector, half-vector and single-column tiles of both
# widths (1, 3, 4, 5, 12, 16, 24, 32, 37), n across the 6- and 8-row tiles and their tails, k
# over several 64-step blocks (1031) and k = 1; a row stride of 1024 floats (4 KiB apart, one L1
# set: the 8-row tile's reason).
MM_SHAPES = [(97, 37, 5), (1, 8, 1), (300, 1031, 16), (33, 3, 7), (70, 64, 13), (5, 130, 32),
             (13, 1, 3), (50, 1024, 8), (29, 300, 24), (8, 40, 4), (23, 17, 12), (7, 9, 37)]


@pytest.mark.parametrize("n,k,r", MM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_skinny_mm_matches_float64(n, k, r, dtype, cpu_width):
    a = rand(n, k + 3, seed=n + k)[:, 1:k + 1].to(dtype)  # rows with a stride of k + 3: a view
    b = rand(k, r, seed=r).to(dtype)
    got = ops.skinny_mm(a, b)
    assert got.shape == (n, r) and got.dtype == dtype
    assert_within("a·b", got, a.double() @ b.double(), a @ b, dtype)


def test_skinny_mm_is_as_accurate_as_mkl():
    """The relative error over many products, k from 64 to 2752, at most MKL's: a running sum
    over all of k per element had 1.2× its error at k = 1024 (then a Trainer run of fp32 DoRA,
    whose u = x·Aᵀ it computed, ended one weight beyond the rule)."""
    ours, mkl = [], []
    for i, (n, k, r) in enumerate([(64, 64, 4), (256, 1024, 16), (64, 2752, 8), (100, 777, 13)] * 3):
        a, b = rand(n, k, seed=i).float(), rand(k, r, seed=100 + i).float()
        ref = a.double() @ b.double()
        ours.append(((ops.skinny_mm(a, b).double() - ref).norm() / ref.norm()).item())
        mkl.append((((a @ b).double() - ref).norm() / ref.norm()).item())
    assert sum(ours) <= sum(mkl), (ours, mkl)


def test_skinny_mm_does_not_depend_on_the_thread_count():
    """Row groups per thread; every element sums over k in one order."""
    a, b = rand(777, 1000, seed=1), rand(1000, 11, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.skinny_mm(a, b)
        torch.set_num_threads(2)
        assert torch.equal(ops.skinny_mm(a, b), one)
    finally:
        torch.set_num_threads(threads)


def test_skinny_mm_edge_sizes_and_errors():
    assert torch.equal(ops.skinny_mm(torch.randn(3, 0), torch.randn(0, 5)), torch.zeros(3, 5))
    assert ops.skinny_mm(torch.randn(0, 4), torch.randn(4, 5)).shape == (0, 5)
    assert ops.skinny_mm(torch.randn(3, 4), torch.randn(4, 0)).shape == (3, 0)
    with pytest.raises(RuntimeError, match=r"skinny_mm: a has shape \[4, 2\] and b has shape "
                                           r"\[3, 5\]; expected a's columns to equal b's rows"):
        ops.skinny_mm(torch.randn(4, 2), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match=r"skinny_mm: b has dtype Double; expected Float"):
        ops.skinny_mm(torch.randn(4, 2), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"skinny_mm: a has dtype BFloat16; expected float32 or float64"):
        ops.skinny_mm(torch.randn(4, 2).bfloat16(), torch.randn(2, 3).bfloat16())
    with pytest.raises(RuntimeError, match=r"must have unit-stride rows"):
        ops.skinny_mm(torch.randn(2, 4).t(), torch.randn(2, 3))


def test_native_rank_nt_mm_serves_what_the_op_cannot_with_the_torch_form():
    """native_rank_nt_mm (the cpp kernels' a·bᵀ): the op for float operands and a factor of few
    rows (a column-strided b — Bᵀ — copied), the torch form for a b of more rows or a
    column-strided a — the same numbers."""
    a = rand(50, 9, seed=3).float()
    for aa, b in [(a, rand(4, 9, seed=1)), (a, rand(9, 4, seed=1).t()),
                  (a, rand(max(native.SKINNY_NT_MM_RANKS, default=0) + 1, 9, seed=2)),
                  (rand(9, 50, seed=4).float().t(), rand(4, 9, seed=1))]:
        b = b.float()
        got = native.native_rank_nt_mm(aa, b)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), aa.double() @ b.double().t(), rtol=1e-5, atol=1e-5)


def test_skinny_nt_mm_ranks_follow_the_measured_cpus(monkeypatch, tmp_path):
    """The native skinny_mm serves a·bᵀ where it measured faster than MKL: r ≤ 32 with AVX2,
    never on an AVX-512 Xeon, r = 8-64 on an AVX-512 AMD CPU (5-11× slower than MKL at r ≤ 4
    there); native_rank_nt_mm follows the range."""
    assert native.skinny_nt_mm_ranks("AVX2", "AuthenticAMD") == range(1, 33)
    assert native.skinny_nt_mm_ranks("AVX512", "GenuineIntel") == range(0)
    assert native.skinny_nt_mm_ranks("AVX512", "AuthenticAMD") == range(8, 65)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert native.cpu_vendor(str(info)) == "AuthenticAMD"
    assert native.cpu_vendor(str(tmp_path / "missing")) == ""
    calls = []
    real = ops.skinny_mm

    class Spy:
        def __getattr__(self, name):
            return (lambda *a: calls.append(name) or real(*a)) if name == "skinny_mm" else getattr(ops, name)

    monkeypatch.setattr(native, "ops", Spy())
    a = rand(40, 24, seed=5).float()
    for r, ranks, served in ((8, range(8, 65), True), (4, range(8, 65), False), (8, range(0), False)):
        monkeypatch.setattr(native, "SKINNY_NT_MM_RANKS", ranks)
        calls.clear()
        b = rand(r, 24, seed=6).float()
        torch.testing.assert_close(native.native_rank_nt_mm(a, b).double(), a.double() @ b.double().t(),
                                   rtol=1e-5, atol=1e-5)
        assert calls == (["skinny_mm"] if served else []), (r, ranks)


# ---------------------------------------------------------------- Kronecker / PHM structured apply

# (n, h, (ao, ai), (bo, bi)): LoKr-like (h = 1) and PHM-like (h > 1), ragged and vector-aligned
# factor sides (the kernel pads bi, bo and ai to whole vectors: 16 / 8 floats at 64 / 32 bytes),
# sides that are whole 32-byte but not 64-byte vectors (24, 40), row counts ao·h that leave every
# tail tile of the 8- and 6-row register tiles, one token, a one-element factor.
KRON_SHAPES = [(37, 1, (3, 5), (7, 9)), (70, 1, (32, 16), (32, 32)), (9, 3, (2, 5), (17, 33)),
               (1, 2, (4, 3), (16, 48)), (45, 4, (4, 4), (5, 3)), (5, 1, (1, 1), (6, 4)),
               (41, 1, (13, 24), (8, 40)), (19, 2, (11, 7), (24, 19))]


def _kron_dense(A, B, s):
    return s * sum(torch.kron(A[i], B[i]) for i in range(A.shape[0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,h,a,b", KRON_SHAPES)
@pytest.mark.parametrize("x_dtype,acc", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                         (torch.bfloat16, torch.float32)])
def test_kronecker_apply_matches_dense(device, n, h, a, b, x_dtype, acc, cpu_width):
    s = 0.7
    x = rand(n, a[1] * b[1], seed=1).to(device=device, dtype=x_dtype)
    A = rand(h, *a, seed=2).to(device=device, dtype=acc)
    B = rand(h, *b, seed=3).to(device=device, dtype=acc)
    gy = rand(n, a[0] * b[0], seed=4).to(device=device, dtype=x_dtype)
    y0 = rand(n, a[0] * b[0], seed=5).to(device=device, dtype=x_dtype)
    dW64, dW = _kron_dense(A.double(), B.double(), s), _kron_dense(A, B, s)

    y = y0.clone()
    ops.kronecker_apply_acc(y, x, A, B, s)
    assert_within("y += x·ΔWᵀ", y, y0.double() + x.double() @ dW64.t(),
                  (y0.to(acc) + x.to(acc) @ dW.t()).to(x_dtype), x_dtype)

    dx0 = rand(n, a[1] * b[1], seed=6).to(device=device, dtype=x_dtype)
    dx = dx0.clone()
    dA, dB = ops.kronecker_apply_bwd(gy, x, A, B, s, dx, True, True)
    assert_within("dx += gy·ΔW", dx, dx0.double() + gy.double() @ dW64,
                  (dx0.to(acc) + gy.to(acc) @ dW).to(x_dtype), x_dtype)
    # dA, dB: the chain rule through ΔW = s·Σ Aₕ ⊗ Bₕ from dΔW = gyᵀ·x, in float64 and in acc
    grads = {}
    for dt in (torch.float64, acc):
        Ad, Bd = A.to(dt).requires_grad_(), B.to(dt).requires_grad_()
        dWg = gy.to(dt).t() @ x.to(dt)
        grads[dt] = torch.autograd.grad(_kron_dense(Ad, Bd, s), (Ad, Bd), dWg)
    assert_within("dA", dA, grads[torch.float64][0], grads[acc][0], acc)
    assert_within("dB", dB, grads[torch.float64][1], grads[acc][1], acc)

    # each output alone, and nothing asked for
    dx2 = dx0.clone()
    dA2, dB2 = ops.kronecker_apply_bwd(gy, x, A, B, s, dx2, False, False)
    assert dA2.numel() == 0 and dB2.numel() == 0
    torch.testing.assert_close(dx2, dx, rtol=0, atol=0)
    dA3, dB3 = ops.kronecker_apply_bwd(gy, x, A, B, s, None, True, False)
    torch.testing.assert_close(dA3, dA)
    assert dB3.numel() == 0


def test_kronecker_forward_and_dx_are_bit_identical_across_cpu_widths(monkeypatch):
    """Each output element of y and dx is one dot product summed in the same order at either
    width (the width changes the padding with zeros and which elements share a register tile);
    dA and dB sum over tokens in token tiles whose size follows the padding: equal to rounding."""
    n, h, (ao, ai), (bo, bi) = 67, 2, (5, 13), (11, 27)
    x, gy = rand(n, ai * bi, seed=41).float(), rand(n, ao * bo, seed=42).float()
    A, B = rand(h, ao, ai, seed=43).float(), rand(h, bo, bi, seed=44).float()
    got = {}
    for width in ("32", "64"):
        monkeypatch.setenv("PYPEFT_FAST_CPU_VECTOR_BYTES", width)
        y, dx = torch.zeros(n, ao * bo), torch.zeros(n, ai * bi)
        ops.kronecker_apply_acc(y, x, A, B, 0.3)
        got[width] = (y, dx) + tuple(ops.kronecker_apply_bwd(gy, x, A, B, 0.3, dx, True, True))
    assert torch.equal(got["32"][0], got["64"][0]) and torch.equal(got["32"][1], got["64"][1])
    for i, name in ((2, "dA"), (3, "dB")):
        torch.testing.assert_close(got["32"][i], got["64"][i], rtol=1e-5, atol=1e-5, msg=name)


def test_kronecker_apply_accepts_strided_activations(cpu_width):
    x = rand(40, 64, seed=1).float().t().contiguous().t()  # column-major: converted per block
    A, B = rand(1, 4, 8, seed=2).float(), rand(1, 8, 8, seed=3).float()
    y = torch.zeros(40, 32)
    ops.kronecker_apply_acc(y, x, A, B, 1.0)
    torch.testing.assert_close(y, x @ _kron_dense(A, B, 1.0).t(), rtol=1e-5, atol=1e-5)


def test_kronecker_ops_name_the_bad_argument_and_shapes():
    A, B = torch.randn(2, 3, 4), torch.randn(2, 5, 6)
    with pytest.raises(RuntimeError, match=r"kronecker_apply_acc: x has shape \[7, 23\]; expected \(n, 24\)"):
        ops.kronecker_apply_acc(torch.zeros(7, 15), torch.randn(7, 23), A, B, 1.0)
    with pytest.raises(RuntimeError, match=r"kronecker_apply_acc: y has shape \[7, 14\]; expected \(7, 15\)"):
        ops.kronecker_apply_acc(torch.zeros(7, 14), torch.randn(7, 24), A, B, 1.0)
    with pytest.raises(RuntimeError, match=r"B has shape \[3, 5, 6\] but A has shape \[2, 3, 4\]; expected the same number"):
        ops.kronecker_apply_acc(torch.zeros(7, 15), torch.randn(7, 24), A, torch.randn(3, 5, 6), 1.0)
    with pytest.raises(RuntimeError, match=r"A has dtype BFloat16; expected float32 or float64"):
        ops.kronecker_apply_acc(torch.zeros(7, 15), torch.randn(7, 24), A.bfloat16(), B, 1.0)
    with pytest.raises(RuntimeError, match=r"kronecker_apply_bwd: dx has shape \[7, 20\]; expected \(7, 24\)"):
        ops.kronecker_apply_bwd(torch.randn(7, 15), torch.randn(7, 24), A, B, 1.0, torch.zeros(7, 20), True, True)


# ---------------------------------------------------------------- Hadamard's dense-form passes

# (out, in, r1, r2): in across the two-vector, one-vector, half-vector and single-column tiles of
# both widths (129 = 4·32 + 1, 70, 33, 13, 1); out across the 3/6/8-row tiles, their tails and
# several 48-row blocks (101); r1 ≠ r2, rank 1.
HADAMARD_SHAPES = [(7, 13, 3, 5), (37, 70, 1, 2), (101, 33, 16, 16), (96, 129, 8, 4), (1, 1, 2, 1),
                   (50, 1024, 4, 3)]


def _hadamard_factors(out, in_, r1, r2, dtype, seed):
    return [rand(*shape, seed=seed + k).to(dtype)
            for k, shape in enumerate(((out, r1), (r1, in_), (out, r2), (r2, in_)))]


@pytest.mark.parametrize("out,in_,r1,r2", HADAMARD_SHAPES)
@pytest.mark.parametrize("w_dtype,f_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32),
                                             (torch.float64, torch.float64),
                                             (torch.float32, torch.float64)])
def test_hadamard_weight_matches_float64(out, in_, r1, r2, w_dtype, f_dtype, cpu_width):
    W = rand(out, in_ + 2, seed=out)[:, 1:in_ + 1].to(w_dtype)  # strided rows: a view
    f = _hadamard_factors(out, in_, r1, r2, f_dtype, seed=in_)
    got = ops.hadamard_weight(W, *f, 0.7)
    ref = W.double() + 0.7 * (f[0].double() @ f[1].double()) * (f[2].double() @ f[3].double())
    base = (W.to(f_dtype) + 0.7 * (f[0] @ f[1]) * (f[2] @ f[3])).to(w_dtype)
    assert_within("W + s·M1⊙M2", got, ref, base, w_dtype)


@pytest.mark.parametrize("out,in_,r1,r2", HADAMARD_SHAPES + [(200, 40, 5, 6)])  # 3 row blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hadamard_factor_grads_match_float64(out, in_, r1, r2, dtype, cpu_width):
    G = rand(out, in_ + 3, seed=out + 1)[:, 2:in_ + 2].to(dtype)  # strided rows: a view
    f = _hadamard_factors(out, in_, r1, r2, dtype, seed=in_ + 1)
    F = [t.double() for t in f]
    G1, G2 = G.double() * (F[2] @ F[3]), G.double() * (F[0] @ F[1])
    refs = (G1 @ F[1].t(), F[0].t() @ G1, G2 @ F[3].t(), F[2].t() @ G2)
    b1, b2 = G * (f[2] @ f[3]), G * (f[0] @ f[1])
    bases = (b1 @ f[1].t(), f[0].t() @ b1, b2 @ f[3].t(), f[2].t() @ b2)
    got = ops.hadamard_factor_grads(G, *f)
    for name, g, ref, base in zip(("dW1a", "dW1b", "dW2a", "dW2b"), got, refs, bases):
        assert_within(name, g, ref, base, dtype)


def test_hadamard_ops_do_not_depend_on_the_thread_count():
    W, f = rand(300, 70, seed=3).float(), _hadamard_factors(300, 70, 8, 8, torch.float32, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.hadamard_weight(W, *f, 0.5)
        grads = ops.hadamard_factor_grads(W, *f)
        torch.set_num_threads(2)
        assert torch.equal(ops.hadamard_weight(W, *f, 0.5), one)
        assert all(torch.equal(a, b) for a, b in zip(ops.hadamard_factor_grads(W, *f), grads))
    finally:
        torch.set_num_threads(threads)


def test_hadamard_ops_errors():
    f = _hadamard_factors(6, 5, 2, 3, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=r"hadamard_weight: W1a \[6, 2\], W1b \[2, 5\], W2a \[6, 3\], "
                                           r"W2b \[3, 5\] do not match W \[6, 4\]"):
        ops.hadamard_weight(torch.randn(6, 4), *f, 1.0)
    with pytest.raises(RuntimeError, match=r"hadamard_weight: W1b has dtype Double; expected Float"):
        ops.hadamard_weight(torch.randn(6, 5), f[0], f[1].double(), f[2], f[3], 1.0)
    with pytest.raises(RuntimeError, match=r"hadamard_factor_grads: G has dtype BFloat16; expected Float"):
        ops.hadamard_factor_grads(torch.randn(6, 5).bfloat16(), *f)
    empty = ops.hadamard_factor_grads(torch.randn(0, 5), torch.randn(0, 2), f[1], torch.randn(0, 3), f[3])
    assert [tuple(g.shape) for g in empty] == [(0, 2), (2, 5), (0, 3), (3, 5)]
    assert not empty[1].any() and not empty[3].any()
    assert ops.hadamard_weight(torch.randn(0, 5), torch.randn(0, 2), f[1], torch.randn(0, 3), f[3], 1.0).shape == (0, 5)


# ---------------------------------------------------------------- gemm_bf16_f32

@pytest.mark.skipif(not native.BUILD_INFO.get("mkl_gemm_bf16_f32"), reason="torch without MKL's bf16 GEMM")
@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (1, 9, 4), (33, 1, 2), (130, 257, 61)])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "strided"])
def test_gemm_bf16_f32_sums_exact_products_in_float32(m, k, n, layout):
    a, b = rand(m, k, seed=m).bfloat16(), rand(k, n, seed=n).bfloat16()
    if layout == "tn":
        a = a.t().contiguous().t()
    elif layout == "nt":
        b = b.t().contiguous().t()
    elif layout == "strided":
        a = rand(m, 2 * k, seed=1).bfloat16()[:, ::2]  # neither layout BLAS reads: copied
    got = ops.gemm_bf16_f32(a, b, 0.5)
    ref = 0.5 * (a.double() @ b.double())
    # float32 sums of exact products: the float32 GEMM of the upcast operands is the baseline
    assert_within("a·b", got, ref, 0.5 * (a.float() @ b.float()), torch.float32)
    # and nothing was rounded to bf16 (the bf16 GEMM's error is ~100x larger)
    if k > 1:
        assert (got.double() - ref).abs().max() < 1e-2 * (0.5 * (a @ b)).double().sub(ref).abs().max() + 1e-6


@pytest.mark.skipif(not native.BUILD_INFO.get("mkl_gemm_bf16_f32"), reason="torch without MKL's bf16 GEMM")
@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (1, 9, 4), (33, 1, 2), (130, 257, 61), (1000, 300, 16)])
@pytest.mark.parametrize("split", ["a", "b"])
@pytest.mark.parametrize("layout", ["nn", "t", "strided"])
def test_gemm_bf16_f32_splits_a_float32_operand_exactly(m, k, n, split, layout):
    """One float32 operand (bf16x3: three exact bf16 parts): the float32 GEMM's accuracy, not
    bf16's, for any layout of that operand."""
    a, b = rand(m, k, seed=m + 1).float(), rand(k, n, seed=n + 2).float()
    a, b = (a, b.bfloat16()) if split == "a" else (a.bfloat16(), b)
    f = a if split == "a" else b
    if layout == "t":
        f = f.t().contiguous().t()
    elif layout == "strided":
        f = torch.cat([f, f], 1)[:, ::2]
    a, b = (f, b) if split == "a" else (a, f)
    got = ops.gemm_bf16_f32(a, b, 0.5)
    assert got.shape == (m, n) and got.dtype == torch.float32 and got.is_contiguous()
    ref = 0.5 * (a.double() @ b.double())
    assert_within("a·b", got, ref, 0.5 * (a.float() @ b.float()), torch.float32)
    if k > 1:  # the float32 operand was not rounded to bf16 (that error is ~100x larger)
        rounded = 0.5 * (a.bfloat16().double() @ b.bfloat16().double())
        assert (got.double() - ref).abs().max() < 1e-2 * (rounded - ref).abs().max() + 1e-6


@pytest.mark.skipif(not native.BUILD_INFO.get("mkl_gemm_bf16_f32"), reason="torch without MKL's bf16 GEMM")
def test_gemm_bf16_f32_split_keeps_infinities_and_extremes():
    """A non-finite float32 entry stays in the first part (inf − inf would make NaN), and a
    value near float32's maximum is truncated, not rounded up to infinity."""
    a = rand(6, 5, seed=3).abs().add_(0.5).bfloat16()  # positive: a·inf = inf
    b = rand(5, 4, seed=4).float()
    b[1, 2], b[3, 0], b[0, 3] = float("inf"), -float("inf"), 3.3e38 / 8
    got = ops.gemm_bf16_f32(a, b)
    want = a.double() @ b.double()
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not torch.isnan(got).any()
    assert torch.equal(got[:, 2][torch.isinf(want[:, 2])], want[:, 2][torch.isinf(want[:, 2])].float())
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-6, atol=1e-6)


def test_bf16x3_serves_bf16_activations_with_float32_factors_where_the_bf16_gemm_is_fast(monkeypatch):
    x, f32 = torch.randn(4, 3).bfloat16(), torch.float32
    monkeypatch.setattr(native, "GEMM_BF16_F32_FAST", True)
    assert native.bf16x3_serves(x, f32)
    assert not native.bf16x3_serves(x, torch.float64)      # 3 × 8 bits hold float32, not float64
    assert not native.bf16x3_serves(x.half(), f32)         # MKL's kernel is bf16's
    assert not native.bf16x3_serves(x.float(), f32)
    monkeypatch.setattr(native, "GEMM_BF16_F32_FAST", False)
    assert not native.bf16x3_serves(x, f32)                # without AMX: the float32 rate, × 3


@pytest.mark.skipif(not native.BUILD_INFO.get("mkl_gemm_bf16_f32"), reason="torch without MKL's bf16 GEMM")
@pytest.mark.parametrize("n,k,r", [(37, 130, 8), (300, 257, 16), (5, 64, 3)])
def test_mixed_rank_products_by_bf16x3_match_the_native_kernels(monkeypatch, n, k, r):
    """The rank products of a bf16 activation with float32 operands (u = x·Aᵀ, dA = tᵀ·x) by
    bf16x3 and by the native mixed kernels: both float32 sums of exact products."""
    x, A, t = rand(n, k, seed=n).bfloat16(), rand(r, k, seed=r).float(), rand(n, r, seed=k).float()
    got = {}
    for fast in (True, False):
        monkeypatch.setattr(native, "GEMM_BF16_F32_FAST", fast)
        got[fast] = native.mixed_rank_nt_mm(x, A), native.mixed_rank_t_mm(t, x)
    refs = (x.double() @ A.double().t(), t.double().t() @ x.double())
    for name, g3, gn, ref in zip(("x·Aᵀ", "tᵀ·x"), got[True], got[False], refs):
        assert g3.dtype == torch.float32
        assert_within(name + " (bf16x3)", g3, ref, gn, torch.float32)


@pytest.mark.skipif(not native.BUILD_INFO.get("mkl_gemm_bf16_f32"), reason="torch without MKL's bf16 GEMM")
def test_gemm_bf16_f32_edges_and_errors():
    assert torch.equal(ops.gemm_bf16_f32(torch.randn(3, 0).bfloat16(), torch.randn(0, 4).bfloat16()),
                       torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match=r"gemm_bf16_f32: b has dtype Double; expected BFloat16 "
                                           r"\(or Float for one operand\)"):
        ops.gemm_bf16_f32(torch.randn(3, 2).bfloat16(), torch.randn(2, 4).double())
    with pytest.raises(RuntimeError, match=r"gemm_bf16_f32: a and b are both Float"):
        ops.gemm_bf16_f32(torch.randn(3, 2), torch.randn(2, 4))
    assert torch.equal(ops.gemm_bf16_f32(torch.randn(3, 0), torch.randn(0, 4).bfloat16()),
                       torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match=r"gemm_bf16_f32: a \[3, 2\] and b \[3, 4\] do not chain"):
        ops.gemm_bf16_f32(torch.randn(3, 2).bfloat16(), torch.randn(3, 4).bfloat16())


def test_gemm_bf16_f32_fast_only_where_measured():
    assert native.gemm_bf16_f32_fast(True, True)
    assert not native.gemm_bf16_f32_fast(True, False)   # the AVX512-BF16 EPYC: float32 rate
    assert not native.gemm_bf16_f32_fast(False, True)   # no MKL in this torch


# ---------------------------------------------------------------- opcheck on every op


def _opcheck_cases():
    layout, vals, _ = _sparse_case(13, 11, 9, 0.3, seed=9)
    v = vals[layout.csr_perm].float()
    x, gy = torch.randn(13, 11), torch.randn(13, 9)
    s = torch.tensor(42)
    A, t = torch.randn(3, 11), torch.randn(13, 3)
    ctr = torch.randint(0, 2**32, (5, 4), dtype=torch.int64)
    KA, KB = torch.randn(2, 5, 2), torch.randn(2, 7, 11)
    return {
        "sparse_spmm_csr_t": (layout.row_ptr, layout.csr_col, v, 11, x),
        "sparse_spmm_csr_t_acc": (torch.randn(13, 9), layout.row_ptr, layout.csr_col, v, x),
        "sparse_sddmm_csr": (layout.row_ptr, layout.csr_col, gy, x),
        "philox4x32_10": (ctr, torch.tensor([7, 9], dtype=torch.int64)),
        "philox_keep_mask": (s, 100, 0.2, 3),
        "philox_dropout": (x.bfloat16(), s, 0.2, torch.float32),
        "lowrank_dropout_down": (x, A, s, 0.2),
        "lowrank_dropout_bwd": (t, x, A, s, 0.2, torch.randn(13, 11), True),
        "dora_scale_epilogue": (torch.randn(13, 9).bfloat16(), t, torch.randn(9, 3), 0.5,
                                torch.rand(9) + 0.5, torch.randn(9)),
        "dora_grad_prologue": (gy, torch.rand(9) + 0.5, torch.randn(13, 9)),
        "skinny_t_mm": (t, x),
        "skinny_mm": (x, torch.randn(11, 3)),
        "kronecker_apply_acc": (torch.randn(13, 35), torch.randn(13, 22), KA, KB, 0.5),
        "kronecker_apply_bwd": (torch.randn(13, 35), torch.randn(13, 22), KA, KB, 0.5,
                               torch.randn(13, 22), True, True),
        "gemm_bf16_f32": (x.bfloat16().t(), gy.bfloat16(), 0.5),
        "hadamard_weight": (torch.randn(9, 11).bfloat16(), *_hadamard_factors(9, 11, 2, 3, torch.float32, 5), 0.5),
        "hadamard_factor_grads": (torch.randn(9, 11), *_hadamard_factors(9, 11, 2, 3, torch.float32, 6)),
    }


def test_opcheck_covers_every_op():
    from pypeft_fast import _ops
    assert set(_opcheck_cases()) == set(_ops.SCHEMAS)


@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck(name):
    torch.library.opcheck(getattr(ops, name).default, _opcheck_cases()[name])


def test_opcheck_bwd_without_dx():
    s = torch.tensor(42)
    torch.library.opcheck(ops.lowrank_dropout_bwd.default,
                          (torch.randn(6, 2), torch.randn(6, 5), torch.randn(2, 5), s, 0.5, None, True))


# ---------------------------------------------------------------- build info and registration


def test_build_info_matches_the_running_torch():
    info = native._C.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["abi"] == native._ops.ABI_VERSION
    assert info["with_cuda"] == native.WITH_CUDA
    assert info["openmp"] == torch.backends.openmp.is_available()
    if info["with_cuda"]:
        assert info["cuda_version"] == torch.version.cuda and info["cuda_archs"]


def test_every_op_is_defined_once_in_python_and_implemented_in_cpp():
    """_ops.SCHEMAS is the one definition: the dispatcher holds exactly these schemas, each with
    a C++ CPU kernel, and no C++ kernel lacks a schema; defining again is a no-op."""
    from pypeft_fast import _ops
    for name, schema in _ops.SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == f"pypeft_fast::{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pypeft_fast::{name}", "CPU"), name
    assert not [d for d in torch._C._dispatch_find_dangling_impls() if "pypeft_fast::" in d]
    _ops.define_ops()


def test_cpp_backend_is_registered_and_probed():
    from pypeft_fast import registry
    for family in ("sparse", "lowrank"):
        assert registry.why_unavailable(family, "cpp", torch.device("cpu")) is None
        assert "CPU tensors" in registry.why_unavailable(family, "cpp", torch.device("cuda"))
    if not native.WITH_CUDA:
        assert "not built with CUDA" in registry.why_unavailable("sparse", "cuda", torch.device("cuda"))


@pytest.mark.parametrize("family", ["sparse", "lowrank", "kronecker"])
def test_cpp_backend_compiles_fullgraph(family):
    """torch.compile(fullgraph=True) through the native ops (their fakes), same numbers as eager."""
    import pypeft_fast as pf
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    W = torch.randn(35, 24, generator=g)
    flat = torch.randperm(35 * 24, generator=g)[:50]
    idx = torch.stack([flat // 24, flat % 24])
    if family == "sparse":
        P = [torch.randn(50, generator=g)]
        call = lambda x, P: pf.sparse_linear(x, W, None, P[0], idx, 0.5, backend="cpp")  # noqa: E731
    elif family == "kronecker":  # 35 = 5·7, 24 = 4·6
        P = [torch.randn(5, 4, generator=g), torch.randn(7, 6, generator=g)]
        call = lambda x, P: pf.kronecker_linear(x, W, None, *P, 0.5, backend="cpp")  # noqa: E731
    else:
        P = [torch.randn(3, 24, generator=g), torch.randn(35, 3, generator=g)]
        call = lambda x, P: pf.lowrank_linear(x, W, None, *P, 0.5, 0.2, torch.tensor(9), backend="cpp")  # noqa: E731
    x = torch.randn(3, 5, 24, generator=g)

    def run(fn):
        xs = x.clone().requires_grad_(True)
        Ps = [p.clone().requires_grad_(True) for p in P]
        y = fn(xs, Ps)
        y.square().sum().backward()
        return [y.detach(), xs.grad] + [p.grad for p in Ps]

    for a, b in zip(run(call), run(torch.compile(call, fullgraph=True, backend="aot_eager"))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kron_cpp_backend_routes_by_factor_layout(monkeypatch):
    """Dense B up to MAX_B_ELEMENTS runs the native op; rank-k (S, T) factors with A folded
    (``folds_A``) run the folded kernels' skinny products natively; a larger B stack and
    factors kept factored that do not fold are declined: backend="cpp" raises, "auto" (were cpp
    its choice) runs the torch path's kernels, no native op (both exact: the family tests check
    the numbers)."""
    import pypeft_fast as pf
    from pypeft_fast import registry
    from pypeft_fast.families import kronecker
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(torch.ops.pypeft_fast, name)

    monkeypatch.setattr(native, "ops", Spy())
    W = torch.randn(24, 30)
    x = torch.randn(5, 30, requires_grad=True)
    pf.phm_linear(x, W, None, torch.randn(2, 3, 5, requires_grad=True),
                  torch.randn(2, 8, 6, requires_grad=True), 0.5, "cpp").sum().backward()
    assert calls == ["kronecker_apply_acc", "kronecker_apply_bwd"]
    calls.clear()
    monkeypatch.setattr(registry.FAMILIES["phm"].backends["cpp"], "auto", True)
    factored = (torch.randn(2, 8, 1, requires_grad=True), torch.randn(2, 1, 6, requires_grad=True))
    pf.phm_linear(x, W, None, torch.randn(2, 3, 5, requires_grad=True), factored, 0.5,
                  "cpp").sum().backward()  # folds: a_out·h·k = 3·2·1 = 6
    assert "skinny_t_mm" in calls and "kronecker_apply_acc" not in calls
    calls.clear()
    monkeypatch.setattr(kronecker, "FOLD_MAX_RANK", 0)  # the same factors, not folded
    factored = tuple(t.detach() for t in factored)
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot serve B as rank-1 factors"):
        pf.phm_linear(x, W, None, torch.randn(2, 3, 5), factored, 0.5, "cpp")
    pf.phm_linear(x, W, None, torch.randn(2, 3, 5), factored, 0.5, "auto").sum().backward()
    assert calls == []
    monkeypatch.setattr(native.NativeKronecker, "MAX_B_ELEMENTS", 2 * 8 * 6 - 1)
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot serve a B stack of 96 elements"):
        pf.phm_linear(x, W, None, torch.randn(2, 3, 5), torch.randn(2, 8, 6), 0.5, "cpp")
    pf.phm_linear(x, W, None, torch.randn(2, 3, 5), torch.randn(2, 8, 6), 0.5, "auto").sum().backward()
    assert calls == []


def test_auto_uses_the_native_kernels_where_they_were_measured_faster():
    """With 32-byte vectors on AVX2 the native sparse and Kronecker kernels measured faster
    than the torch path there too (with 64-byte ones they lost 2x and 20-80x): auto picks
    them on AVX-512 and AVX2, lowrank only elsewhere; explicit backend="cpp" always runs."""
    native = pytest.importorskip("pypeft_fast.native")
    assert native.cpp_auto_families("AVX512") == {"lowrank", "sparse", "kronecker", "phm", "hadamard"}
    assert native.cpp_auto_families("AVX2") == {"lowrank", "sparse", "kronecker", "phm", "hadamard"}
    assert native.cpp_auto_families("DEFAULT") == {"lowrank"}
    from pypeft_fast import registry
    expected = native.cpp_auto_families(torch.backends.cpu.get_cpu_capability())
    for family in ("lowrank", "sparse", "kronecker", "phm", "hadamard"):
        name, _ = registry.resolve(family, "auto", torch.device("cpu"))
        assert (name == "cpp") == (family in expected), (family, name)
        assert registry.resolve(family, "cpp", torch.device("cpu"))[0] == "cpp"


@pytest.mark.parametrize("threads", [1, 2])
def test_dora_grad_prologue_column_sums_do_not_drift_over_many_rows(threads):
    """Σᵢ gyᵢ and Σᵢ gyᵢ ⊙ yᵢ over 8 K rows: a running float32 sum drifts by ≈ n·ε (it failed
    the tolerance rule for DoRA's magnitude gradient at 4096 tokens, bench/test_kernels.py's
    bert-base/query case); the prologue's two-level sums stay within 2× torch's column sums'
    error. Positive inputs make the drift systematic."""
    g = torch.Generator().manual_seed(11)
    n, out = 8192 + 37, 19
    gy = torch.rand(n, out, generator=g) + 0.5
    y = torch.rand(n, out, generator=g) + 0.5
    c = torch.rand(out, generator=g) + 0.5
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scaled, colsum, coldot = ops.dora_grad_prologue(gy, c, y)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(scaled, c * gy)
    assert_within("colsum", colsum, gy.double().sum(0), gy.sum(0), torch.float32)
    assert_within("coldot", coldot, (gy.double() * y.double()).sum(0), (gy * y).sum(0), torch.float32)


def test_row_loop_ops_on_column_strided_views_equal_the_contiguous_inputs():
    """The CPU row loops walk unit-stride rows (common/rows.h): a transposed view is read from a
    copy, and an in-place output (DoRA's y, the dropout path's dx) is updated in a copy that is
    written back into the caller's view — the same numbers as with contiguous tensors."""
    n, k, out, r, p, s = 37, 23, 29, 5, 0.3, torch.tensor(9)
    g = torch.Generator().manual_seed(3)

    def tview(rows, cols):  # (rows, cols) with column stride rows: a transposed view
        return torch.randn(cols, rows, generator=g).t()

    x, dx, y, gy = tview(n, k), tview(n, k), tview(n, out), tview(n, out)
    A, t = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    u, B, c, sh = torch.randn(n, r, generator=g), torch.randn(out, r, generator=g), torch.rand(out) + 0.5, torch.randn(out)
    assert not x.is_contiguous()
    assert torch.equal(ops.lowrank_dropout_down(x, A, s, p), ops.lowrank_dropout_down(x.contiguous(), A, s, p))
    dx_c = dx.contiguous()
    dA = ops.lowrank_dropout_bwd(t, x, A, s, p, dx, True)
    dA_c = ops.lowrank_dropout_bwd(t, x.contiguous(), A, s, p, dx_c, True)
    assert torch.equal(dA, dA_c) and torch.equal(dx, dx_c) and not dx.is_contiguous()
    y_c = y.contiguous()
    ops.dora_scale_epilogue(y, u, B, 0.7, c, sh)
    ops.dora_scale_epilogue(y_c, u, B, 0.7, c, sh)
    assert torch.equal(y, y_c) and not y.is_contiguous()
    for got, want in zip(ops.dora_grad_prologue(gy, c, y), ops.dora_grad_prologue(gy.contiguous(), c, y_c)):
        assert torch.equal(got, want)
