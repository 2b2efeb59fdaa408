"""Hadamard family (LoHa): ΔW = s·(W1a·W1b) ⊙ (W2a·W2b); both forms vs float64, memory, inject."""
import pytest
import torch

import pypeft_fast as pf
from pypeft_fast.families.hadamard import DenseCosts, HadamardPlan, delta_weight, plan_for
from pypeft_fast.measure import LargestAllocation, LiveBytes, saved_bytes
from pypeft_fast.reference import reference_linear
from numerics import DTYPE_CASES, Case, assert_within, check_case, cpu_backends, rand

PLANS = {
    "factored": "factored",
    "dense": "dense",
    "dense+kr": HadamardPlan("dense", "dense", "factored"),
    "kr+dense-dx": HadamardPlan("factored", "dense", "factored"),
}


def hada_case(out_f=35, in_f=129, r1=3, r2=5, lead=(2, 37), seed=3, bias=True, scaling=0.6, method="auto"):
    """Ragged shapes, r1 ≠ r2 by default; every factor random (never zero)."""
    frozen = {"x": rand(*lead, in_f, seed=seed), "weight": rand(out_f, in_f, seed=seed + 1) / in_f**0.5}
    if bias:
        frozen["bias"] = rand(out_f, seed=seed + 2)
    params = {"W1a": rand(out_f, r1, seed=seed + 3), "W1b": rand(r1, in_f, seed=seed + 4) / r1**0.5,
              "W2a": rand(out_f, r2, seed=seed + 5), "W2b": rand(r2, in_f, seed=seed + 6) / r2**0.5}

    def op(x, weight, backend, W1a, W1b, W2a, W2b, bias=None):
        return pf.hadamard_linear(x, weight, bias, W1a, W1b, W2a, W2b, scaling, backend, method=method)

    def ref(x, weight, W1a, W1b, W2a, W2b, bias=None):
        return reference_linear(x, weight, bias, delta_weight(W1a, W1b, W2a, W2b, scaling))

    grads = ("x",) + tuple(params) + (("bias",) if bias else ())
    return Case(op, ref, frozen, params, grads)


# The family's cases for the generic tests (autocast, the shared Function, CUDA): variant ->
# builder, read by numerics.declared_cases for every declared family.
CASES = {
    "hadamard": lambda: hada_case(),
}


@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("method", list(PLANS))
@pytest.mark.parametrize("backend", cpu_backends("hadamard"))
def test_hadamard_matches_float64(backend, method, dtype_case):
    check_case(hada_case(method=PLANS[method]), backend, dtype_case)


@pytest.mark.parametrize("method", ["factored", "dense"])
@pytest.mark.parametrize("shape", [
    dict(r1=1, r2=1),                                  # rank 1
    dict(out_f=1, in_f=67, r1=2, r2=2, lead=(97,)),    # one output row
    dict(out_f=67, in_f=1, r1=4, r2=3, bias=False),    # one input column
    dict(out_f=48, in_f=40, r1=8, r2=8, lead=(3, 5, 7)),
])
def test_hadamard_awkward_shapes(method, shape):
    check_case(hada_case(**shape, method=method), "torch", "fp32")


@pytest.mark.parametrize("method", ["factored", "dense"])
def test_hadamard_gradcheck_float64(method):
    W = rand(6, 9, seed=1)
    x, b = rand(2, 5, 9, seed=2), rand(6, seed=7)
    P = (rand(6, 2, seed=3), rand(2, 9, seed=4), rand(6, 3, seed=5), rand(3, 9, seed=6))
    for t in (x, b, *P):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, b, *P: pf.hadamard_linear(x, W, b, *P, 0.5, "torch", method=method), (x, b, *P))


