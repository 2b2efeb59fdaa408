"""pf.inject on tiny Llama, BERT and GPT-2 (Conv1D) models built from configs (random weights).

Every numeric check compares against a float64 model whose injected layers materialise ΔW through
the registry and use plain autograd (flash-attention's rule: error ≤ 2× the error of the same
materialising reference run in float32, plus a few ulps). Zero-initialised delta factors are set
to random values first, so a wrong gradient or a lost delta cannot pass.
"""
from __future__ import annotations

import copy
import json
import os
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.inject import DeltaLinear, delta_modules  # noqa: E402
from pypeft_fast.inject.io import WEIGHTS_NAME  # noqa: E402
from pypeft_fast.inject.specs import factorization  # noqa: E402
from pypeft_fast.reference import reference_linear  # noqa: E402
from numerics import assert_within  # noqa: E402

H, INTER, VOCAB = 48, 112, 97  # GPT-2: c_attn 48→144, c_fc 48→192; Llama k/v 48→24


def tiny_llama(seed=0, hidden=H):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=INTER, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=INTER, vocab_size=VOCAB, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "bert": (tiny_bert, ["query", "key", "value", "dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
}

FAMILIES = {
    "lowrank": dict(family="lowrank", r=3, alpha=6.0),
    "kronecker": dict(family="kronecker", scaling=0.7),
    "kronecker-lowrank": dict(family="kronecker", factor_shape=(4, 4), rank=2),
    "phm-shared": dict(family="phm", n=4),
    "phm-lowrank-perlayer": dict(family="phm", n=4, shared_A=False, rank=2, scaling=0.5),
    "sparse-random": dict(family="sparse", density=0.05, seed=3),
    "sparse-largest": dict(family="sparse", density=0.05, mask="largest", scaling=2.0),
    "sparse-block": dict(family="sparse", density=0.1, mask="block", block_size=(4, 4)),
}


def build(model_name, family, model_seed=0, **overrides):
    make, targets = MODELS[model_name]
    model = make(model_seed)
    return pf.inject(model, pf.DeltaConfig(target_modules=targets, **{**FAMILIES[family], **overrides}))


def ids_for(seed=11, batch=2, seq=13):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def output(model, ids):
    out = model(input_ids=ids)
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state + out.pooler_output[:, None, :]  # BERT: reach pooler.dense too


@torch.no_grad()
def perturb(model, seed=7, scale=0.08):
    """Random values in every delta tensor (the zero-initialised ones included); DoRA's magnitude
    (initialised to the row norms) is scaled by [0.5, 1.5) instead, so c = m / ‖V‖ stays O(1)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for _, m in delta_modules(model):
        for k in (*m.shared_names, *m.delta_names):
            p = getattr(m, k)
            if id(p) not in seen:
                seen.add(id(p))
                if k == "magnitude":
                    p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return model


def _reference_forward(self, x):
    if self.family == "lowrank" and self.config.magnitude:  # DoRA: no additive ΔW; peft's math
        from pypeft_fast.philox import draw_seed
        from test_dora import dora_reference
        p = self.config.dropout if self.training else 0.0  # the seed drawn where the op draws it
        return dora_reference(x, self.base_weight(), self.base_layer.bias, self.A, self.B, self.magnitude,
                              self.scaling, p, draw_seed() if p else None)
    return reference_linear(x, self.base_weight(), self.base_layer.bias, self.delta_weight())


def as_reference(model, dtype=None):
    """A copy of ``model`` (cast to ``dtype`` unless None) whose injected layers materialise ΔW
    with plain autograd."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref = ref.to(dtype)
    for _, m in delta_modules(ref):
        m.forward = types.MethodType(_reference_forward, m)
    return ref


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run(model, ids, gy):
    y = output(model, ids)
    (y * gy.to(y.dtype)).sum().backward()
    return y.detach(), {n: p.grad for n, p in trainable(model).items()}


def layer_shapes(model):
    return {n: (m.out_features, m.in_features) for n, m in delta_modules(model)}


def expected_trainable(family, shapes):
    opts = FAMILIES[family]
    if opts["family"] == "lowrank":
        return sum(opts["r"] * (o + i) for o, i in shapes.values())
    if opts["family"] == "kronecker":
        total = 0
        for o, i in shapes.values():
            if "factor_shape" in opts:
                a_o, a_i = opts["factor_shape"]
            else:  # peft LoKr's own factorization where peft is installed (an independent oracle)
                try:
                    from peft.tuners.lokr.layer import factorization as peft_factorization
                except Exception:
                    peft_factorization = factorization
                a_o, a_i = peft_factorization(o, -1)[0], peft_factorization(i, -1)[0]
            b_o, b_i = o // a_o, i // a_i
            rank = opts.get("rank")
            total += a_o * a_i + (b_o * b_i if rank is None else rank * (b_o + b_i))
        return total
    if opts["family"] == "phm":
        n, rank = opts["n"], opts.get("rank")
        per_b = (lambda o, i: o * i // n) if rank is None else (lambda o, i: n * rank * (o // n + i // n))
        a = n ** 3 if opts.get("shared_A", True) else n ** 3 * len(shapes)
        return a + sum(per_b(o, i) for o, i in shapes.values())
    d = opts["density"]
    if opts.get("mask") == "block":
        bo, bi = opts["block_size"]
        return sum(round(d * o * i / (bo * bi)) * bo * bi for o, i in shapes.values())
    return sum(round(d * o * i) for o, i in shapes.values())


# --------------------------------------------------------------------------------------------
# injection: types, frozen base, counts, step-0 outputs


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_inject_wraps_freezes_and_leaves_outputs_unchanged(model_name, family):
    make, targets = MODELS[model_name]
    base = make(0)
    ids = ids_for()
    with torch.no_grad():
        y0 = output(base, ids)
    originals = {n: (type(m), m.weight) for n, m in base.named_modules()
                 if any(n == t or n.endswith("." + t) for t in targets)}
    model = pf.inject(base, pf.DeltaConfig(target_modules=targets, **FAMILIES[family]))
    assert model is base
    mods = dict(delta_modules(model))
    assert set(mods) == set(originals) and len(mods) > 0
    for n, m in mods.items():
        assert isinstance(m, DeltaLinear) and type(m.base_layer) is originals[n][0]
        assert m.base_layer.weight is originals[n][1], f"{n}: the base Parameter was replaced"
        assert m.layer_name == n
    if model_name == "gpt2":
        assert {m.base_kind for m in mods.values()} == {"Conv1D"}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(".base_layer." in n or not any(n.startswith(t) for t in mods) for n in frozen)
    expected = expected_trainable(family, layer_shapes(model))
    assert sum(p.numel() for p in trainable(model).values()) == expected
    report = pf.trainable_report(model)
    assert report.trainable == expected
    assert report.total == sum(p.numel() for p in model.parameters())
    assert f"DeltaLinear[{FAMILIES[family]['family']}]" in str(report)
    y = output(model, ids)
    assert torch.equal(y, y0), f"step-0 outputs changed by {(y - y0).abs().max().item():.3g}"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_float64_reference(model_name, family):
    """Output and the gradient of every delta Parameter vs a float64 materialising reference; the
    frozen base gets no gradient. Zero-init factors are randomised first."""
    model = perturb(build(model_name, family))
    ref32, ref64 = as_reference(model, torch.float32), as_reference(model, torch.float64)
    ids = ids_for()
    gy = torch.randn(output(ref64, ids).shape, generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64)
    y, g = run(model, ids, gy)
    y32, g32 = run(ref32, ids, gy)
    y64, g64 = run(ref64, ids, gy)
    assert_within(f"{model_name}/{family} output", y, y64, y32, torch.float32)
    assert set(g) == set(g64) and g
    for n in g:
        assert g[n] is not None and g[n].abs().max() > 0, f"{n}: no gradient"
        assert_within(f"{model_name}/{family} d{n}", g[n], g64[n], g32[n], torch.float32)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {n} received a gradient"


@pytest.mark.parametrize("family", ["lowrank", "kronecker-lowrank", "phm-shared", "sparse-random"])
def test_bfloat16_base_with_float32_adapters(family):
    """peft's default mixed precision: bf16 frozen model, fp32 delta Parameters. The plain-PyTorch
    baseline is the same materialising reference on the same bf16/fp32 model."""
    make, targets = MODELS["llama"]
    model = make(0).to(torch.bfloat16)
    ids = ids_for()
    with torch.no_grad():
        y0 = output(model, ids)
    pf.inject(model, pf.DeltaConfig(target_modules=targets, **FAMILIES[family]))
    with torch.no_grad():
        assert torch.equal(output(model, ids), y0)
    perturb(model)
    assert all(p.dtype == torch.float32 for p in trainable(model).values())
    gy = torch.randn(y0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, g = run(model, ids, gy)
    yb, gb = run(as_reference(model), ids, gy)
    y64, g64 = run(as_reference(model, torch.float64), ids, gy)
    assert_within(f"bf16/{family} output", y, y64, yb, torch.bfloat16)
    for n in g:
        assert g[n].dtype == torch.float32
        assert_within(f"bf16/{family} d{n}", g[n], g64[n], gb[n], torch.float32)


def test_zero_init_still_gets_gradients():
    """At step 0 (ΔW = 0) the zero factor's gradient is non-zero, so training can start."""
    for family, zero in (("lowrank", "B"), ("kronecker", "A"), ("phm-shared", "B"),
                         ("sparse-random", "values")):
        model = build("llama", family)
        output(model, ids_for()).square().mean().backward()
        for n, m in delta_modules(model):
            assert torch.count_nonzero(getattr(m, zero)) == 0
            assert getattr(m, zero).grad.abs().max() > 0, f"{family} {n}.{zero}: zero gradient"


def test_conv1d_uses_the_weight_without_copying():
    model = build("gpt2", "phm-shared")
    m = model.transformer.h[0].attn.c_attn
    w = m.base_layer.weight  # Conv1D: (in, out)
    assert tuple(w.shape) == (H, 3 * H) and (m.out_features, m.in_features) == (3 * H, H)
    assert m.base_weight().data_ptr() == w.data_ptr()
    assert m.weight is w  # model code reading .weight sees the original Parameter


@pytest.mark.parametrize("family", ["lowrank", "kronecker-lowrank", "phm-shared", "sparse-random"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_conv1d_weight_is_never_copied(family, backend):
    """Forward + backward through GPT-2's Conv1D layers never copy a frozen weight: the op gets
    the transposed view. Every aten op's fresh output (storage not shared with an input) is
    compared with each Conv1D weight and its transpose."""
    from pypeft_fast.measure import OpOutputs

    model = perturb(build("gpt2", family, backend=backend))
    weights = [m.base_layer.weight.detach() for _, m in delta_modules(model)]
    copies = []

    def is_copy(t):
        return any(t.shape == v.shape and torch.equal(t.to(v.dtype), v)
                   for w in weights for v in (w, w.t()))

    def record(func, t, fresh):
        if fresh and t.dim() == 2 and is_copy(t):
            copies.append(f"{func}: {tuple(t.shape)}")

    # the detector itself: an explicit copy is caught
    with OpOutputs(record):
        weights[0].t().contiguous()
    assert len(copies) == 1
    copies.clear()
    ids = ids_for()
    with OpOutputs(record):
        output(model, ids).square().mean().backward()
    assert not copies, copies[:5]
    assert all(p.grad is not None for p in trainable(model).values())


def test_lowrank_dropout_only_in_training():
    model = build("llama", "lowrank", dropout=0.3)
    perturb(model)
    ids = ids_for()
    ref = perturb(build("llama", "lowrank"))
    with torch.no_grad():
        y_eval = output(model, ids)
        assert torch.equal(y_eval, output(ref, ids))  # eval: no dropout
        model.train()
        torch.manual_seed(0)
        y_a = output(model, ids)
        torch.manual_seed(1)
        y_b = output(model, ids)
    assert (y_a - y_eval).abs().max() > 1e-3 and (y_a - y_b).abs().max() > 1e-3


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients():
    """Activation checkpointing recomputes each layer's forward: the lowrank dropout seed comes
    from torch's default generator, which checkpoint restores, so the masks and gradients agree."""
    grads = []
    for checkpointing in (False, True):
        model = perturb(build("llama", "lowrank", dropout=0.2)).train()
        if checkpointing:  # transformers 5 renamed it; 4.x has only the old name
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        ids = ids_for()
        torch.manual_seed(123)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in trainable(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


# --------------------------------------------------------------------------------------------
# Compacter: one shared A


def test_phm_shared_A_is_one_parameter_with_the_summed_gradient():
    model = perturb(build("llama", "phm-shared"))
    mods = delta_modules(model)
    A = mods[0][1].A
    assert all(m.A is A for _, m in mods) and len(mods) == 14
    assert sum(1 for p in model.parameters() if p is A) == 1
    ids = ids_for()
    gy = torch.randn(output(model, ids).shape, generator=torch.Generator().manual_seed(5))
    run(model, ids, gy)
    # float64 reference with one private copy of A per layer: the shared gradient is their sum
    ref = as_reference(model, torch.float64)
    per_layer = []
    for _, m in delta_modules(ref):
        m.A = nn.Parameter(m.A.detach().clone())
        per_layer.append(m.A)
    run(ref, ids, gy)
    summed = torch.stack([p.grad for p in per_layer]).sum(0)
    ref32 = as_reference(model, torch.float32)
    run(ref32, ids, gy)
    assert_within("shared dA", A.grad, summed, delta_modules(ref32)[0][1].A.grad, torch.float32)
    # and it is not any single layer's share
    assert (A.grad.double() - per_layer[0].grad).abs().max() > 1e-3 * summed.abs().max()


def test_phm_per_layer_A():
    model = build("llama", "phm-lowrank-perlayer")
    As = [m.A for _, m in delta_modules(model)]
    assert len({id(a) for a in As}) == len(As)


# --------------------------------------------------------------------------------------------
# sparse masks


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_sparse_masks_density_determinism_and_magnitude(model_name):
    for mask, extra in (("random", {}), ("largest", {}), ("block", {"block_size": (4, 4)})):
        a = build(model_name, "sparse-random", mask=mask, density=0.1, seed=5, **extra)
        b = build(model_name, "sparse-random", mask=mask, density=0.1, seed=5, **extra)
        c = build(model_name, "sparse-random", mask=mask, density=0.1, seed=6, **extra)
        idx = {n: m.indices for n, m in delta_modules(a)}
        assert len({tuple(map(tuple, i.tolist())) for i in idx.values()}) > 1  # layers differ
        for (n, ma), (_, mb), (_, mc) in zip(delta_modules(a), delta_modules(b), delta_modules(c)):
            out_f, in_f = ma.out_features, ma.in_features
            nnz = ma.indices.shape[1]
            if mask == "block":
                assert abs(nnz - 0.1 * out_f * in_f) <= 8  # half a 4×4 block
                dense = torch.zeros(out_f, in_f, dtype=torch.bool)
                dense[ma.indices[0], ma.indices[1]] = True
                blocks = dense.view(out_f // 4, 4, in_f // 4, 4).sum((1, 3))
                assert set(blocks.unique().tolist()) <= {0, 16}, f"{n}: not whole blocks"
            else:
                assert nnz == round(0.1 * out_f * in_f)
            assert torch.unique(ma.indices[0] * in_f + ma.indices[1]).numel() == nnz
            assert torch.equal(ma.indices, mb.indices), f"{mask}: not deterministic for a seed"
            W = ma.base_weight().detach().abs()
            if mask == "largest":
                on = torch.zeros_like(W, dtype=torch.bool)
                on[ma.indices[0], ma.indices[1]] = True
                assert W[on].min() >= W[~on].max(), f"{n}: mask is not the largest |W|"
                assert torch.equal(ma.indices, mc.indices)  # no randomness
            else:
                assert not torch.equal(ma.indices, mc.indices), f"{mask}: seed has no effect"


def test_sparse_full_density_is_dense():
    model = build("llama", "sparse-random", density=1.0)
    for _, m in delta_modules(model):
        assert m.values.numel() == m.out_features * m.in_features


# --------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(model_name, family, tmp_path):
    src = perturb(build(model_name, family))
    pf.save_adapter(src, tmp_path)
    meta = json.loads((tmp_path / "pypeft_adapter_config.json").read_text())
    assert meta["config"]["family"] == FAMILIES[family]["family"]
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(tmp_path))
    ids = ids_for()
    with torch.no_grad():
        y_src = output(src, ids)
        fresh = MODELS[model_name][0](0)  # same base weights, no adapter
        assert not torch.equal(output(fresh, ids), y_src)
    pf.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(output(fresh, ids), y_src)
    # into an already injected model (sparse: a different seed → different masks until loaded)
    other = build(model_name, family, **({"seed": 99} if family == "sparse-random" else {}))
    pf.load_adapter(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(output(other, ids), y_src)
    if family == "phm-shared":
        A = delta_modules(fresh)[0][1].A
        assert all(m.A is A for _, m in delta_modules(fresh))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    now = model.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[k], snap[k]) for k in snap)


def test_load_wrong_model_shape_raises_and_changes_nothing(tmp_path):
    pf.save_adapter(perturb(build("llama", "lowrank")), tmp_path)
    bigger = tiny_llama(hidden=64)
    snap = _snapshot(bigger)
    with pytest.raises(ValueError) as e:
        pf.load_adapter(bigger, tmp_path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(64, 64)" in msg and "(48, 48)" in msg
    assert "nothing was loaded" in msg
    assert not delta_modules(bigger) and _unchanged(bigger, snap)
    assert all(p.requires_grad for p in bigger.parameters())


def test_load_into_another_architecture_raises(tmp_path):
    pf.save_adapter(build("llama", "phm-shared"), tmp_path)
    gpt2 = tiny_gpt2(0)
    snap = _snapshot(gpt2)
    with pytest.raises(ValueError, match="the saved config does not fit this model: .*matched no "
                                         "layer of GPT2LMHeadModel"):
        pf.load_adapter(gpt2, tmp_path)
    assert not delta_modules(gpt2) and _unchanged(gpt2, snap)


def test_load_wrong_rank_into_injected_model_raises_and_changes_nothing(tmp_path):
    pf.save_adapter(perturb(build("bert", "lowrank")), tmp_path)
    target = perturb(build("bert", "lowrank", r=4, alpha=12.0), seed=8)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.query: tensor 'A' "
                                         r"has shape \(3, 48\) in the file; expected \(4, 48\)"):
        pf.load_adapter(target, tmp_path)
    assert _unchanged(target, snap)


def test_load_missing_key_raises_and_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file
    pf.save_adapter(perturb(build("gpt2", "phm-shared")), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    del tensors["transformer.h.1.mlp.c_fc.B"]
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    target = tiny_gpt2(0)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc: tensor 'B' \(4, 48, 12\) is missing"):
        pf.load_adapter(target, tmp_path)
    assert not delta_modules(target) and _unchanged(target, snap)


def test_load_out_of_range_sparse_indices_raises(tmp_path):
    from safetensors.torch import load_file, save_file
    pf.save_adapter(build("llama", "sparse-random"), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["model.layers.0.self_attn.k_proj.indices"][0, 0] = 24  # k_proj out = 24
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    target = tiny_llama(0)
    with pytest.raises(ValueError, match=r"k_proj: rows \(indices\[0\]\) span \[\d+, 24\]; expected "
                                         r"values in \[0, 24\)"):
        pf.load_adapter(target, tmp_path)
    assert not delta_modules(target)


# --------------------------------------------------------------------------------------------
# merge / unmerge


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("family", ["lowrank", "kronecker-lowrank", "phm-shared", "sparse-largest"])
def test_merge_matches_unmerged_and_unmerge_restores(model_name, family):
    model = perturb(build(model_name, family))
    ids = ids_for()
    with torch.no_grad():
        y_unmerged = output(model, ids)
        y64 = output(as_reference(model, torch.float64), ids)
        y_base = output(MODELS[model_name][0](0), ids)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in delta_modules(model)}
    deltas = {n: m.delta_weight(torch.float64).detach() for n, m in delta_modules(model)}
    pf.merge(model)
    assert all(m.merged for _, m in delta_modules(model))
    with torch.no_grad():
        y_merged = output(model, ids)
    assert (y_merged - y_base).abs().max() > 1e-2  # ΔW matters
    assert_within(f"{model_name}/{family} merged", y_merged, y64, y_unmerged, torch.float32)
    for n, m in delta_modules(model):
        w = m.base_layer.weight.detach()
        dw = deltas[n].t() if m.base_kind == "Conv1D" else deltas[n]
        assert torch.allclose(w.double(), weights[n].double() + dw, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already merged"):
        pf.merge(model)
    pf.unmerge(model)
    check_restored(model, weights, deltas)
    with torch.no_grad():
        assert_within("unmerged again", output(model, ids), y64, y_unmerged, torch.float32)


def check_restored(model, weights, deltas):
    """|W_restored − W| ≤ eps·(|W| + |ΔW|)·(1 + eps) elementwise (pf.merge's stated tolerance)."""
    for n, m in delta_modules(model):
        w = m.base_layer.weight.detach().double()
        dw = deltas[n].t() if m.base_kind == "Conv1D" else deltas[n]
        eps = torch.finfo(m.base_layer.weight.dtype).eps
        bound = eps * (weights[n].double().abs() + dw.abs()) * (1 + eps)
        err = (w - weights[n].double()).abs()
        assert (err <= bound).all(), (f"{n}: {int((err > bound).sum())} elements beyond the bound; "
                                      f"worst {err.max().item():.3g}")


def test_unmerge_tolerance_bfloat16_base():
    model = tiny_llama(0).to(torch.bfloat16)
    pf.inject(model, pf.DeltaConfig(family="kronecker", target_modules="all-linear", scaling=0.7))
    perturb(model)
    assert delta_modules(model)[0][1].A.dtype == torch.float32  # fp32 adapters on a bf16 base
    assert "lm_head" not in dict(delta_modules(model))  # all-linear leaves the output layer
    weights = {n: m.base_layer.weight.detach().clone() for n, m in delta_modules(model)}
    deltas = {n: m.delta_weight(torch.float64).detach() for n, m in delta_modules(model)}
    pf.merge(model)
    moved = max((m.base_layer.weight.double() - weights[n].double()).abs().max().item()
                for n, m in delta_modules(model))
    assert moved > 0.01
    pf.unmerge(model)
    check_restored(model, weights, deltas)


def test_merge_refuses_a_tied_weight():
    model = tiny_gpt2(0)
    assert model.lm_head.weight is model.transformer.wte.weight
    pf.inject(model, pf.DeltaConfig(family="lowrank", target_modules=["lm_head", "c_fc"]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"merge: lm_head: the base weight \(97, 48\) is shared with "
                                         r"transformer\.wte\.weight"):
        pf.merge(model)
    assert _unchanged(model, snap) and not any(m.merged for _, m in delta_modules(model))


def test_unmerge_after_training_step_raises():
    model = perturb(build("llama", "lowrank"))
    pf.merge(model)
    opt = torch.optim.SGD(trainable(model).values(), lr=0.1)
    for p in trainable(model).values():
        p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(ValueError, match="modified in place after merge"):
        pf.unmerge(model)


# --------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("model_name, family", [
    ("llama", "lowrank"), ("llama", "kronecker"), ("llama", "phm-shared"), ("llama", "sparse-random"),
    ("gpt2", "phm-shared"),
])
def test_training_reduces_loss(model_name, family):
    model = build(model_name, family)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = ids_for(batch=4, seq=16)
    opt = torch.optim.Adam(trainable(model).values(), lr=2e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # deterministic run; a gradient with a wrong sign or scale would not fall (measured: the last
    # loss is 0.90–0.95 of the first)
    assert losses[-1] < 0.97 * losses[0], losses
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


# --------------------------------------------------------------------------------------------
# bad input: ValueError naming the layer, the shape and the expectation; the model unchanged


@pytest.mark.parametrize("kwargs, match", [
    (dict(family="nope"), "unknown family 'nope'"),
    (dict(family="lowrank", density=0.1), "option density=0.1 belongs to family sparse"),
    (dict(family="phm", r=4), "option r=4 belongs to family lowrank"),
    (dict(family="lowrank", r=0), "r must be a positive integer"),
    (dict(family="lowrank", dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(family="sparse", density=0.0), r"density must be in \(0, 1\]"),
    (dict(family="sparse", mask="topk"), "mask 'topk'"),
    (dict(family="sparse", block_size=(4, 4)), "block_size=.* applies to mask='block' only"),
    (dict(family="kronecker", factor_shape=(0, 2)), "factor_shape must be"),
    (dict(family="phm", shared_A="yes"), "shared_A must be True or False"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pf.DeltaConfig(target_modules=["q_proj"], **kwargs)


def test_config_roundtrip_and_defaults():
    cfg = pf.DeltaConfig(family="lowrank", target_modules=["q_proj"], r=4)
    assert (cfg.alpha, cfg.dropout) == (4, 0.0) and cfg.density is None
    assert pf.DeltaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    blk = pf.DeltaConfig(family="sparse", target_modules="all-linear", mask="block", block_size=2)
    assert blk.block_size == (2, 2)
    assert pf.DeltaConfig.from_dict(json.loads(json.dumps(blk.to_dict()))) == blk
    with pytest.raises(ValueError, match="unknown keys"):
        pf.DeltaConfig.from_dict({**cfg.to_dict(), "lora_r": 3})


def test_factorization_matches_peft_lokr():
    lokr = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in (1, 7, 24, 48, 112, 127, 768, 1024, 2752, 3072):
        for f in (-1, 2, 4, 8, 16, 5):
            assert factorization(dim, f) == lokr.factorization(dim, f), (dim, f)


@pytest.mark.parametrize("cfg, match", [
    (dict(family="phm", n=5, target_modules=["q_proj"]),
     r"model\.layers\.0\.self_attn\.q_proj: phm with n=5 needs both dimensions of weight \(48, 48\) divisible by 5"),
    (dict(family="kronecker", factor_shape=(5, 4), target_modules=["k_proj"]),
     r"k_proj: weight \(24, 48\) cannot be split by factor_shape \(5, 4\)"),
    (dict(family="sparse", density=1e-5, target_modules=["q_proj"]),
     r"q_proj: density 1e-05 of weight \(48, 48\) gives 0 entries"),
    (dict(family="sparse", mask="block", block_size=(5, 4), target_modules=["q_proj"]),
     r"q_proj: block_size \(5, 4\) does not tile weight \(48, 48\)"),
    (dict(family="lowrank", target_modules=["self_attn"]),
     r"model\.layers\.0\.self_attn: .* selects this LlamaAttention, but inject wraps only nn\.Linear"),
    (dict(family="lowrank", target_modules=["qq_proj"]), "matched no layer of LlamaForCausalLM"),
])
def test_inject_errors_leave_the_model_unchanged(cfg, match):
    model = tiny_llama(0)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        pf.inject(model, pf.DeltaConfig(**cfg))
    assert not delta_modules(model) and _unchanged(model, snap)
    assert all(p.requires_grad for p in model.parameters())


def test_inject_twice_and_regex_targets():
    model = pf.inject(tiny_llama(0), pf.DeltaConfig(family="lowrank",
                                                    target_modules=r".*layers\.1\.mlp\.(up|down)_proj"))
    assert [n for n, _ in delta_modules(model)] == ["model.layers.1.mlp.up_proj",
                                                    "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="already holds injected layers"):
        pf.inject(model, pf.DeltaConfig(family="phm", target_modules=["q_proj"]))
    excl = pf.inject(tiny_llama(0), pf.DeltaConfig(family="lowrank", target_modules="all-linear",
                                                   exclude_modules=["down_proj"]))
    names = [n for n, _ in delta_modules(excl)]
    assert len(names) == 12 and not any("down_proj" in n for n in names)


def test_a_layer_shared_by_two_parents_is_wrapped_once_everywhere():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    outer = nn.ModuleDict({"a": model, "b": nn.Sequential(model[0])})
    pf.inject(outer, pf.DeltaConfig(family="lowrank", target_modules=["a.0"], r=2))
    assert isinstance(outer["b"][0], DeltaLinear) and outer["b"][0] is outer["a"][0]
    assert [n for n, _ in delta_modules(outer)] == ["a.0"]


def tiny_bert_classifier(seed=0, num_labels=3):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=INTER, vocab_size=VOCAB, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_trainable_modules_train_a_new_head_and_travel_with_the_adapter(tmp_path):
    cfg = pf.DeltaConfig(family="phm", target_modules="all-linear", exclude_modules=["classifier"],
                         trainable_modules=["classifier"], rank=2)
    model = pf.inject(tiny_bert_classifier(), cfg)
    head = model.classifier
    assert not isinstance(head, DeltaLinear)
    assert all(p.requires_grad for p in head.parameters())
    deltas = {id(p): p for _, m in delta_modules(model) for p in m.parameters() if p.requires_grad}
    n_delta = sum(p.numel() for p in deltas.values())  # the shared A once
    assert pf.trainable_report(model).trainable == n_delta + head.weight.numel() + head.bias.numel()
    perturb(model)
    with torch.no_grad():
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
    ids = ids_for()
    with torch.no_grad():
        y = model(input_ids=ids).logits
    pf.save_adapter(model, tmp_path)
    fresh = tiny_bert_classifier()
    pf.load_adapter(fresh, tmp_path, load_trainable_modules=True)  # full head weights: opt in
    with torch.no_grad():
        assert torch.equal(fresh.classifier.weight, head.weight)
        assert torch.equal(fresh(input_ids=ids).logits, y)
    # a head of another size is a listed problem, and nothing is loaded
    other = tiny_bert_classifier(num_labels=5)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"__trainable__: tensor 'classifier\.weight' has shape "
                                         r"\(3, 48\) in the file; expected \(5, 48\)"):
        pf.load_adapter(other, tmp_path, load_trainable_modules=True)
    assert not delta_modules(other) and _unchanged(other, snap)


def test_trainable_modules_may_not_overlap_targets():
    with pytest.raises(ValueError, match=r"classifier: selected by trainable_modules=\['classifier'\] "
                                         r"and classifier by target_modules"):
        pf.inject(tiny_bert_classifier(), pf.DeltaConfig(
            family="lowrank", target_modules="all-linear", trainable_modules=["classifier"]))
    with pytest.raises(ValueError, match="trainable_modules=\\['head'\\] matched no module"):
        pf.inject(tiny_bert_classifier(), pf.DeltaConfig(
            family="lowrank", target_modules=["query"], trainable_modules=["head"]))


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"0\.out_proj: the out_proj of nn\.MultiheadAttention \(0\)"):
        pf.inject(model, pf.DeltaConfig(family="lowrank", target_modules="all-linear", r=2))
    assert not delta_modules(model)
    pf.inject(model, pf.DeltaConfig(family="lowrank", target_modules="all-linear", r=2,
                                    exclude_modules=["out_proj"]))
    assert [n for n, _ in delta_modules(model)] == ["1"]


def test_layer_name_in_op_errors():
    model = build("llama", "lowrank")
    m = model.model.layers[1].mlp.up_proj
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.up_proj: x has shape \(2, 5\); expected \(\.\.\., 48\)"):
        m(torch.randn(2, 5))
    m.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: weight requires grad"):
        m(torch.randn(2, H))
