"""pf.patch on peft LoHa models (tiny Llama / BERT from configs): logits and every gradient equal
unpatched peft (flash-attention's rule against a float64 copy); the options pypeft_fast cannot
serve are reported fallbacks that run peft's own forward."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft  # noqa: E402
from peft import LoHaConfig, PeftModel, get_peft_model  # noqa: E402

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.patch import is_patched  # noqa: E402
from test_patch import (  # noqa: E402  (the patch tests' tiny models and comparison rule)
    LLAMA_TARGETS, MODELS, ConvNet, _train, batch_for, check_training_matches_peft, compare_to_peft, max_err,
    outputs,
)

LOHA = peft.tuners.loha.layer.Linear
CASES = {
    "llama-loha": ("llama", dict(r=4, alpha=8, target_modules=LLAMA_TARGETS), torch.float32),
    "llama-loha-r1": ("llama", dict(r=1, alpha=3, target_modules=LLAMA_TARGETS), torch.float32),
    "llama-loha-bf16-base-fp32-adapters": ("llama", dict(r=4, alpha=8, target_modules=LLAMA_TARGETS),
                                           torch.bfloat16),
    "bert-loha": ("bert", dict(r=3, alpha=6, target_modules=["query", "key", "value", "dense"]),
                  torch.float32),
}


def loha_model(kind, dtype=torch.float32, **cfg):
    """A peft LoHa model with every factor random (``init_weights=False``: hada_w2_b non-zero)."""
    model = get_peft_model(MODELS[kind](dtype), LoHaConfig(init_weights=False, **cfg))
    with torch.no_grad():  # peft's random init is kaiming-uniform per factor: a trained-delta size
        for n, p in model.named_parameters():
            if "hada_w" in n:
                p.mul_(0.5)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_loha_matches_peft(case):
    kind, cfg, dtype = CASES[case]
    model = loha_model(kind, dtype, **cfg)
    model.train()
    layers = [m for m in model.modules() if type(m) is LOHA]
    assert layers and all(torch.count_nonzero(m.hada_w2_b["default"]) > 0 for m in layers)
    if dtype == torch.bfloat16:
        assert all(m.hada_w1_a["default"].dtype == torch.float32 for m in layers)
    report = compare_to_peft(model, batch_for(kind), expect_served=len(layers))
    assert len(report.patched) == len(layers)
    assert {e.peft_type for e in report} == {"loha"}


def test_patched_loha_types_unchanged_and_unpatch_restores():
    model = loha_model("llama", r=2, alpha=2, target_modules=["q_proj", "down_proj"])
    class_forward = LOHA.forward
    layers = [m for m in model.modules() if type(m) is LOHA]
    batch = batch_for("llama")
    with torch.no_grad():
        y0 = outputs(model, batch)
    report = pf.patch(model, strict=True)
    assert [type(m) for m in model.modules() if isinstance(m, LOHA)] == [LOHA] * 4
    assert LOHA.forward is class_forward and all(is_patched(m) for m in layers)
    assert [e.status for e in report] == ["patched"] * 4
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, batch), y0, rtol=1e-5, atol=1e-6)
    assert sum(e.served_calls for e in report) == 4
    assert pf.unpatch(model) == 4 and not any(is_patched(m) for m in layers)


def test_loha_dropouts_run_peft_in_training_and_are_served_in_eval():
    batch = batch_for("llama")
    for opt in ("rank_dropout", "module_dropout"):
        model = loha_model("llama", r=2, target_modules=["q_proj"], **{opt: 0.2})
        with pytest.raises(ValueError, match=rf"(?s)strict=True.*q_proj.*LoHa {opt}=0.2 in training"):
            pf.patch(model, strict=True)
        report = pf.patch(model)
        assert all(e.status == f"LoHa {opt}=0.2 in training (eval calls are served)" for e in report), \
            str(report)
        model.train()
        outputs(model, batch)
        model.eval()
        with torch.no_grad():
            y = outputs(model, batch)
            pf.unpatch(model)
            y_peft = outputs(model, batch)
        torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-6)
        assert all(e.served_calls == 1 and e.fallback_calls == {f"LoHa {opt}=0.2 in training": 1}
                   for e in report), str(report)


def test_loha_conv_layers_are_reported_and_run_peft():
    for effective in (False, True):
        torch.manual_seed(0)
        net = get_peft_model(ConvNet(), LoHaConfig(r=2, target_modules=["conv", "lin"], init_weights=False,
                                                   use_effective_conv2d=effective))
        x = torch.randn(2, 3, 6, 6)
        with torch.no_grad():
            ref = net(x)
        rep = pf.patch(net)
        status = {e.name.rsplit(".", 1)[-1]: e.status for e in rep}
        assert status == {"conv": "conv layer (loha.Conv2d)", "lin": "patched"}, status
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)


def test_loha_twenty_training_steps_match_peft():
    # AdamW divides each gradient by its own running RMS, so where a factor's gradient is near
    # zero (all but hada_w2_b start with exactly zero gradient: M2 = 0), rounding-level gradient
    # differences move that element by a visible fraction of lr = 1e-2: atol 1e-4 = lr / 100.
    check_training_matches_peft(LoHaConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS), param_atol=1e-4)


def test_loha_save_pretrained_loads_into_plain_peft_and_merge_works(tmp_path):
    model = get_peft_model(MODELS["llama"](), LoHaConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS))
    batch = batch_for("llama", seed=9)
    report = pf.patch(model)
    _train(model, batch, 3)  # hada_w2_b moves away from zero through the patched layers
    model.eval()
    with torch.no_grad():
        y = outputs(model, batch)
        assert max_err(y, outputs(MODELS["llama"](), batch)) > 1e-3  # the adapter changed the model
    model.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(MODELS["llama"](), tmp_path).eval()
    assert not any(is_patched(m) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(outputs(plain, batch), y, rtol=1e-5, atol=1e-5)
        model.merge_adapter()  # merged: peft's forward (the base layer holds ΔW)
        torch.testing.assert_close(outputs(model, batch), y, rtol=1e-4, atol=1e-4)
        assert any("adapter merged into the base weight" in e.fallback_calls for e in report)
        model.unmerge_adapter()
        served = sum(e.served_calls for e in report)
        torch.testing.assert_close(outputs(model, batch), y, rtol=1e-4, atol=1e-4)
        assert sum(e.served_calls for e in report) == served + len(report.patched)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, LOHA) for m in merged.modules())
        torch.testing.assert_close(outputs(merged, batch), y, rtol=1e-4, atol=1e-4)