@pytest.mark.parametrize("method", ["factored", "dense"])
def test_hadamard_compile_fullgraph_forward_backward(method):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(35, 24, generator=g), torch.randn(3, 5, 24, generator=g)
    P = [torch.randn(*s, generator=g) for s in ((35, 3), (3, 24), (35, 2), (2, 24))]

    def call(x, *P):
        return pf.hadamard_linear(x, W, None, *P, 0.5, method=method)

    def run(fn):
        xs = x.clone().requires_grad_(True)
        leaves = [p.clone().requires_grad_(True) for p in P]
        y = fn(xs, *leaves)
        y.square().sum().backward()
        return [y.detach(), xs.grad] + [p.grad for p in leaves]

    eager, compiled = run(call), run(torch.compile(call, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("needs", [(True, False, True, False), (False, True, False, True),
                                   (False, False, False, True)])
@pytest.mark.parametrize("method", list(PLANS))
def test_hadamard_partial_gradients(method, needs):
    """Only the factors that require grad get one, and those are right (vs float64)."""
    case = hada_case(method=PLANS[method], lead=(11,))
    leaves = {k: v.clone().requires_grad_(k == "x" or need)
              for (k, v), need in zip(case.params.items(), needs)}
    x = case.frozen["x"].clone().requires_grad_(True)
    y = pf.hadamard_linear(x, case.frozen["weight"], None, *leaves.values(), 0.6, method=PLANS[method])
    y64 = reference_linear(x, case.frozen["weight"], None, delta_weight(*leaves.values(), 0.6))
    gy = rand(*y.shape, seed=9)
    got = torch.autograd.grad(y, [x, *[p for p in leaves.values() if p.requires_grad]], gy)
    ref = torch.autograd.grad(y64, [x, *[p for p in leaves.values() if p.requires_grad]], gy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("method", ["factored", "dense"])
def test_hadamard_under_autocast_matches_float64(method, x_dtype):
    """The shared autocast path (function.delta_linear) with both forms: tests/test_autocast.py's
    rule (float64 on bf16-rounded x, W, b; plain PyTorch under the same autocast)."""
    from test_autocast import check_autocast_case

    check_autocast_case(hada_case(method=method), "torch", x_dtype)


# --------------------------------------------------------------------------------------------
# what is kept: x and the factors only; the dense transient never outlives the op

N, IN, OUT, R = 16, 512, 384, 4   # out × in = 196 608 dwarfs n × in = 8 192


def _memory_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=g, requires_grad=True)
    W, b = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g, requires_grad=True)
    P = [torch.randn(*s, generator=g).requires_grad_(True) for s in ((OUT, R), (R, IN), (OUT, R), (R, IN))]
    return x, W, b, P


@pytest.mark.parametrize("method", list(PLANS))
def test_hadamard_saves_x_and_the_factors_only(method):
    x, W, b, P = _memory_inputs()
    for needs_dx in (False, True):
        xi = x.detach().requires_grad_(needs_dx)
        total, ptrs, y = saved_bytes(lambda: pf.hadamard_linear(xi, W, b, *P, 0.5, method=PLANS[method]),
                                     exclude=(W, b, *P))
        assert xi.untyped_storage().data_ptr() in ptrs
        assert total == xi.numel() * xi.element_size(), f"saved {total} bytes beyond x and the factors"
        _, ptrs_w, _ = saved_bytes(lambda: pf.hadamard_linear(xi, W, b, *P, 0.5, method=PLANS[method]))
        assert (W.untyped_storage().data_ptr() in ptrs_w) == needs_dx  # as F.linear
        y.sum().backward()
        assert all(p.grad is not None for p in P)


def test_factored_form_never_allocates_anything_delta_sized():
    x, W, b, P = _memory_inputs()
    with LargestAllocation() as rec:
        pf.hadamard_linear(x, W, b, *P, 0.5, method="factored").sum().backward()
    assert rec.largest < OUT * IN // 4, f"{rec.op} produced {rec.shape}; ΔW is {(OUT, IN)}"


def test_dense_transient_is_freed_when_forward_returns():
    """The dense form builds W + s·ΔW inside forward and backward; after each returns no
    weight-sized tensor is alive (the detector does see it while it exists)."""
    x, W, b, P = _memory_inputs()
    y_bytes = N * OUT * 4
    with LiveBytes(baseline=(x, W, b, *P)) as live:
        y = pf.hadamard_linear(x, W, b, *P, 0.5, method="dense")
        after_forward = live.current - live.baseline
        forward_peak = live.peak - live.baseline
        y.sum().backward()
    assert forward_peak >= OUT * IN * 4, "the detector must see the dense transient"
    assert after_forward <= y_bytes + 1024, f"{after_forward} bytes alive after forward; y is {y_bytes}"


def test_plan_follows_the_cost_model():
    """Khatri–Rao gradients cost 4·n·R·(in+out), the dense G = gyᵀ·x 2·n·in·out: the crossover
    is R = r1·r2 ≈ in·out / (2·(in+out)), 256 for a 1024 × 1024 layer."""
    assert plan_for(1024, 1024, 1024, 1, 1).grads == "factored"
    assert plan_for(1024, 1024, 2752, 16, 16).grads == "factored"
    # few tokens: building M1, M2 (out·in·(r1+r2) each way) costs more than any n-sized product
    assert plan_for(8, 1024, 1024, 16, 16) == HadamardPlan("factored", "factored", "factored")
    assert plan_for(1024, 1024, 1024, 64, 64) == HadamardPlan("dense", "dense", "dense")


def test_plan_prices_the_native_passes_and_the_bf16_gram():
    """The plans measured best on the AMX Xeon under bf16 autocast (bench/NOTES.md "Session
    12", 1024 tokens): with the native passes (W read and W' written in bf16: one float32-sized
    pass; 3 for the gradients) the
    dense forward and dx win at r = 8 too; with G = gyᵀ·x at bf16 speed (``gemm_bf16_f32``: 1/6
    of a float32 FLOP) so do the dense gradients at r = 16, where the float32 G loses to
    Khatri–Rao. float32 keeps the torch prices (r = 8 all factored: measured fastest there)."""
    native = pytest.importorskip("pypeft_fast.native")
    native_bf16 = DenseCosts(1 / 6, 1, 3)
    for in_f, out_f in ((1024, 1024), (1024, 2752), (2752, 1024)):
        assert plan_for(1024, in_f, out_f, 8, 8) == HadamardPlan("factored", "factored", "factored")
        plan = plan_for(1024, in_f, out_f, 8, 8, native_bf16)
        assert (plan.forward, plan.grads) == ("dense", "factored")
        # dx: dense for a square layer; for 1024 → 2752 the factored dx reuses t (a tie measured)
        assert plan.dx == "dense" or in_f < out_f
        assert plan_for(1024, in_f, out_f, 16, 16, native_bf16) == HadamardPlan("dense", "dense", "dense")
        assert plan_for(1024, in_f, out_f, 16, 16).grads == "factored"
    assert native.NativeHadamard.dense_costs(torch.float32) == DenseCosts()
    gram = 1 / native.GEMM_BF16_F32_SPEEDUP if native.GEMM_BF16_F32_FAST else 1.0
    assert native.NativeHadamard.dense_costs(torch.bfloat16) == DenseCosts(gram, 1, 3)


@pytest.mark.parametrize("fast", [True, False])
def test_cpp_dense_form_runs_the_native_passes_and_the_bf16_gram(monkeypatch, fast):
    """cpp's dense form under bf16 autocast: W' by ``hadamard_weight`` (forward and dx), the
    four factor gradients by ``hadamard_factor_grads``, and G = s·gyᵀ·x by ``gemm_bf16_f32``
    where it is fast (forced here either way, so that any CPU with MKL runs both paths); every output and
    gradient within the tolerance rule of the torch kernels' error against float64."""
    native = pytest.importorskip("pypeft_fast.native")
    if fast and not native.BUILD_INFO.get("mkl_gemm_bf16_f32"):
        pytest.skip("torch without MKL's bf16 GEMM")
    monkeypatch.setattr(native, "GEMM_BF16_F32_FAST", fast)
    calls, real = [], native.ops

    class Spy:
        def __getattr__(self, name):
            op = getattr(real, name)
            return lambda *a: calls.append(name) or op(*a)

    monkeypatch.setattr(native, "ops", Spy())
    case = hada_case(method="dense", lead=(3, 29))
    names = list(case.grads)

    def run(backend):
        leaves = {k: v.float().requires_grad_(k in names) for k, v in {**case.frozen, **case.params}.items()}
        with torch.autocast("cpu", torch.bfloat16):
            y = case.op(backend=backend, **leaves)
        y.backward(rand(*y.shape, seed=11).to(y.dtype))
        return [y.detach()] + [leaves[k].grad for k in names]

    got = run("cpp")
    assert calls.count("hadamard_weight") == 2 and calls.count("hadamard_factor_grads") == 1
    assert calls.count("gemm_bf16_f32") == (1 if fast else 0)
    calls.clear()
    base = run("torch")
    assert calls == []
    leaves64 = {k: v.float().double().requires_grad_(k in names)
                for k, v in {**case.frozen, **case.params}.items()}
    # the float64 reference sees what autocast hands the Function: x, W, b rounded to bf16
    for k in ("x", "weight", "bias"):
        leaves64[k] = leaves64[k].to(torch.bfloat16).double().detach().requires_grad_(k in names)
    y64 = case.ref(**leaves64)
    y64.backward(rand(*y64.shape, seed=11).to(torch.bfloat16).double())
    ref = [y64.detach()] + [leaves64[k].grad for k in names]
    for name, g, r, b in zip(["y"] + names, got, ref, base):
        assert_within(name, g, r, b, b.dtype)


@pytest.mark.parametrize("args, match", [
    (dict(W1a=torch.randn(35, 3), W1b=torch.randn(2, 129)), r"W1b has shape \(2, 129\); expected \(3, 129\)"),
    (dict(W2a=torch.randn(34, 2)), r"W2a has shape \(34, 2\); expected \(35, 2\)"),
    (dict(W2b=torch.randn(2, 128)), r"W2b has shape \(2, 128\); expected \(2, 129\)"),
    (dict(W1a=torch.randn(35, 3, 1)), r"W1a must be 2-D"),
    (dict(W1a=torch.randn(35, 0), W1b=torch.randn(0, 129)), r"W1a has an empty dimension"),
    (dict(method="fast"), r"method must be 'auto', 'factored', 'dense' or a HadamardPlan"),
])
def test_hadamard_bad_inputs(args, match):
    kw = dict(W1a=torch.randn(35, 3), W1b=torch.randn(3, 129), W2a=torch.randn(35, 2),
              W2b=torch.randn(2, 129))
    kw.update(args)
    method = kw.pop("method", "auto")
    with pytest.raises(ValueError, match="layer.q: " + match):
        pf.hadamard_linear(torch.randn(3, 129), torch.randn(35, 129), None, kw["W1a"], kw["W1b"],
                           kw["W2a"], kw["W2b"], name="layer.q", method=method)


# --------------------------------------------------------------------------------------------
# inject(family="hadamard"): tiny models from configs, vs a float64 materialising reference

from test_inject import (  # noqa: E402  (the inject tests' tiny models and reference helpers)
    MODELS, as_reference, check_restored, ids_for, output, perturb, run, trainable,
)
from pypeft_fast.inject import DeltaLinear, delta_modules  # noqa: E402

HADA = dict(family="hadamard", r=3, alpha=6.0)


def build_hada(model_name, dtype=None, **overrides):
    make, targets = MODELS[model_name]
    model = make(0) if dtype is None else make(0).to(dtype)
    return pf.inject(model, pf.DeltaConfig(target_modules=targets, **{**HADA, **overrides}))


@pytest.mark.parametrize("model_name", list(MODELS))
def test_inject_hadamard_init_shapes_and_gradients(model_name):
    ids = ids_for()
    with torch.no_grad():
        y0 = output(MODELS[model_name][0](0), ids)
    model = build_hada(model_name)
    mods = delta_modules(model)
    assert mods and all(isinstance(m, DeltaLinear) for _, m in mods)
    r = HADA["r"]
    assert sum(p.numel() for p in trainable(model).values()) == sum(
        2 * r * (m.in_features + m.out_features) for _, m in mods)
    for _, m in mods:
        assert m.W1a.shape == (m.out_features, r) and m.W2b.shape == (r, m.in_features)
        assert torch.count_nonzero(m.W2b) == 0 and m.W1a.abs().max() > 0 and m.scaling == 2.0
    with torch.no_grad():
        assert torch.equal(output(model, ids), y0), "ΔW = 0 at step 0"
    output(model, ids).square().mean().backward()
    assert all(m.W2b.grad.abs().max() > 0 for _, m in mods), "the zero factor must get a gradient"
    model.zero_grad()

    # ΔW as large as W (scale 0.3), so the delta dominates what is compared. The model-level
    # rule of tests/test_patch.py: a deep model's rounding reaches every gradient, so each
    # tensor's bound is at least the worst relative error plain PyTorch shows on any of them.
    from test_patch import assert_within as assert_model_within, peft_relative_error

    perturb(model, scale=0.3)
    ref32, ref64 = as_reference(model, torch.float32), as_reference(model, torch.float64)
    gy = torch.randn(y0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, g = run(model, ids, gy)
    y32, g32 = run(ref32, ids, gy)
    y64, g64 = run(ref64, ids, gy)
    assert_within(f"{model_name}/hadamard output", y, y64, y32, torch.float32)
    assert set(g) == set(g64) and g
    rel_floor = peft_relative_error(g32, g64)
    for n in g:
        assert g[n].abs().max() > 0, f"{n}: no gradient"
        assert_model_within(f"{model_name}/hadamard d{n}", g[n], g64[n], g32[n], rel_floor)


def test_inject_hadamard_bfloat16_base_with_float32_adapters():
    model = perturb(build_hada("llama", torch.bfloat16), scale=0.3)
    assert all(p.dtype == torch.float32 for p in trainable(model).values())
    ids = ids_for()
    gy = torch.randn(output(model, ids).shape, generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64)
    y, g = run(model, ids, gy)
    yb, gb = run(as_reference(model), ids, gy)
    y64, g64 = run(as_reference(model, torch.float64), ids, gy)
    assert_within("bf16/hadamard output", y, y64, yb, torch.bfloat16)
    for n in g:
        assert g[n].dtype == torch.float32
        assert_within(f"bf16/hadamard d{n}", g[n], g64[n], gb[n], torch.float32)


def test_inject_hadamard_save_load_roundtrip(tmp_path):
    src = perturb(build_hada("llama"), scale=0.3)
    pf.save_adapter(src, tmp_path)
    ids = ids_for()
    with torch.no_grad():
        y_src = output(src, ids)
        fresh = MODELS["llama"][0](0)
        assert not torch.equal(output(fresh, ids), y_src)
    pf.load_adapter(fresh, tmp_path)
    assert {type(m).__name__ for _, m in delta_modules(fresh)} == {"DeltaLinear"}
    assert delta_modules(fresh)[0][1].config.family == "hadamard"
    with torch.no_grad():
        assert torch.equal(output(fresh, ids), y_src)


def test_inject_hadamard_merge_unmerge():
    model = perturb(build_hada("bert"), scale=0.3)
    ids = ids_for()
    with torch.no_grad():
        y_unmerged = output(model, ids)
        y64 = output(as_reference(model, torch.float64), ids)
        y_base = output(MODELS["bert"][0](0), ids)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in delta_modules(model)}
    deltas = {n: m.delta_weight(torch.float64).detach() for n, m in delta_modules(model)}
    pf.merge(model)
    with torch.no_grad():
        y_merged = output(model, ids)
    assert (y_merged - y_base).abs().max() > 1e-2
    assert_within("bert/hadamard merged", y_merged, y64, y_unmerged, torch.float32)
    pf.unmerge(model)
    check_restored(model, weights, deltas)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), r"r must be a positive integer"),
    (dict(alpha=float("nan")), r"alpha must be a finite number"),
    (dict(scaling=2.0), r"option scaling=2.0 belongs to family .*not 'hadamard'"),
    (dict(dropout=0.1), r"option dropout=0.1 belongs to family lowrank, not 'hadamard'"),
])
def test_inject_hadamard_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pf.DeltaConfig(family="hadamard", target_modules=["q_proj"], **kwargs)
