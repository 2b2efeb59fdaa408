"""Parallel adapters on the low-rank family: ``activation=`` between A and B and UniPELT's ``gate``.

The op against a float64 reference in plain autograd (flash-attention's rule, ragged shapes,
every dtype), what is saved (x, the n × r pre-activation, the n-vector gate: nothing n × in
beyond x), backend routing (an explicit native backend raises, auto says so once and runs the
torch kernels), and ``pf.inject(family="lowrank", activation=..., gate=True)`` on a tiny Llama
against a float64 model computing the same adapter with plain autograd.
"""
import copy
import logging
import types

import pytest
import torch
import torch.nn.functional as F

import pypeft_fast as pf
from pypeft_fast import registry
from pypeft_fast.inject.modules import DeltaLinear, delta_modules
from pypeft_fast.measure import saved_bytes
from pypeft_fast.philox import keep_mask
from numerics import DTYPE_CASES, Case, assert_within, check_case, rand

ACT = {None: lambda u: u, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu}


def adapter_reference(x, weight, bias, A, B, s, activation=None, gate=None, p=0.0, seed=None):
    """y = x·Wᵀ + b + s·σ(x·w_g + b_g) ⊙ f(drop(x)·Aᵀ)·Bᵀ, plain autograd, the adapter part
    in the adapter dtype."""
    base = F.linear(x, weight, bias)
    xa = x.to(A.dtype)
    xd = xa
    if p:
        keep = keep_mask(torch.as_tensor(seed), x.numel(), p).view(x.shape)
        xd = xa * keep / (1 - p)
    h = ACT[activation](xd @ A.t())
    if gate is not None:
        h = h * torch.sigmoid(xa @ gate[0] + gate[1]).unsqueeze(-1)
    return (base + s * (h @ B.t())).to(base.dtype)


def adapter_case(activation, gate, dropout=0.0, lead=(2, 19), n_in=45, n_out=38, r=5, seed=4, scaling=0.9):
    frozen = {"x": rand(*lead, n_in, seed=seed), "weight": rand(n_out, n_in, seed=seed + 1) / n_in**0.5,
              "bias": rand(n_out, seed=seed + 2)}
    params = {"A": rand(r, n_in, seed=seed + 3) / n_in**0.5, "B": rand(n_out, r, seed=seed + 4)}
    if gate:
        params["w_g"] = rand(n_in, seed=seed + 5) / n_in**0.5
        params["b_g"] = rand(1, seed=seed + 6)
    drop_seed = 1000 + seed

    def op(x, weight, bias, A, B, backend, w_g=None, b_g=None):
        return pf.lowrank_linear(x, weight, bias, A, B, scaling, dropout, drop_seed, backend,
                                 activation=activation, gate=None if w_g is None else (w_g, b_g))

    def ref(x, weight, bias, A, B, w_g=None, b_g=None):
        return adapter_reference(x, weight, bias, A, B, scaling, activation,
                                 None if w_g is None else (w_g, b_g), dropout, drop_seed)

    grads = ("x", "bias", "A", "B") + (("w_g", "b_g") if gate else ())
    return Case(op, ref, frozen, params, grads)


@pytest.mark.parametrize("activation, gate", [(a, g) for a in (None, "relu", "gelu", "silu")
                                              for g in (False, True) if a or g])  # (None, False): LoRA
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_parallel_adapter_matches_float64(activation, gate, dropout):
    check_case(adapter_case(activation, gate, dropout), "torch", "fp32")


@pytest.mark.parametrize("dtype_case", [d for d in DTYPE_CASES if d != "fp32"])
def test_parallel_adapter_every_dtype(dtype_case):
    check_case(adapter_case("gelu", True, 0.1, lead=(67,), n_in=33, n_out=70, r=3), "torch", dtype_case)


def test_parallel_adapter_saves_x_the_pre_activation_and_the_gate_only():
    g = torch.Generator().manual_seed(0)
    n, k, o, r = 24, 256, 192, 4
    x = torch.randn(n, k, generator=g, requires_grad=True)
    W, b = torch.randn(o, k, generator=g), torch.randn(o, generator=g)
    A, B = torch.randn(r, k, generator=g, requires_grad=True), torch.randn(o, r, generator=g, requires_grad=True)
    wg, bg = torch.randn(k, generator=g, requires_grad=True), torch.zeros(1, requires_grad=True)
    total, ptrs, y = saved_bytes(
        lambda: pf.lowrank_linear(x, W, b, A, B, 0.5, 0.1, 3, "torch", activation="silu", gate=(wg, bg)),
        exclude=(W, b, A, B, wg, bg))
    assert x.untyped_storage().data_ptr() in ptrs
    assert total <= x.numel() * 4 + n * r * 4 + n * 4 + 64, f"saved {total} bytes"
    y.sum().backward()
    assert wg.grad is not None and A.grad is not None


