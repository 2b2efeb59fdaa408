"""A family is declared once (pypeft_fast/declaration.py): a toy family declared here, in
process, reaches pf.inject (options, shapes, init, call, merge), the workloads (make_case,
formulas), the micro-benchmark case list and the profiler without an edit to any of them, and
leaves no trace once undeclared."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypeft_fast as pf
from pypeft_fast import registry, workloads
from pypeft_fast.declaration import CaseFamily, FamilyDeclaration
from pypeft_fast.function import delta_linear
from pypeft_fast.inject.spec_tools import finite
from pypeft_fast.inject.specs import FAMILY_OPTIONS, SPECS
from pypeft_fast.profile import methods
from numerics import assert_within

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import cases as bench_cases  # noqa: E402  (bench/cases.py)

TOY = "toydense"


# ---------------------------------------------------------------- the toy family: ΔW = s·D, D dense

def toy_delta(D, scaling=1.0):
    return D * scaling


@dataclass(frozen=True)
class ToyHP:
    scaling: float


class ToyKernels:
    @staticmethod
    def forward(x2d, weight, bias, params, aux, hp):
        (D,) = params
        return F.linear(x2d, weight, bias) + hp.scaling * F.linear(x2d, D.to(x2d.dtype)), ()

    @staticmethod
    def backward(gy2d, x2d, weight, params, aux, extras, hp, needs_dx, needs_dparams):
        (D,) = params
        dx = gy2d @ weight + hp.scaling * (gy2d @ D.to(gy2d.dtype)) if needs_dx else None
        dD = (hp.scaling * gy2d.t() @ x2d).to(D.dtype) if needs_dparams[0] else None
        return dx, (dD,)


def toy_linear(x, weight, bias, D, scaling=1.0, backend="auto", *, name=None):
    return delta_linear(ToyKernels, ToyHP(float(scaling)), 1, x, weight, bias, D)


class ToySpec:
    name = TOY
    options = {"scaling": 1.0}

    @staticmethod
    def check_options(cfg):
        finite(cfg, "scaling")

    @staticmethod
    def scaling(cfg):
        return float(cfg.scaling)

    @staticmethod
    def shapes(cfg, out_f, in_f, where):
        return {"D": ((out_f, in_f), "param")}

    @staticmethod
    def init_layer(cfg, t, weight, where):
        t["D"].zero_()

    @staticmethod
    def call(m, x, weight, bias):
        return toy_linear(x, weight, bias, m._parameters["D"], m.scaling, name=m.layer_name)

    @staticmethod
    def delta_args(m):
        return (m.D, m.scaling)


def _setup(w, g, c):
    params = {"D": g(w["out"], w["in"], scale=0.1, adapter=True)}
    fixed = {"scaling": 0.5}

    def ours(x, W, P, f, backend):
        return toy_linear(x, W, None, P["D"], f["scaling"], backend)

    def reference(x, W, P, f):
        return F.linear(x, W + f["scaling"] * P["D"].to(W.dtype))

    return params, fixed, ours, reference, lambda P, f: toy_delta(P["D"], f["scaling"]), None


def _flops(shape, rank, tokens):
    return 2.0 * tokens * shape.in_features * shape.out_features, 4.0 * tokens * shape.in_features * shape.out_features


@pytest.fixture
def toy():
    decl = registry.declare(FamilyDeclaration(
        name=TOY, function=toy_linear, delta_weight=toy_delta, inject=ToySpec,
        cases=(CaseFamily(TOY, setup=_setup, flops=_flops, params=lambda s, r: s.in_features * s.out_features,
                          reference_name="materialise"),),
        peft_counterpart="lora"))
    registry.register_kernels(TOY, "torch", ToyKernels)
    yield decl
    registry.undeclare(TOY)


# ---------------------------------------------------------------- the property

def test_every_family_is_declared_once_with_its_public_function():
    assert set(registry.DECLARATIONS) == set(registry.FAMILIES)
    for name, d in registry.DECLARATIONS.items():
        assert getattr(pf, d.function.__name__) is d.function
        assert registry.FAMILIES[name].delta_weight is d.delta_weight
        assert all(c.family == name and c.function == d.function.__name__ for c in d.cases)


def test_a_declared_family_reaches_inject_and_merge(toy):
    assert SPECS[TOY] is ToySpec and TOY in FAMILY_OPTIONS["scaling"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    x = torch.randn(5, 12)
    y0 = model(x)
    pf.inject(model, pf.DeltaConfig(family=TOY, target_modules=["0", "2"], scaling=0.5))
    torch.testing.assert_close(model(x), y0)  # D = 0 at step 0
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.D.normal_()
    y = model(x)
    ref = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    for i in (0, 2):
        ref[i].weight.data = model[i].base_layer.weight + 0.5 * model[i].D
        ref[i].bias.data = model[i].base_layer.bias.data
    torch.testing.assert_close(y, ref(x))
    y.sum().backward()
    assert model[0].D.grad is not None and model[0].base_layer.weight.grad is None
    pf.merge(model)
    torch.testing.assert_close(model(x), y.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="belongs to family"):
        pf.DeltaConfig(family=TOY, target_modules=["0"], r=4)


def test_a_declared_family_reaches_the_workloads_and_the_benchmarks(toy):
    w = workloads.make_case(TOY, "tiny/wide", 4, workloads.TINY_TOKENS)
    y = w.ours("torch")()
    y.backward(w.gy)
    y64, g64 = w.expected(torch.float64, "ours")
    yb, gb = w.expected(None, "ours")
    assert_within("toy y", y.detach(), y64, yb, yb.dtype)
    assert_within("toy dD", w.params["D"].grad, g64["D"], gb["D"], gb["D"].dtype)
    s = workloads.shape_of("tiny/wide")
    assert workloads.adapter_flops(TOY, s, 4, 10) == 6.0 * 10 * 68 * 44
    assert workloads.adapter_params(TOY, s, 4) == 68 * 44
    assert workloads.bytes_moved(TOY, s, 4, 10, "forward") == (
        workloads.bytes_moved(None, s, 4, 10, "forward") + 4 * 68 * 44)
    assert workloads.unavailable(TOY) is None
    for selection in ("tiny", "default"):
        assert any(c.family == TOY for c in bench_cases.cases(selection, "cpu"))
    assert TOY in methods.families() and methods.peft_counterparts()[TOY] == "lora"
    assert methods.delta_config(TOY, "all-linear", {}).family == TOY


def test_undeclare_leaves_no_trace(toy):
    registry.undeclare(TOY)
    assert TOY not in SPECS and TOY not in workloads.CASE_FAMILIES and TOY not in registry.FAMILIES
    assert TOY not in FAMILY_OPTIONS["scaling"]
    assert all(c.family != TOY for c in bench_cases.cases("tiny", "cpu"))
    with pytest.raises(ValueError, match="unknown family"):
        pf.DeltaConfig(family=TOY, target_modules=["0"])


def test_declaring_twice_or_a_taken_case_name_or_another_delta_weight_fails(toy):
    with pytest.raises(RuntimeError, match="declared twice"):
        registry.declare(toy)
    clash = FamilyDeclaration(name="toy2", function=toy_linear, delta_weight=toy_delta,
                              cases=(CaseFamily("lowrank", setup=_setup, flops=_flops, params=len),))
    with pytest.raises(RuntimeError, match="declared by other families"):
        registry.declare(clash)
    assert "toy2" not in registry.FAMILIES  # nothing registered by a declaration that failed
    registry.register_family("toy4", toy_delta)  # a family module registered it...
    try:  # ...and its declaration names another delta_weight
        with pytest.raises(RuntimeError, match="not the registered one"):
            registry.declare(FamilyDeclaration(name="toy4", function=toy_linear, delta_weight=lambda D: D))
    finally:
        registry.undeclare("toy4")
    with pytest.raises(TypeError, match="need setup=, flops= and params="):
        FamilyDeclaration(name="toy3", function=toy_linear, delta_weight=toy_delta, cases=(CaseFamily("x"),))
