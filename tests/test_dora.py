"""DoRA (``lowrank_linear(..., magnitude=m)``; peft ``LoraConfig(use_dora=True)`` through pf.patch).

The op against a float64 materialising reference (flash-attention's rule, ragged shapes, every
dtype and CPU backend), then patched peft DoRA models against unpatched peft — logits and every
gradient, the magnitude's included —, dropout against a reference fed the same Philox masks, and
the memory properties: nothing ΔW-sized is ever allocated, only vectors of length out are saved
beyond what LoRA saves (plus, at p = 0, the op's own output).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypeft_fast as pf
from pypeft_fast import registry
from pypeft_fast.families import lowrank_dora
from pypeft_fast.families.lowrank import LowRankHP
from pypeft_fast.measure import LargestAllocation, saved_bytes
from pypeft_fast.philox import keep_mask
from numerics import DTYPE_CASES, Case, check_case, cpu_backends, rand


def dora_reference(x, weight, bias, A, B, m, s, p=0.0, seed=None, b_B=None):
    """peft's DoRA written out (its dtype handling too: the adapter part in the adapter dtype),
    materialising W + s·B·A; the norm detached."""
    base = F.linear(x, weight, bias)                               # the base layer, base dtype
    x, w = x.to(A.dtype), weight.to(A.dtype)
    lora_w = B @ A if b_B is None else B @ A + b_B[:, None]
    norm = torch.linalg.vector_norm(w + s * lora_w, dim=1).detach()
    c = m / norm
    xd = x
    if p:
        keep = keep_mask(torch.as_tensor(seed), x.numel(), p).view(x.shape)
        xd = x * keep / (1 - p)
    lora = xd @ A.t() @ B.t() + (0 if b_B is None else b_B)
    base_d = (base - (0 if bias is None else bias)) if not p else xd @ w.t()
    return (base + (c - 1) * base_d + c * s * lora).to(base.dtype)


def serving_backends(hp) -> list[str]:
    """The CPU backends whose low-rank kernels serve this variant (the others raise, tested)."""
    fam = registry.FAMILIES["lowrank"].backends
    return [b for b in cpu_backends("lowrank")
            if registry.why_declined(fam[b].kernels, None, None, (), (), hp) is None]


DORA_BACKENDS = serving_backends(LowRankHP(1.0, 0.0, magnitude=True))


def dora_case(lead=(3, 23), n_in=97, n_out=61, r=4, dropout=0.0, seed=3, bias=True, lora_bias=False,
              scaling=0.8):
    frozen = {"x": rand(*lead, n_in, seed=seed), "weight": rand(n_out, n_in, seed=seed + 1) / n_in**0.5}
    if bias:
        frozen["bias"] = rand(n_out, seed=seed + 2)
    params = {"A": rand(r, n_in, seed=seed + 3) / n_in**0.5, "B": rand(n_out, r, seed=seed + 4) / r**0.5,
              "m": 0.5 + rand(n_out, seed=seed + 5).abs()}
    if lora_bias:
        params["b_B"] = rand(n_out, seed=seed + 6) * 0.3
    drop_seed = seed * 977 + 5

    def op(x, weight, A, B, m, backend, bias=None, b_B=None):
        return pf.lowrank_linear(x, weight, bias, A, B, scaling, dropout, drop_seed, backend,
                                 magnitude=m, lora_bias=b_B)

    def ref(x, weight, A, B, m, bias=None, b_B=None):
        return dora_reference(x, weight, bias, A, B, m, scaling, dropout, drop_seed, b_B)

    grads = ("x", "A", "B", "m") + (("bias",) if bias else ()) + (("b_B",) if lora_bias else ())
    return Case(op, ref, frozen, params, grads)


@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("backend", DORA_BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_matches_float64(backend, dtype_case, dropout):
    case = dora_case(dropout=dropout)
    if backend not in serving_backends(LowRankHP(1.0, dropout, magnitude=True)):
        t = {k: v.float() for k, v in {**case.frozen, **case.params}.items()}  # named: it raises
        with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot serve dora"):
            case.op(backend=backend, **t)
        return
    check_case(case, backend, dtype_case)


@pytest.mark.parametrize("source", ["output", "recompute", "saved"])
@pytest.mark.parametrize("kw", [dict(lora_bias=True), dict(bias=False, dropout=0.3, lora_bias=True),
                                dict(lead=(1,), n_in=5, n_out=3, r=1, dropout=0.5),
                                dict(lead=(2, 3, 5), n_in=33, n_out=130, r=7, bias=False)])
def test_dora_every_magnitude_gradient_source(monkeypatch, source, kw):
    """The three ways to get dm (module docstring of lowrank_dora) give the same numbers."""
    if source != "output":
        monkeypatch.setenv("PYPEFT_FAST_DORA_DM", source)
    check_case(dora_case(**kw), "torch", "fp32")


@pytest.mark.skipif("cpp" not in DORA_BACKENDS, reason="the native extension is not built")
@pytest.mark.parametrize("dtype_case", list(DTYPE_CASES))
@pytest.mark.parametrize("p", [0.05, 0.2])
@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
def test_native_dora_dropout_without_the_second_frozen_gemm(monkeypatch, dtype_case, p, x_grad):
    """cpp at p > 0: x̃·Wᵀ from one frozen GEMM and an SpMM over the dropped entries
    (native.NativeDoRA); c near 1 as in training (c − p ≥ SPARSE_MIN_GAP). no-dx: x needs no
    gradient (a model's first adapted layers, after the frozen embedding): the backward then
    gets a shape-only stand-in for W and must take W from what forward kept. A bf16/fp16 W
    (the other dtype cases) is not converted to float32 for the SpMM — a weight-sized copy per
    call —: those calls run the "saved" source, with the same numbers."""
    from pypeft_fast import native

    monkeypatch.setenv("PYPEFT_FAST_DORA_DM", "sparse")
    calls = []
    real = native.NativeDoRA._dropped_csr
    monkeypatch.setattr(native.NativeDoRA, "_dropped_csr",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    case = dora_case(dropout=p, lora_bias=True, lead=(5, 13), n_in=70, n_out=41)
    W, A, B = case.frozen["weight"], case.params["A"], case.params["B"]
    norm = torch.linalg.vector_norm(W + 0.8 * (B @ A + case.params["b_B"][:, None]), dim=1)
    case.params["m"] = norm * (0.8 + 0.4 * rand(41, seed=9).sigmoid())   # c in (0.8, 1.2)
    if not x_grad:
        case.grads = tuple(k for k in case.grads if k != "x")
    check_case(case, "cpp", dtype_case)
    if DTYPE_CASES[dtype_case][0] == torch.float32:
        assert len(calls) >= 2  # forward and backward took the dropped-set path
    else:
        assert calls == []      # a low-precision W: the "saved" source, no float32 copy of W


def test_dora_magnitude_entry_exactly_zero_still_gets_its_gradient():
    c = dora_case(lead=(9,), n_in=20, n_out=11, r=2)
    c.params["m"][[0, 4]] = 0.0
    check_case(c, "torch", "fp32")


def test_factored_norm_equals_the_materialised_norm_and_is_cached_per_weight_version():
    W, A, B, bB = rand(70, 45, seed=1), rand(5, 45, seed=2), rand(70, 5, seed=3), rand(70, seed=4)
    for b in (None, bB):
        got = lowrank_dora.factored_norm(W, A, B, 0.6, b, torch.float64)
        want = torch.linalg.vector_norm(W + 0.6 * (B @ A + (0 if b is None else b[:, None])), dim=1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    stats = lowrank_dora.weight_row_stats(W, torch.float64)
    assert lowrank_dora.weight_row_stats(W, torch.float64) is stats  # cached
    assert lowrank_dora.weight_row_stats(W.t().t(), torch.float64) is stats  # same storage and geometry
    with torch.no_grad():
        W.mul_(2.0)  # in place: a new version
    sq, _ = lowrank_dora.weight_row_stats(W, torch.float64)
    torch.testing.assert_close(sq, 4 * stats[0])
    Wt = rand(45, 70, seed=5)  # a Conv1D's stored (in, out) weight: the op sees Wt.t()
    s1 = lowrank_dora.weight_row_stats(Wt.t(), torch.float64)
    assert lowrank_dora.weight_row_stats(Wt.t(), torch.float64) is s1  # a fresh view, the same cache
    torch.testing.assert_close(s1[0], (Wt.t() ** 2).sum(1))


@pytest.mark.parametrize("backend, p", [(b, p) for p in (0.0, 0.1)
                                        for b in serving_backends(LowRankHP(1.0, p, magnitude=True))])
def test_dora_forms_the_weight_norm_once_per_forward(monkeypatch, backend, p):
    """The norm's W·Aᵀ is a pass over W: a backend that falls back to the torch kernels' sources
    hands them its norm instead of forming it again (native.NativeDoRA at p = 0 did)."""
    calls = []
    real = lowrank_dora.w_times_at
    monkeypatch.setattr(lowrank_dora, "w_times_at", lambda *a: calls.append(1) or real(*a))
    case = dora_case(dropout=p)
    args = {k: v.float() for k, v in {**case.frozen, **case.params}.items()}
    for k in case.params:
        args[k].requires_grad_(True)
    y = case.op(args.pop("x"), args.pop("weight"), backend=backend, **args)
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 1  # the backward reuses the saved norm


@pytest.mark.parametrize("backend, p", [(b, p) for p in (0.0, 0.1)
                                        for b in serving_backends(LowRankHP(1.0, p, magnitude=True))])
def test_dora_norm_under_autocast_reads_the_float32_weight(monkeypatch, backend, p):
    """Under bf16 autocast the frozen GEMMs take W's bf16 cast; the norm ‖W + s·B·A‖ reads the
    float32 W itself (peft's norm for a float32 x), to float32 precision, where the cast's norm
    is ≈ 1e-4 off at this width. Its ‖Wᵢ‖² is formed once, not per call: the cast is a new
    tensor every step, which missed the cache (and was converted back to float32 for W·Aᵀ)."""
    stats = []
    real = lowrank_dora._row_stats
    monkeypatch.setattr(lowrank_dora, "_row_stats", lambda *a: stats.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    n_out, n_in, r, s = 61, 97, 4, 0.7
    W = torch.randn(n_out, n_in, generator=g)
    A = (torch.randn(r, n_in, generator=g) * 0.3).requires_grad_()
    B = (torch.randn(n_out, r, generator=g) * 0.3).requires_grad_()
    m = (torch.linalg.vector_norm(W, dim=1) * (0.9 + 0.2 * torch.rand(n_out, generator=g))).requires_grad_()
    x = torch.randn(2, 9, n_in, generator=g, requires_grad=True)
    norms = []

    def pack(t):
        if t.shape == (n_out,) and t.dtype == torch.float32 and t is not m:
            norms.append(t)
        return t

    for _ in range(2):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            y = pf.lowrank_linear(x, W, None, A, B, s, p, 5, backend, magnitude=m)
        y.float().sum().backward()
    want = torch.linalg.vector_norm(W.double() + s * (B.double() @ A.double()), dim=1)
    cast = torch.linalg.vector_norm(W.bfloat16().double() + s * (B.double() @ A.double()), dim=1)
    assert ((cast - want).abs() / want).max() > 2e-5  # the test tells the two weights apart
    assert len(norms) == 2, f"{len(norms)} (out,) float32 tensors saved; expected the norm once per call"
    for got in norms:
        err = ((got.double() - want).abs() / want).max().item()
        assert err < 2e-6, f"norm {err:.1e} off the float32 weight's"
    assert len(stats) == 1  # ‖Wᵢ‖² once for both calls


N, IN, OUT, R = 16, 512, 384, 4


@pytest.mark.parametrize("backend, p", [(b, p) for p in (0.0, 0.1)
                                        for b in serving_backends(LowRankHP(1.0, p, magnitude=True))])
def test_dora_never_allocates_anything_weight_sized(backend, p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=g, requires_grad=True)
    W = torch.randn(OUT, IN, generator=g).to(torch.bfloat16)  # converted a block at a time
    A, B = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    m = torch.rand(OUT, generator=g) + 0.5
    for t in (A, B, m):
        t.requires_grad_(True)
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    old = lowrank_dora.ROWS_PER_CHUNK_ELEMENTS
    lowrank_dora.ROWS_PER_CHUNK_ELEMENTS = OUT * IN // 16
    try:
        with LargestAllocation() as rec:
            pf.lowrank_linear(xb, W, None, A, B, 0.5, p, 3, backend, magnitude=m).float().sum().backward()
    finally:
        lowrank_dora.ROWS_PER_CHUNK_ELEMENTS = old
    assert rec.largest < OUT * IN // 4, f"{rec.op} produced {rec.largest} elements; W has {OUT * IN}"
    assert m.grad is not None and A.grad is not None


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dora_saves_what_lora_saves_plus_vectors_of_length_out(p):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, N // 2, IN, generator=g, requires_grad=True)
    W, b = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    A, B = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    m = (torch.rand(OUT, generator=g) + 0.5)
    for t in (A, B, m):
        t.requires_grad_(True)
    lora, _, _ = saved_bytes(lambda: pf.lowrank_linear(x, W, b, A, B, 0.5, p, 3, "torch"),
                             exclude=(W, b, A, B))
    total, ptrs, y = saved_bytes(lambda: pf.lowrank_linear(x, W, b, A, B, 0.5, p, 3, "torch", magnitude=m),
                                 exclude=(W, b, A, B, m))
    vectors = 2 * OUT * 4
    output = y.numel() * y.element_size()  # p = 0: the output itself; p > 0: x̃·Wᵀ (peft's own)
    assert x.untyped_storage().data_ptr() in ptrs
    if p == 0:
        assert y.untyped_storage().data_ptr() in ptrs, "p = 0 keeps the output, no copy of it"
    assert total <= lora + vectors + output, f"saved {total} bytes; LoRA saves {lora}"
    y.sum().backward()
    assert m.grad is not None


def test_bad_magnitude_and_combinations_raise_naming_the_layer():
    c = dora_case()
    x, W, A, B = (c.frozen["x"], c.frozen["weight"], c.params["A"], c.params["B"])
    with pytest.raises(ValueError, match=r"layer\.q: magnitude has shape \(60,\); expected \(61,\)"):
        pf.lowrank_linear(x, W, None, A, B, magnitude=torch.ones(60, dtype=torch.float64), name="layer.q")
    with pytest.raises(ValueError, match="cannot be combined"):
        pf.lowrank_linear(x, W, None, A, B, magnitude=torch.ones(61, dtype=torch.float64), activation="relu")
    with pytest.raises(ValueError, match="lora_bias is DoRA's"):
        pf.lowrank_linear(x, W, None, A, B, lora_bias=torch.ones(61, dtype=torch.float64))


# ---------------------------------------------------------------- pf.patch on peft DoRA models

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402

from test_patch import (  # noqa: E402
    LLAMA_TARGETS, MODELS, SeededDropout, _train, assert_within, batch_for,
    compare_to_peft, outputs, peft_relative_error, run,
)


def _recording_seeds(monkeypatch):
    """Record every dropout seed the ops draw (wherever the draw is imported from)."""
    import pypeft_fast.families.lowrank as lowrank_mod
    import pypeft_fast.philox as philox_mod

    seeds, real = [], philox_mod.draw_seed

    def record(*a, **k):
        s = real(*a, **k)
        seeds.append(s.clone())
        return s

    for mod in (philox_mod, lowrank_mod):
        if hasattr(mod, "draw_seed"):
            monkeypatch.setattr(mod, "draw_seed", record)
    return seeds


def _randomise_magnitudes(model):
    """peft initialises m = ‖W + s·B·A‖ (c = 1); move it so every c-dependent term is exercised."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


DORA_CASES = {
    "llama-dora": ("llama", lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_TARGETS,
                                               init_lora_weights=False), torch.float32),
    "llama-dora-bf16-base-fp32-adapters": ("llama", lambda: LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_TARGETS, init_lora_weights=False), torch.bfloat16),
    "bert-dora-bias-all": ("bert", lambda: LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["query", "key", "value", "dense"], bias="all",
        init_lora_weights=False), torch.float32),
    # peft's config refuses lora_bias with DoRA, but its DoRA forward and norm do handle a lora_B
    # bias (it enters the norm broadcast over the row): given one by hand, peft's math is matched
    "bert-dora-lora-B-bias-by-hand": ("bert", lambda: LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value"], init_lora_weights=False),
        torch.float32),
    "gpt2-dora-conv1d": ("gpt2", lambda: LoraConfig(
        r=3, lora_alpha=6, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=False), torch.float32),
}


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_patched_dora_matches_peft(case):
    kind, make_cfg, dtype = DORA_CASES[case]
    model = _randomise_magnitudes(get_peft_model(MODELS[kind](dtype), make_cfg()))
    model.train()
    if "by-hand" in case:
        g = torch.Generator().manual_seed(5)
        for mod in model.modules():
            if isinstance(mod, peft.tuners.lora.layer.Linear):
                old = mod.lora_B["default"]
                new = nn.Linear(old.in_features, old.out_features, bias=True)
                with torch.no_grad():
                    new.weight.copy_(old.weight)
                    new.bias.copy_(torch.randn(old.out_features, generator=g) * 0.3)
                mod.lora_B["default"] = new
    n_layers = sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    assert n_layers > 0 and all(
        "default" in m.lora_variant for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    report = compare_to_peft(model, batch_for(kind), expect_served=n_layers)
    assert len(report.patched) == n_layers


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_patched_dora_dropout_matches_reference_with_the_same_masks(monkeypatch, backend):
    p = 0.3
    model = _randomise_magnitudes(get_peft_model(MODELS["llama"](), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=p, use_dora=True, target_modules=LLAMA_TARGETS, init_lora_weights=False)))
    model.train()
    batch = batch_for("llama")
    ref32, ref64, patched = copy.deepcopy(model), copy.deepcopy(model).double(), copy.deepcopy(model)
    report = pf.patch(patched, backend=backend)
    seeds = _recording_seeds(monkeypatch)
    gy = torch.randn(2, 13, 101, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    yp, gp = run(patched, batch, gy)
    assert len(seeds) == len(report.patched) == 14

    def seeded(ref):
        for mod in ref.modules():
            if isinstance(mod, peft.tuners.lora.layer.Linear):
                mod.lora_dropout["default"] = SeededDropout(p, queue)  # peft then adds base(drop(x))
        return ref

    queue = list(seeds)
    y64, g64 = run(seeded(ref64), batch, gy)
    queue[:] = list(seeds)
    yb, gb = run(seeded(ref32), batch, gy)
    assert_within("output", yp, y64, yb)
    rel_floor = peft_relative_error(gb, g64)
    assert any("lora_magnitude_vector" in k for k in g64)
    for k in g64:
        assert_within(f"grad {k}", gp[k], g64[k], gb[k], rel_floor)
    # the p > 0 path differs from p = 0 (peft's base(drop(x)) terms): eval gives other outputs
    patched.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(patched, batch), outputs(model, batch), rtol=1e-5, atol=1e-5)
    assert sum(sum(e.fallback_calls.values()) for e in report.entries) == 0


