"""The routing rule (pypeft_fast/registry.py): an explicit backend that cannot serve a call raises
naming the layer, family, backend, shapes and reason; "auto" skips it, says so once per (family,
backend, reason), and runs the next backend — here the torch kernels, with their exact numbers."""
import logging

import pytest
import torch

import pypeft_fast as pf
from pypeft_fast import registry

CPU = torch.device("cpu")
needs_cpp = pytest.mark.skipif(registry.why_unavailable("lowrank", "cpp", CPU) is not None,
                               reason="the native extension is not built")
try:  # the per-CPU limits the declined-call messages name
    from pypeft_fast.native import NativeKronecker as _NK
    DENSE_OVER_FACTORED, MAX_B_ELEMENTS = _NK.DENSE_OVER_FACTORED, _NK.MAX_B_ELEMENTS
except ImportError:  # not built: the tests that need them skip
    DENSE_OVER_FACTORED, MAX_B_ELEMENTS = 2.0, 32768


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _leaf(t):
    return t.clone().requires_grad_(True)


def lowrank_call(p=0.0, activation=None):
    x, W, A, B = _randn(3, 5, 8, seed=1), _randn(6, 8, seed=2), _randn(2, 8, seed=3), _randn(6, 2, seed=4)
    return lambda backend: pf.lowrank_linear(x, W, None, A, B, 0.5, p, 7, backend, name="l.q",
                                             activation=activation), (x, A, B)


def adapter_call():
    """A parallel adapter (an activation between A and B): the cpp kernels have no such path."""
    return lowrank_call(0.1, activation="gelu")


def factored_kronecker_call():
    """B as rank-1 factors (S (64, 1), T (1, 64)) that the cpp kernels keep factored (forming B
    costs > 2× the factored multiply-adds) beside an A of 33 rows, too many to fold into T
    (a_out·h·k = 33 > FOLD_MAX_RANK), which they then do not serve."""
    x, W = _randn(3, 128, seed=1), _randn(33 * 64, 128, seed=2)
    A, S, T = _randn(33, 2, seed=3), _randn(64, 1, seed=4), _randn(1, 64, seed=5)
    return lambda backend: pf.kronecker_linear(x, W, None, A, (S, T), 0.5, backend, name="l.k"), (x, A, S, T)


def big_b_kronecker_call():
    """A dense B of 200 × 200 = 40000 elements > NativeKronecker.MAX_B_ELEMENTS."""
    x, W = _randn(3, 400, seed=1), _randn(400, 400, seed=2)
    A, B = _randn(2, 2, seed=3), _randn(200, 200, seed=4)
    return lambda backend: pf.kronecker_linear(x, W, None, A, B, 0.5, backend, name="l.k"), (x, A, B)


def big_b_phm_call():
    x, W = _randn(3, 260, seed=1), _randn(260, 260, seed=2)
    A, B = _randn(2, 2, 2, seed=3), _randn(2, 130, 130, seed=4)
    return lambda backend: pf.phm_linear(x, W, None, A, B, 0.5, backend, name="l.p"), (x, A, B)


DECLINED = {  # family, call, what the error must say
    "lowrank-adapter": ("lowrank", adapter_call, r"lowrank \(l\.q\): backend 'cpp' cannot serve adapter "
                                                 r"\(activation/gate\).*\[x \(3, 5, 8\), weight \(6, 8\), "
                                                 r"params \(2, 8\), \(6, 2\)\]"),
    "kronecker-factored-B": ("kronecker", factored_kronecker_call,
                             r"kronecker \(l\.k\): backend 'cpp' cannot serve B as rank-1 factors \(S, T\), "
                             r"kept factored \(forming B costs 139392 multiply-adds per row > "
                             rf"{DENSE_OVER_FACTORED:g}× the factored 2306\)"),
    "kronecker-big-B": ("kronecker", big_b_kronecker_call,
                        r"kronecker \(l\.k\): backend 'cpp' cannot serve a B stack of 40000 elements > "
                        rf"MAX_B_ELEMENTS = {MAX_B_ELEMENTS}"
                        r".*params \(1, 2, 2\), \(1, 200, 200\)"),
    "phm-big-B": ("phm", big_b_phm_call, r"phm \(l\.p\): backend 'cpp' cannot serve a B stack of 33800 elements"),
}


