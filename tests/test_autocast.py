"""Autocast (``torch.autocast("cpu", torch.bfloat16)``; CUDA bf16/fp16 take the same code path,
``pypeft_fast/function.py: delta_linear``) is served, for every family op, every injected family
and every patched peft method.

The semantics are autocast's for ``F.linear`` — what peft's layers compute under autocast: x, the
frozen W, b and the adapter tensors are cast to bf16 (the casts are the only roundings of the
*definition*), the output comes back in bf16 (peft's LoKr: in the input's dtype). peft also rounds
its adapter term to bf16 (LoRA's A and B, LoKr's formed ΔW, SHiRA's W + ΔW); pypeft_fast keeps the
adapter in its float32 and accumulates the delta in float32, so that rounding is counted as peft's
error, not as the definition. (DoRA's norm ‖W + s·B·A‖ reads the float32 W itself, as peft's does
for a float32 x: test_dora's ``test_dora_norm_under_autocast_reads_the_float32_weight``; within the
tolerance below either way.) The float64 reference is the same expression in float64 with x, W and b
rounded to bf16 and the adapter tensors as they are, and the tolerance rule is the project's
(tests/numerics.py): our error at most twice plain PyTorch's — the materialising reference /
unpatched peft, run under the same autocast — plus a few ulps.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.utils._python_dispatch
from torch import nn

import pypeft_fast as pf
from pypeft_fast.measure import SavedTensors
from numerics import _leaves, _run, assert_within, cpu_backends, routed

from test_dora import dora_case
from test_hadamard import hada_case
from test_kronecker import kron_case
from test_lowrank import lowrank_case
from test_phm import phm_case
from test_sparse import sparse_case

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def rounded(t: torch.Tensor) -> torch.Tensor:
    """A leaf as autocast casts it, in float64 (float64 leaves are not cast by autocast)."""
    return t.detach().to(BF16).double()


# ------------------------------------------------------------------ every family op, every backend

OP_CASES = {
    "lowrank": lambda: lowrank_case(),
    "lowrank-dropout": lambda: lowrank_case(dropout=0.1),
    "lowrank-dora": lambda: dora_case(),
    "lowrank-dora-dropout": lambda: dora_case(dropout=0.1),  # cpp: the "saved" source (bf16 W)
    "hadamard": lambda: hada_case(),
    "kronecker": lambda: kron_case(),
    "kronecker-lowrank-factors": lambda: kron_case(a_rank=2, b_rank=3),
    "phm": lambda: phm_case(),
    "phm-factored-B": lambda: phm_case(rank=2),
    "sparse": lambda: sparse_case(),
}
FAMILY_OF = {k: k.split("-")[0] for k in OP_CASES}


def _op_params():
    return [(name, b) for name in OP_CASES for b in cpu_backends(FAMILY_OF[name])]


def check_autocast_case(case, backend, x_dtype):
    """Op under autocast (fp32 parameters, x in ``x_dtype``) vs float64 on bf16-rounded leaves;
    plain PyTorch = the case's materialising reference under the same autocast."""
    g = torch.Generator().manual_seed(99)
    probe = case.ref(**_leaves(case, torch.float64, torch.float64), **case.fixed)
    gy = torch.randn(probe.shape, generator=g, dtype=torch.float64)

    leaves64 = {k: (rounded(v) if k in case.frozen else v.detach().double()).requires_grad_(v.requires_grad)
                for k, v in _leaves(case, torch.float32, torch.float32).items()}
    y64, g64 = _run(case.ref, leaves64, case.fixed, gy)
    with autocast():
        yb, gb = _run(case.ref, _leaves(case, torch.float32, torch.float32), case.fixed, gy)
        leaves = _leaves(case, torch.float32, torch.float32)
        for k in ("x", "weight", "bias"):  # the frozen tensors in x's dtype (fp32 or bf16)
            if k in leaves:
                leaves[k] = leaves[k].detach().to(x_dtype).requires_grad_(leaves[k].requires_grad)
        op = lambda **kw: routed(lambda b: case.op(backend=b, **kw), backend)  # noqa: E731
        yo, go = _run(op, leaves, case.fixed, gy)
    assert yo.dtype == BF16, f"output is {yo.dtype}; autocast's F.linear gives bfloat16"
    assert_within(f"[{backend}/autocast x {x_dtype}] y", yo, y64, yb.to(BF16), BF16)
    assert set(go) == set(g64)
    for k in case.grads:
        assert go[k] is not None, f"no gradient reached {k}"
        assert go[k].dtype == leaves[k].dtype, f"d{k} is {go[k].dtype}, its leaf {leaves[k].dtype}"
        assert_within(f"[{backend}/autocast x {x_dtype}] d{k}", go[k], g64[k], gb[k].to(go[k].dtype),
                      go[k].dtype)


