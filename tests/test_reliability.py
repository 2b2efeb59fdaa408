"""Reliability defects found by an adversarial pass (issue 12), one test group per defect.

1. int32 offsets in the Triton kernels: every operand (inputs, outputs, temporaries) is checked;
2. the dropout seed is copied at forward; 3. SHiRA under inference_mode; 4. patched / injected
models pickle; 5. adapter files are untrusted input; 6. scaling / dropout validation;
7. the smaller ones (bias-gradient precision, indices mutated in place, seed range, malformed
adapter configs, backend names in adapter files, deterministic algorithms).
"""
import pytest
import torch

from pypeft_fast import registry

TRITON_CPU = registry.why_unavailable("lowrank", "triton", torch.device("cpu")) is None
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason="Triton interpreter unavailable")


# ---------------------------------------------------------------------------------------------
# 1. int32 offsets in the Triton kernels
# ---------------------------------------------------------------------------------------------

@needs_triton
def test_element_span_of_shapes_and_strides():
    from pypeft_fast.kernels._utils import element_span
    assert element_span((3, 5), (5, 1)) == 15
    assert element_span((5, 3), (1, 5)) == 15            # transposed view
    assert element_span((4, 6), (12, 1)) == 42           # row-strided view: reaches 3·12 + 5 + 1
    assert element_span((1000, 7), (0, 1)) == 7000        # expanded: its sizes still bound offsets
    assert element_span((0, 7), (7, 1)) == 0


@needs_triton
def test_llama_up_proj_at_150k_tokens_raises_naming_the_output():
    """The issue's case: x (150000, 4096) passes an x/weight-only check, y (150000, 14336) has
    2.15e9 elements. Expanded (stride-0) inputs: nothing of that size is allocated."""
    from pypeft_fast.kernels.lowrank import lowrank_fwd
    n, k, o, r = 150_000, 4096, 14336, 8
    x = torch.zeros(1, k).expand(n, k)
    w = torch.zeros(1, k).expand(o, k)
    A, B = torch.zeros(r, k), torch.zeros(o, r)
    with pytest.raises(ValueError, match=r"lowrank_fwd: y of shape \(150000, 14336\)"):
        lowrank_fwd(x, w, None, A, B, None, 1.0, 0.0)


def _lowrank(n, k, o, r, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=dtype) for s in ((n, k), (o, k), (r, k), (o, r))]


def _lowrank_fwd_case():
    from pypeft_fast.kernels.lowrank import lowrank_fwd
    x, w, A, B = _lowrank(50, 2, 3, 40)  # u (50, 40) is the largest operand: a temporary
    return lambda: lowrank_fwd(x, w, None, A, B, None, 1.0, 0.0)


def _lowrank_fwd_y_case():
    from pypeft_fast.kernels.lowrank import lowrank_fwd
    x, w, A, B = _lowrank(100, 8, 300, 2)  # y (100, 300)
    return lambda: lowrank_fwd(x, w, None, A, B, None, 1.0, 0.0)


def _lowrank_bwd_case():
    from pypeft_fast.kernels.lowrank import lowrank_bwd
    x, w, A, B = _lowrank(50, 2, 3, 40)
    gy, u = torch.randn(50, 3), torch.randn(50, 40)
    return lambda: lowrank_bwd(gy, x, w, A, B, u, None, 1.0, 0.0, False, True, True)


def _kron_case(bwd):
    from pypeft_fast.kernels.kronecker import kron_sum_bwd, kron_sum_fwd
    # h = 1, A (1, 8, 1), B (1, 1, 4): in 4, out 8; U (n, 8, 1, 4) is 4× y and 8× x
    n = 50
    x, w = torch.randn(n, 4), torch.randn(8, 4)
    A, B = torch.randn(1, 8, 1), torch.randn(1, 1, 4)
    if bwd:
        gy = torch.randn(n, 8)
        return lambda: kron_sum_bwd(gy, x, w, A, B, 1.0, False, False, True)
    return lambda: kron_sum_fwd(x, w, None, A, B, 1.0)


def _sparse_case():
    from pypeft_fast.kernels.sparse import sparse_fwd
    x, w = torch.randn(100, 8), torch.randn(300, 8)
    values = torch.randn(1)
    row_ptr = torch.zeros(301, dtype=torch.int64)
    row_ptr[1:] = 1
    col = torch.zeros(1, dtype=torch.int64)
    return lambda: sparse_fwd(x, w, None, values, col.clone(), row_ptr, col, 1.0)


@needs_triton
@pytest.mark.parametrize("case, limit, op, operand", [
    (_lowrank_fwd_y_case, 5000, "lowrank_fwd", "y"),
    (_lowrank_fwd_case, 1000, "lowrank_fwd", "u"),
    (_lowrank_bwd_case, 1000, "lowrank_bwd", "u"),
    (lambda: _kron_case(False), 1000, "kron_sum_fwd", "U"),
    (lambda: _kron_case(True), 1000, "kron_sum_bwd", "U"),
    (_sparse_case, 5000, "sparse_fwd", "y"),
])
def test_every_kernel_operand_is_bounds_checked(monkeypatch, case, limit, op, operand):
    """With the int32 limit lowered, the launcher must refuse the operand that exceeds it —
    outputs and temporaries included, not only x and the weight — naming op and operand."""
    from pypeft_fast.kernels import _utils
    run = case()
    run()  # under the real limit it runs
    monkeypatch.setattr(_utils, "INT32_OFFSET_LIMIT", limit, raising=False)
    with pytest.raises(ValueError, match=rf"^{op}.*: {operand} of shape"):
        run()
