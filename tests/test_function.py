"""The shared autograd Function, for every family: non-contiguous inputs, partial gradients,
leading dims, and the default backend choice."""
import pytest
import torch

import pypeft_fast as pf
from pypeft_fast import registry
from numerics import declared_cases

_DECLARED = declared_cases()  # every declared family's own CASES (tests/test_<family>.py)
CASES = {variant: build for variant, (_, build) in _DECLARED.items()}


def _call(case, backend="torch", **override):
    t = {**{k: v.float() for k, v in case.frozen.items()}, **{k: v.float() for k, v in case.params.items()}}
    t.update(override)
    return case.op(backend=backend, **t, **case.fixed)


@pytest.mark.parametrize("family", list(CASES))
def test_non_contiguous_x_gives_the_same_result_and_gradient(family):
    case = CASES[family]()
    x = case.frozen["x"].float()
    d = x.dim() - 2 if x.dim() > 2 else 1  # the first and last leading dims (a size-1 dim between)
    x_nc = x.transpose(0, d).contiguous().transpose(0, d).requires_grad_(True)  # same values, other strides
    assert not x_nc.is_contiguous()
    x_c = x.clone().requires_grad_(True)
    y_c, y_nc = _call(case, x=x_c), _call(case, x=x_nc)
    torch.testing.assert_close(y_nc, y_c, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y_c)
    y_c.backward(g)
    y_nc.backward(g)
    torch.testing.assert_close(x_nc.grad, x_c.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", list(CASES))
def test_only_requested_gradients_are_computed(family):
    case = CASES[family]()
    frozen_params = {k: v.float() for k, v in case.params.items()}  # no requires_grad anywhere
    x = case.frozen["x"].float().requires_grad_(True)
    y = _call(case, x=x, **frozen_params)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in frozen_params.values())
    with torch.no_grad():
        y2 = _call(case, x=x.detach())
    torch.testing.assert_close(y2, y.detach())


@pytest.mark.parametrize("family", list(CASES))
def test_auto_on_cpu_is_a_registered_backend_with_the_same_result(family):
    name, _ = registry.resolve(_DECLARED[family][0], "auto", torch.device("cpu"))
    assert name in pf.FAMILIES[_DECLARED[family][0]].backends
    case = CASES[family]()
    torch.testing.assert_close(_call(case, backend="auto"), _call(case, backend="torch"), rtol=2e-5, atol=2e-5)


def test_a_loaded_backend_without_kernels_for_a_family_says_so_not_that_it_is_missing(monkeypatch):
    """A family with torch kernels only (every built-in family has cpp ones now): `info` must not
    claim the native extension is unbuilt."""
    pytest.importorskip("pypeft_fast.native")
    monkeypatch.setitem(registry.FAMILIES, "torch_only", registry.Family("torch_only", lambda *a: None))
    reason = registry.why_unavailable("torch_only", "cpp", torch.device("cpu"))
    assert reason is not None and "is loaded" in reason and "not built" not in reason
    assert "torch_only's kernels: none" in reason  # none registered here
    hadamard = registry.why_unavailable("hadamard", "triton", torch.device("cpu"))
    if hadamard is not None and "is loaded" in hadamard:
        assert "hadamard's kernels: cpp, torch" in hadamard