@pytest.mark.parametrize("x_dtype", [torch.float32, BF16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("name, backend", _op_params())
def test_family_op_under_autocast_matches_float64(name, backend, x_dtype):
    check_autocast_case(OP_CASES[name](), backend, x_dtype)


class _CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dtype casts (``_to_copy``) per input shape."""

    def __init__(self):
        super().__init__()
        self.casts: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            key = tuple(args[0].shape)
            self.casts[key] = self.casts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_autocast_casts_x_and_weight_once_per_call(name):
    """Under autocast each call casts x and the frozen weight to bf16 once, as autocast's F.linear
    does: the argument checks read the dtypes the casts would give (they cast both, twice more,
    before: 2 x-sized and 2 weight-sized copies per call, ≈ 1 ms of a 1024² layer's 5 ms)."""
    case = OP_CASES[name]()
    leaves = _leaves(case, torch.float32, torch.float32)
    x_shape, w_shape = tuple(leaves["x"].shape), tuple(leaves["weight"].shape)
    for call in range(2):
        # DoRA's norm reads the float32 W itself (not the bf16 cast): its first call converts W
        # once more, to float64 for ‖Wᵢ‖² (then cached); W·Aᵀ needs no cast. (Before, the norm
        # read the cast — a new tensor each call, so the cache missed — converted back to
        # float32 twice: 3 weight-sized casts in every call.)
        w_casts = 2 if ("dora" in name and call == 0) else 1
        counter = _CastCounter()
        with counter, autocast():
            case.op(backend="torch", **leaves, **case.fixed)
        assert counter.casts.get(x_shape) == 1 and counter.casts.get(w_shape) == w_casts, (
            f"call {call}: casts per shape {counter.casts}; expected one of x {x_shape} and "
            f"{w_casts} of weight {w_shape}")


@pytest.mark.skipif("cpp" not in cpu_backends("phm"), reason="the native extension is not built")
def test_cpp_folded_phm_reads_x_and_updates_dx_in_bf16():
    """Compacter's PHM at rank 1 folds A into T (a rank a_out·n·k LoRA): on cpp under autocast
    its products read the bf16 x and update the bf16 dx in their own dtype (NativeLowRank's
    fused ops), so no x-sized tensor is converted to float32, forward or backward (before: the
    rank products took x.to(float32) twice and dx went float32 and back, 1.8 ms a cast at
    1024 × 2752)."""
    case = phm_case(rank=1)
    leaves = _leaves(case, torch.float32, torch.float32)
    x2d_shape = (leaves["x"].numel() // leaves["x"].shape[-1], leaves["x"].shape[-1])
    counter = _CastCounter()
    with counter:
        with autocast():
            y = case.op(backend="cpp", **leaves, **case.fixed)
        y.float().square().sum().backward()
    assert leaves["x"].grad is not None and leaves["S"].grad is not None
    assert x2d_shape not in counter.casts, f"casts per shape {counter.casts}"


def _is_cast_of(t, state):
    return any(t.dtype == BF16 and t.shape == s.shape and torch.equal(t, s.detach().to(BF16))
               for s in state)


@pytest.mark.parametrize("name, backend", _op_params())
def test_autocast_saves_what_the_bf16_op_saves(name, backend):
    """Activations saved under autocast (fp32 x, W and parameters) are not above those of the same
    op without autocast on a bf16 base with fp32 parameters (peft's own mixed-precision layout):
    x once in bf16 (never the fp32 x), the factor-sized extras. The bf16 cast of W — what autocast's own ``F.linear`` saves for its backward — is
    state, not activation, and is counted apart; the parameters are saved as they are (no cast)."""
    case = OP_CASES[name]()
    state_keys = [k for k in (*case.frozen, *case.params) if k != "x"]

    def measured(act_dtype, under_autocast):
        leaves = _leaves(case, act_dtype, torch.float32)
        state = [leaves[k] for k in state_keys]
        with SavedTensors(exclude=state, keep=True) as saved:
            if under_autocast:
                with autocast():
                    y = routed(lambda b: case.op(backend=b, **leaves, **case.fixed), backend)
            else:
                y = routed(lambda b: case.op(backend=b, **leaves, **case.fixed), backend)
        casts = {p for p, t in saved.tensors.items() if _is_cast_of(t, [leaves[k] for k in case.frozen if k != "x"])}
        assert not any(_is_cast_of(t, [leaves[k] for k in case.params]) for t in saved.tensors.values()), \
            "a bf16 copy of a parameter is saved"
        y.float().sum().backward()
        return saved.bytes_without(casts), saved, leaves

    auto_bytes, auto_saved, leaves = measured(torch.float32, True)
    bf16_bytes, _, _ = measured(BF16, False)
    assert leaves["x"].untyped_storage().data_ptr() not in auto_saved.storages, \
        "the fp32 x is kept; only its bf16 cast should be"
    x_bf16 = leaves["x"].numel() * 2
    assert x_bf16 <= auto_bytes <= bf16_bytes, (
        f"{name}/{backend}: saved {auto_bytes} bytes under autocast, {bf16_bytes} on a bf16 base "
        f"(x in bf16 is {x_bf16})")


# ------------------------------------------------------------------------ patched peft methods

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, LoraConfig, ShiraConfig, get_peft_model  # noqa: E402

from test_patch import assert_within as assert_within_model  # noqa: E402
from test_patch import LLAMA_TARGETS, batch_for, outputs, peft_relative_error, tiny_llama  # noqa: E402


class MLP(nn.Module):
    """Two Linear layers: the first sees the caller's fp32 x, the second a bf16 activation
    (LoRA/SHiRA under autocast return bf16; peft's LoKr returns the input's dtype)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(24, 40), nn.Linear(40, 18)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


PEFT_CASES = {
    "lora": lambda: LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False),
    "lora-bias": lambda: LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], lora_bias=True,
                                    init_lora_weights=False),
    "lokr-full-factors": lambda: LoKrConfig(r=4, alpha=4, target_modules=["up", "down"], init_weights=False),
    "lokr-lowrank-factors": lambda: LoKrConfig(r=2, alpha=3, target_modules=["up", "down"],
                                               decompose_both=True, decompose_factor=4, init_weights=False),
    "shira": lambda: ShiraConfig(r=2, target_modules=["up", "down"], init_weights=False),
    "dora": lambda: LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["up", "down"],
                               init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=2, alpha=4, target_modules=["up", "down"], init_weights=False),
}


def _rounded_model64(model):
    """The model in float64 with the frozen tensors autocast casts (the weights and biases of the
    frozen Linear layers) rounded to bf16 first; the trainable adapter tensors as they are."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                for p in m.parameters(recurse=False):
                    if not p.requires_grad:
                        p.copy_(p.to(BF16))
    return ref.double()


def _step(model, x, gy, under_autocast):
    model.zero_grad(set_to_none=True)
    with autocast() if under_autocast else torch.enable_grad():
        y = model(x)
        (y.double() * gy).sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _fallbacks(report):
    return sum(sum(e.fallback_calls.values()) for e in report.entries)


def compare_patched_under_autocast(model, inputs, run, expect_served):
    """Patched vs unpatched peft, both under autocast, vs the float64 rounded-leaf reference."""
    ref64 = _rounded_model64(model)
    patched = copy.deepcopy(model)
    report = pf.patch(patched)
    with torch.no_grad():
        shape = run(ref64, inputs[1]).shape
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y64, g64 = run(ref64, inputs[1], gy, False)
    yb, gb = run(model, inputs[0], gy, True)
    yp, gp = run(patched, inputs[0], gy, True)
    assert yp.dtype == yb.dtype, f"output dtype {yp.dtype}, peft under autocast gives {yb.dtype}"
    assert_within_model("output", yp, y64, yb)
    rel_floor = peft_relative_error(gb, g64)
    assert set(gp) == set(g64) and gp
    for k in g64:
        assert gp[k].dtype == gb[k].dtype == torch.float32, f"{k}: grad {gp[k].dtype}, peft {gb[k].dtype}"
        assert_within_model(f"grad {k}", gp[k], g64[k], gb[k], rel_floor)
    served = sum(e.served_calls for e in report.entries)
    assert _fallbacks(report) == 0, str(report)
    assert served == expect_served, f"{served} served calls, expected {expect_served}\n{report}"
    return patched, report


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_patched_peft_under_autocast_matches_peft_semantics(case):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), PEFT_CASES[case]())
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))

    def run(m, x, gy=None, under_autocast=True):
        if gy is None:
            return m(x)
        return _step(m, x, gy, under_autocast)

    compare_patched_under_autocast(model, (x, x.double()), run, expect_served=2)