def test_backends_without_the_variant_raise_when_named_and_auto_says_so_once(caplog):
    c = adapter_case("relu", True)
    x, W, b = (c.frozen[k].float() for k in ("x", "weight", "bias"))
    A, B, wg, bg = (c.params[k].float() for k in ("A", "B", "w_g", "b_g"))
    cpu = torch.device("cpu")
    hp = pf.families.lowrank.LowRankHP(0.9, 0.0, activation="relu", gate=True)
    for name, entry in registry.FAMILIES["lowrank"].backends.items():
        if name == "torch" or registry.why_unavailable("lowrank", name, cpu) is not None:
            continue
        assert registry.why_declined(entry.kernels, x, W, (A, B, wg, bg), (), hp) is not None  # no native/Triton path yet
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot serve adapter"):
            pf.lowrank_linear(x, W, b, A, B, 0.9, backend=name, activation="relu", gate=(wg, bg), name="l.q")
    want = pf.lowrank_linear(x, W, b, A, B, 0.9, backend="torch", activation="relu", gate=(wg, bg))
    registry._warned_declines.clear()
    with caplog.at_level(logging.INFO, logger="pypeft_fast"):
        for _ in range(3):
            got = pf.lowrank_linear(x, W, b, A, B, 0.9, backend="auto", activation="relu", gate=(wg, bg))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    auto, _ = registry.resolve("lowrank", "auto", cpu)
    msgs = [r.message for r in caplog.records if "does not serve adapter" in r.message]
    assert len(msgs) == (0 if auto == "torch" else 1), msgs


def test_bad_activation_and_gate_raise_naming_the_layer():
    c = adapter_case("relu", False)
    x, W, A, B = c.frozen["x"], c.frozen["weight"], c.params["A"], c.params["B"]
    with pytest.raises(ValueError, match=r"l\.up: activation must be None or one of"):
        pf.lowrank_linear(x, W, None, A, B, activation="tanh", name="l.up")
    with pytest.raises(ValueError, match=r"l\.up: gate\[0\] has shape \(44,\); expected \(45,\)"):
        pf.lowrank_linear(x, W, None, A, B, gate=(torch.ones(44, dtype=torch.float64),
                                                    torch.ones(1, dtype=torch.float64)), name="l.up")
    with pytest.raises(ValueError, match="gate must be a pair"):
        pf.lowrank_linear(x, W, None, A, B, gate=torch.ones(45, dtype=torch.float64))


# ---------------------------------------------------------------- pf.inject

transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _reference_forward(self, x):
    p, cfg = self._parameters, self.config
    w = self.base_weight()
    gate = (p["gate_weight"], p["gate_bias"]) if cfg.gate else None
    return adapter_reference(x, w, self.base_layer.bias, p["A"], p["B"], self.scaling, cfg.activation, gate)


def reference_model(model, forward):
    ref = copy.deepcopy(model).double()
    for _, m in delta_modules(ref):
        m.forward = types.MethodType(forward, m)
    return ref


def compare_injected(model, forward, ids):
    """Output and every delta gradient of ``model`` vs a float64 copy computing with ``forward``,
    the baseline the same plain-autograd forward in float32."""
    gy = torch.randn(ids.shape + (101,), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    runs = {}
    for key, mdl in (("pf", model), ("ref64", reference_model(model, forward)),
                     ("ref32", reference_model(model, forward).float())):
        mdl.zero_grad(set_to_none=True)
        y = mdl(input_ids=ids).logits
        (y.double() * gy).sum().backward()
        runs[key] = (y.detach(), {n: p.grad for n, p in mdl.named_parameters() if p.requires_grad})
    (yp, gp), (y64, g64), (yb, gb) = runs["pf"], runs["ref64"], runs["ref32"]
    assert_within("output", yp, y64, yb, torch.float32)
    assert set(gp) == set(g64) and gp
    for k in g64:
        assert gp[k].abs().max() > 0, f"{k}: zero gradient"
        assert_within(f"grad {k}", gp[k], g64[k], gb[k], torch.float32)


@pytest.mark.parametrize("activation, gate", [("gelu", True), ("relu", False), (None, True), ("silu", True)])
def test_injected_parallel_adapter_matches_float64(activation, gate):
    model = tiny_llama()
    ids = torch.randint(1, 101, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    model = pf.inject(model, pf.DeltaConfig(family="lowrank", r=4, alpha=8, activation=activation, gate=gate,
                                            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    mods = delta_modules(model)
    assert len(mods) == 8 and all(isinstance(m, DeltaLinear) for _, m in mods)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, y0, rtol=0, atol=0)  # B = 0 at step 0
        g = torch.Generator().manual_seed(3)
        for _, m in mods:
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.2)
    if gate:
        assert {"gate_weight", "gate_bias"} <= set(mods[0][1].delta_names)
        assert tuple(mods[0][1].gate_weight.shape) == (48,)
    compare_injected(model, _reference_forward, ids)
    with pytest.raises(ValueError, match="has no additive ΔW to merge"):
        pf.merge(model)
    assert not any(m.merged for _, m in mods)


def test_parallel_adapter_options_are_checked():
    with pytest.raises(ValueError, match="activation must be None or one of"):
        pf.DeltaConfig(family="lowrank", target_modules=["q_proj"], activation="tanh")
    with pytest.raises(ValueError, match="cannot be combined"):
        pf.DeltaConfig(family="lowrank", target_modules=["q_proj"], magnitude=True, gate=True)
    with pytest.raises(ValueError, match="belongs to family lowrank"):
        pf.DeltaConfig(family="phm", target_modules=["q_proj"], activation="relu")
    cfg = pf.DeltaConfig(family="lowrank", target_modules=["q_proj"], activation="silu", gate=True)
    assert pf.DeltaConfig.from_dict(cfg.to_dict()) == cfg


def test_injected_parallel_adapter_saves_and_loads(tmp_path):
    model = pf.inject(tiny_llama(), pf.DeltaConfig(family="lowrank", r=2, activation="silu", gate=True,
                                                   target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for _, m in delta_modules(model):
            m.B.normal_()
            m.gate_bias.fill_(0.3)
    ids = torch.randint(1, 101, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(input_ids=ids).logits
    pf.save_adapter(model, tmp_path)
    fresh = pf.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, y, rtol=0, atol=0)
