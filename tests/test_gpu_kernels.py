"""CUDA tests (``-m cuda``; skipped without a GPU): every family × (triton, cuda) × dtype on CUDA
tensors against float64, and the dropout mask bit for bit against the CPU definition.

The cases are the family tests' own (``tests/test_<family>.py``: ``CASES``, ragged shapes, every
factor random; numerics.declared_cases), run through ``numerics.check_case(..., device="cuda")``: the op on the GPU, the
float64 reference and the plain-PyTorch baseline of the tolerance rule on the CPU. Run on a lent
GPU by ``scripts/gpu_check.sh`` (with TRITON_INTERPRET=0, so Triton compiles for the device).
A backend that cannot serve a case (a DoRA variant on a backend without variants) is skipped
with its reason; a backend that is not built is skipped with the registry's reason.
"""
import os

import pytest
import torch

from pypeft_fast import registry
from pypeft_fast.philox import keep_mask
from numerics import DTYPE_CASES, check_case, declared_cases

# PYPEFT_FAST_GPU_TESTS_DEVICE=cpu (scripts/gpu_check.sh --dry-run) runs this file's code paths
# on CPU tensors with the backends a CPU has (triton under its interpreter, cpp), so the file
# is exercised where no GPU is; the real run is on "cuda" with triton and cuda.
DEVICE = os.environ.get("PYPEFT_FAST_GPU_TESTS_DEVICE", "cuda")
GPU_BACKENDS = ("triton", "cuda") if DEVICE == "cuda" else ("triton", "cpp")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU")]

# variant -> (registry family, case builder): every declared family's own CASES
# (tests/test_<family>.py), read through numerics.declared_cases.
CASES = declared_cases()


def _builder(variant):
    family, build = CASES[variant]
    if family not in registry.FAMILIES:
        pytest.skip(f"family {family!r} is not registered in this build")
    return family, build


@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("variant", list(CASES))
def test_family_on_cuda_matches_float64(variant, backend, dtype_case):
    family, build = _builder(variant)
    why = registry.why_unavailable(family, backend, torch.device(DEVICE))
    if why is not None:
        pytest.skip(why)
    try:
        check_case(build(), backend, dtype_case, device=DEVICE)
    except RuntimeError as e:
        if "cannot serve" in str(e):  # the op's own "this backend does not serve this" error
            pytest.skip(str(e))
        raise


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("rows, row_len", [(37, 48), (5, 57), (64, 64)])  # r = in ≤ 64: one rank block
@pytest.mark.parametrize("seed", [0, 7, 0x0123456789ABCDEF])
def test_dropout_mask_on_cuda_is_the_cpu_definition(backend, rows, row_len, seed):
    """lowrank_linear with W = 0, A = I (r = in), B = I (out = r), s = 1, x = 1, p = 0.5: the
    output is drop(x) exactly (every value 0 or 2, exact in any precision, TF32 included), so
    its nonzero pattern is the kernel's keep-mask, compared bit for bit with philox.keep_mask."""
    import pypeft_fast as pf

    why = registry.why_unavailable("lowrank", backend, torch.device(DEVICE))
    if why is not None:
        pytest.skip(why)
    dev, p = DEVICE, 0.5
    s = torch.tensor(seed, dtype=torch.int64)
    x = torch.ones(rows, row_len, device=dev)
    eye = torch.eye(row_len, device=dev)
    y = pf.lowrank_linear(x, torch.zeros(row_len, row_len, device=dev), None, eye, eye, 1.0, p, s,
                          backend)
    got = (y != 0).cpu()
    want = keep_mask(s, rows * row_len, p).view(rows, row_len)
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0}, "values other than 0 and 1/(1-p)"
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} mask bits differ"


@pytest.mark.skipif(DEVICE != "cuda", reason="the CPU rehearsal has no CUDA build to check")
def test_cuda_kernels_were_built():
    """On a GPU machine the extension must carry its CUDA kernels (scripts/gpu_check.sh builds
    them first): otherwise every cuda case above would skip and prove nothing."""
    from pypeft_fast import native

    assert native.WITH_CUDA, "pypeft_fast._C has no CUDA kernels: build with nvcc first"
    assert native.BUILD_INFO.get("cuda_archs"), native.BUILD_INFO