def test_patched_llama_lora_under_autocast_matches_peft():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                    init_lora_weights=False))
    batch = batch_for("llama")

    def run(m, b, gy=None, under_autocast=True):
        if gy is None:
            return outputs(m, b)
        m.zero_grad(set_to_none=True)
        with autocast() if under_autocast else torch.enable_grad():
            y = outputs(m, b)
            (y.double() * gy).sum().backward()
        return y.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    compare_patched_under_autocast(model, (batch, batch), run, expect_served=2 * len(LLAMA_TARGETS))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_patched_lora_dropout_under_autocast_is_served_and_saves_less_than_peft(use_dora):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1, use_dora=use_dora,
                                             target_modules=["up", "down"], init_lora_weights=False))
    model.train()
    patched = copy.deepcopy(model)
    report = pf.patch(patched)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    saved = {}
    for name, m in (("peft", model), ("patched", patched)):
        params = [p for p in m.parameters()]
        with autocast(), SavedTensors(exclude=params) as s:
            y = m(x)
        assert y.dtype == BF16
        y.float().sum().backward()
        saved[name] = s.total_bytes
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in m.parameters() if p.requires_grad)
    assert _fallbacks(report) == 0 and sum(e.served_calls for e in report.entries) == 2, str(report)
    assert saved["patched"] < saved["peft"], saved