def forward_backward(make_call, backend):
    """(y, grads of x and every parameter) of one call with fresh leaves."""
    fn, tensors = make_call()
    for t in tensors:
        t.requires_grad_(True)
    y = fn(backend)
    y.square().sum().backward()
    return [y.detach()] + [t.grad for t in tensors]


@needs_cpp
@pytest.mark.parametrize("case", list(DECLINED))
def test_explicit_cpp_that_cannot_serve_the_call_raises_naming_why(case):
    _, make_call, message = DECLINED[case]
    fn, _ = make_call()
    with pytest.raises(RuntimeError, match=message):
        fn("cpp")


@needs_cpp
@pytest.mark.parametrize("case", list(DECLINED))
def test_auto_runs_the_torch_kernels_and_says_so_once(case, monkeypatch, caplog):
    """cpp is auto's choice for the family (as on an AVX-512 CPU): a call it declines runs the
    torch kernels, bit for bit, and the skip is logged once for repeated calls."""
    family, make_call, _ = DECLINED[case]
    monkeypatch.setattr(registry.FAMILIES[family].backends["cpp"], "auto", True)
    monkeypatch.setattr(registry, "_warned_declines", set())
    monkeypatch.delenv("PYPEFT_FAST_BACKEND", raising=False)
    assert registry.resolve(family, "auto", CPU)[0] == "cpp"
    want = forward_backward(make_call, "torch")
    with caplog.at_level(logging.INFO, logger="pypeft_fast"):
        for _ in range(3):
            got = forward_backward(make_call, "auto")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    said = [r for r in caplog.records if "backend 'cpp' does not serve" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert said[0].levelno == logging.INFO and "auto uses 'torch'" in said[0].getMessage()


@needs_cpp
def test_forced_backend_from_the_environment_is_explicit(monkeypatch):
    monkeypatch.setenv("PYPEFT_FAST_BACKEND", "cpp")
    fn, _ = adapter_call()
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot serve adapter \(activation/gate\)"):
        fn("auto")
    fn, _ = lowrank_call(0.1)
    assert registry.kernels_for("lowrank", "auto", "l", _randn(2, 8, seed=0), None, (), (),
                                pf.families.lowrank.LowRankHP(1.0, 0.1)) is registry.FAMILIES["lowrank"].backends["cpp"].kernels
    fn("auto")


@needs_cpp
def test_calls_the_native_kernels_serve_still_run_them():
    """LoRA with and without dropout, and a factored Kronecker B cheap to form (formed, then
    served), pick cpp."""
    cpp = registry.FAMILIES["lowrank"].backends["cpp"].kernels
    x = _randn(2, 8, seed=0)
    for p in (0.0, 0.1):
        hp = pf.families.lowrank.LowRankHP(1.0, p)
        assert registry.kernels_for("lowrank", "cpp", "l", x, None, (), (), hp) is cpp
    x, W = _randn(3, 8, seed=1), _randn(8, 8, seed=2)
    A, S, T = _randn(2, 2, seed=3), _randn(4, 4, seed=4), _randn(4, 4, seed=5)
    got = pf.kronecker_linear(x, W, None, A, (S, T), 0.5, "cpp")
    torch.testing.assert_close(got, pf.kronecker_linear(x, W, None, A, S @ T, 0.5, "torch"))


@pytest.mark.parametrize("family", sorted(registry.FAMILIES))
def test_the_torch_kernels_serve_every_call(family):
    assert registry.declines(family, "torch") is None
    assert registry.why_declined(registry.FAMILIES[family].backends["torch"].kernels,
                                 None, None, (), (), None) is None


@pytest.mark.parametrize("case", list(DECLINED))
def test_explicit_torch_serves_the_calls_cpp_declines(case):
    _, make_call, _ = DECLINED[case]
    fn, _ = make_call()
    assert torch.isfinite(fn("torch")).all()


@needs_cpp
def test_info_lists_what_a_backend_declines_per_call():
    from pypeft_fast import info

    text = info.report()
    assert "(per call: declines parallel adapters" in text
    assert "(per call: declines B as rank-k factors" in text


@needs_cpp
def test_info_states_what_a_backend_declines_in_full():
    """`pypeft-fast info` prints the supports docstring's first paragraph on one line; it used to
    print only the first line ("... on CUDA a U tile over")."""
    text = registry.declines("kronecker", "cpp")
    assert text.endswith("on CUDA a U tile over the shared memory."), text
    assert "\n" not in text
    assert registry.declines("lowrank", "torch") is None