def test_merged_dora_runs_peft_and_unmerged_is_served_again():
    model = _randomise_magnitudes(get_peft_model(MODELS["llama"](), LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"], init_lora_weights=False)))
    model.eval()
    batch = batch_for("llama")
    with torch.no_grad():
        ref = outputs(model, batch)
        report = pf.patch(model, strict=True)
        torch.testing.assert_close(outputs(model, batch), ref, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(outputs(model, batch), ref, rtol=1e-4, atol=1e-4)
        assert any("adapter merged into the base weight" in e.fallback_calls for e in report)
        model.unmerge_adapter()
        served = sum(e.served_calls for e in report)
        torch.testing.assert_close(outputs(model, batch), ref, rtol=1e-4, atol=1e-4)
        assert sum(e.served_calls for e in report) == served + 4


def test_ten_dora_training_steps_match_peft():
    batch = batch_for("llama", seed=5)
    model = get_peft_model(MODELS["llama"](), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                         target_modules=LLAMA_TARGETS))
    patched = copy.deepcopy(model)
    report = pf.patch(patched, strict=True)
    ref = _train(model, batch, 10)
    got = _train(patched, batch, 10)
    assert ref[-1] < ref[0] - 0.05, f"training does not move the loss: {ref}"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    assert min(e.served_calls for e in report) == 10
    for (n, p), (_, q) in zip(model.named_parameters(), patched.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=lambda msg: f"{n}: {msg}")


# ---------------------------------------------------------------- pf.inject(magnitude=True)

def test_injected_dora_matches_float64_and_starts_unchanged(tmp_path):
    import types

    from numerics import assert_within as assert_within_rule
    from pypeft_fast.inject.modules import delta_modules

    def reference_forward(self, x):
        p = self._parameters
        return dora_reference(x, self.base_weight(), self.base_layer.bias, p["A"], p["B"], p["magnitude"],
                              self.scaling)

    model = MODELS["llama"]()
    ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    model = pf.inject(model, pf.DeltaConfig(family="lowrank", r=4, alpha=8, magnitude=True,
                                            target_modules=LLAMA_TARGETS))
    mods = delta_modules(model)
    assert len(mods) == 14 and all(tuple(m.magnitude.shape) == (m.out_features,) for _, m in mods)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, y0, rtol=0, atol=0)  # c = 1, B = 0
        g = torch.Generator().manual_seed(3)
        for _, m in mods:
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.2)
            m.magnitude.mul_(0.5 + torch.rand(m.magnitude.shape, generator=g))
    gy = torch.randn(2, 9, 101, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    runs = []
    for mdl in (model, copy.deepcopy(model).double(), copy.deepcopy(model)):
        if mdl is not model:
            for _, m in delta_modules(mdl):
                m.forward = types.MethodType(reference_forward, m)
        mdl.zero_grad(set_to_none=True)
        y = mdl(input_ids=ids).logits
        (y.double() * gy).sum().backward()
        runs.append((y.detach(), {n: q.grad for n, q in mdl.named_parameters() if q.requires_grad}))
    (yp, gp), (y64, g64), (yb, gb) = runs
    assert_within_rule("output", yp, y64, yb, torch.float32)
    assert any(k.endswith("magnitude") for k in g64) and set(gp) == set(g64)
    for k in g64:
        assert_within_rule(f"grad {k}", gp[k], g64[k], gb[k], torch.float32)
    with pytest.raises(ValueError, match="has no additive ΔW to merge"):
        pf.merge(model)
    pf.save_adapter(model, tmp_path)
    fresh = pf.load_adapter(MODELS["llama"](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, yp, rtol=0, atol=0)