# ------------------------------------------------------------------------ injected families

INJECT_CASES = {
    "lowrank": dict(family="lowrank", r=3, alpha=6.0),
    "lowrank-dropout-eval": dict(family="lowrank", r=3, alpha=6.0, dropout=0.1),
    "kronecker": dict(family="kronecker", scaling=0.7),
    "phm": dict(family="phm", n=4),
    "sparse": dict(family="sparse", density=0.05, seed=3),
    "hadamard": dict(family="hadamard", r=2, alpha=4.0),
    "lowrank-dora": dict(family="lowrank", r=3, alpha=6.0, magnitude=True),
    # training mode: the same Philox masks (each run reseeds; the op and the reference draw in layer order)
    "lowrank-dora-dropout-train": dict(family="lowrank", r=3, alpha=6.0, magnitude=True, dropout=0.1),
}


@pytest.mark.parametrize("case", sorted(INJECT_CASES))
def test_injected_model_under_autocast_matches_float64(case):
    from test_inject import as_reference, ids_for, output, perturb, tiny_llama as inject_llama

    targets = LLAMA_TARGETS
    model = perturb(pf.inject(inject_llama(0), pf.DeltaConfig(target_modules=targets, **INJECT_CASES[case])))
    model.train(case.endswith("-train"))
    ids = ids_for()
    ref64 = _rounded_model64(as_reference(model))
    base = as_reference(model)
    gy = torch.randn(output(ref64, ids).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(m, under_autocast):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(17)  # the dropout seeds
        with autocast() if under_autocast else torch.enable_grad():
            y = output(m, ids)
            (y.double() * gy).sum().backward()
        return y.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    y64, g64 = run(ref64, False)
    yb, gb = run(base, True)
    y, g = run(model, True)
    assert_within_model(f"{case} output", y, y64, yb)
    rel_floor = peft_relative_error(gb, g64)
    assert set(g) == set(g64) and g
    for n in g:
        assert g[n].dtype == torch.float32 and g[n].abs().max() > 0, n
        assert_within_model(f"{case} d{n}", g[n], g64[n], gb[n], rel_floor)
