"""Low-rank family: outputs and every gradient vs float64, dropout masks, errors."""
import pytest
import torch

import pypeft_fast as pf
from pypeft_fast.families.lowrank import delta_weight
from pypeft_fast.philox import keep_mask
from pypeft_fast.reference import reference_linear
from numerics import DTYPE_CASES, Case, check_case, cpu_backends, rand


def lowrank_case(lead=(2, 37), n_in=129, n_out=67, r=3, dropout=0.0, seed=7, bias=True, scaling=0.7):
    """Ragged on purpose: 74 rows, in=129, out=67, rank 3."""
    frozen = {"x": rand(*lead, n_in, seed=seed), "weight": rand(n_out, n_in, seed=seed + 1) / n_in**0.5}
    if bias:
        frozen["bias"] = rand(n_out, seed=seed + 2)
    params = {"A": rand(r, n_in, seed=seed + 3) / n_in**0.5, "B": rand(n_out, r, seed=seed + 4)}
    drop_seed = torch.tensor(seed * 1000 + 11)

    def op(x, weight, A, B, backend, bias=None):
        return pf.lowrank_linear(x, weight, bias, A, B, scaling, dropout, drop_seed, backend)

    def ref(x, weight, A, B, bias=None):
        xd = None
        if dropout:
            keep = keep_mask(drop_seed, x.numel(), dropout).view(x.shape)
            xd = x * keep / (1 - dropout)
        return reference_linear(x, weight, bias, delta_weight(A, B, scaling), xd)

    grads = ("x", "A", "B") + (("bias",) if bias else ())
    return Case(op, ref, frozen, params, grads)


# The family's cases for the generic tests (autocast, the shared Function, CUDA): variant ->
# builder, read by numerics.declared_cases for every declared family. DoRA's builder is
# test_dora's (imported when called: that module needs peft for its patch tests).
def _dora_case(**kw):
    from test_dora import dora_case

    return dora_case(**kw)


CASES = {
    "lowrank": lambda: lowrank_case(),
    "lowrank-dropout": lambda: lowrank_case(dropout=0.1),
    "lowrank-rank16-dropout": lambda: lowrank_case(lead=(3, 1, 7), n_in=64, n_out=130, r=16, dropout=0.5),
    "dora": lambda: _dora_case(),
    "dora-dropout": lambda: _dora_case(dropout=0.2),
}


@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("backend", cpu_backends("lowrank"))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lowrank_matches_float64(backend, dtype_case, dropout):
    check_case(lowrank_case(dropout=dropout), backend, dtype_case)


@pytest.mark.parametrize("backend", cpu_backends("lowrank"))
@pytest.mark.parametrize("shape", [dict(lead=(5,), n_in=1, n_out=1, r=1), dict(lead=(97,), n_in=111, n_out=59, r=1, bias=False),
                                   dict(lead=(3, 1, 7), n_in=64, n_out=130, r=16, dropout=0.5)])
def test_lowrank_awkward_shapes(backend, shape):
    check_case(lowrank_case(**shape), backend, "fp32")


def test_lowrank_gradcheck_float64():
    W = rand(9, 13, seed=1)
    x, b, A, B = (rand(4, 13, seed=2), rand(9, seed=3), rand(2, 13, seed=4), rand(9, 2, seed=5))
    for t in (x, b, A, B):
        t.requires_grad_(True)
    for p in (0.0, 0.3):
        assert torch.autograd.gradcheck(
            lambda x, b, A, B: pf.lowrank_linear(x, W, b, A, B, 0.5, p, 123, "torch"), (x, b, A, B))


def test_dropout_reproducible_from_seed_and_independent_across_seeds():
    c = lowrank_case(dropout=0.3)
    x, W, A, B = c.frozen["x"].float(), c.frozen["weight"].float(), c.params["A"].float(), c.params["B"].float()
    y1 = pf.lowrank_linear(x, W, None, A, B, 1.0, 0.3, seed=5)
    y2 = pf.lowrank_linear(x, W, None, A, B, 1.0, 0.3, seed=5)
    y3 = pf.lowrank_linear(x, W, None, A, B, 1.0, 0.3, seed=6)
    assert torch.equal(y1, y2)
    assert (y1 - y3).abs().max() > 1e-3
    torch.manual_seed(0)
    y4 = pf.lowrank_linear(x, W, None, A, B, 1.0, 0.3)  # seed drawn from torch's generator
    torch.manual_seed(0)
    y5 = pf.lowrank_linear(x, W, None, A, B, 1.0, 0.3)
    y6 = pf.lowrank_linear(x, W, None, A, B, 1.0, 0.3)
    assert torch.equal(y4, y5) and not torch.equal(y5, y6)


def test_dropout_under_checkpoint_uses_the_forward_mask():
    """Non-reentrant checkpointing recomputes forward; the seed comes from torch's generator,
    whose state checkpoint restores, so the recomputed mask (and the gradients) are identical."""
    from torch.utils.checkpoint import checkpoint
    c = lowrank_case(dropout=0.2)
    W = c.frozen["weight"].float()

    def grads(use_ckpt):
        x = c.frozen["x"].float().requires_grad_(True)
        A = c.params["A"].float().requires_grad_(True)
        B = c.params["B"].float().requires_grad_(True)
        torch.manual_seed(42)
        f = lambda x, A, B: pf.lowrank_linear(x, W, None, A, B, 0.5, 0.2).square()  # noqa: E731
        y = checkpoint(f, x, A, B, use_reentrant=False) if use_ckpt else f(x, A, B)
        y.sum().backward()
        return y.detach(), x.grad, A.grad, B.grad

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(A=torch.randn(0, 129)), r"A has an empty dimension"),
    (dict(A=torch.randn(3, 128)), r"A has shape \(3, 128\); expected \(3, 129\)"),
    (dict(B=torch.randn(66, 3)), r"B has shape \(66, 3\); expected \(67, 3\)"),
    (dict(x=torch.randn(4, 130)), r"x has shape \(4, 130\); expected \(\.\.\., 129\)"),
    (dict(dropout=1.0), r"dropout must be a float in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be a float in \[0, 1\)"),
    (dict(weight=torch.randn(67, 129, requires_grad=True)), r"weight requires grad"),
    (dict(A=torch.randn(3, 129, device="meta")), r"all tensors must be on one device"),
    (dict(x=torch.randn(4, 129, dtype=torch.float64).to(torch.int32)), r"x has dtype torch.int32"),
    (dict(bias=torch.randn(66)), r"bias has shape \(66,\); expected \(67,\)"),
])
def test_lowrank_bad_input_names_argument_and_shapes(bad, match):
    args = dict(x=torch.randn(4, 129), weight=torch.randn(67, 129), bias=None,
                A=torch.randn(3, 129), B=torch.randn(67, 3), dropout=0.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        pf.lowrank_linear(args["x"], args["weight"], args["bias"], args["A"], args["B"], 1.0,
                          args["dropout"], name="model.layers.0.q_proj")


def test_error_names_the_layer():
    with pytest.raises(ValueError, match=r"^model\.layers\.3\.v_proj: A has shape"):
        pf.lowrank_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(2, 7),
                          torch.randn(4, 2), name="model.layers.3.v_proj")


def test_named_backend_that_cannot_run_raises():
    x, W, A, B = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match=r"requested backend 'cuda'"):
        pf.lowrank_linear(x, W, None, A, B, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        pf.lowrank_linear(x, W, None, A, B, backend="fast")
