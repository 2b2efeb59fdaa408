"""Activation checkpointing through transformers' ``gradient_checkpointing_enable`` (reentrant and
non-reentrant) with dropout > 0 (issue 9, part 5).

Checkpointing re-runs every decoder layer's forward during backward. The lowrank dropout mask is
a Philox function of a seed drawn from torch's default generator, whose state
``torch.utils.checkpoint`` restores before recomputing, so the recomputed layers draw the same
seeds, build the same masks, and every gradient equals the run without checkpointing. Checked on
a patched peft LoRA model and an injected lowrank model, fp32 and under bf16 autocast; the
layer-call counts prove the recomputation happened (and, patched, that every call was served).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from pypeft_fast.inject.modules import delta_modules  # noqa: E402
from training_models import (  # noqa: E402
    N_ADAPTED, adapter_state, injected_lowrank, peft_dora, peft_loha, peft_lora, token_batch, train,
)

DROPOUT = 0.25
# kind: build(); DoRA at p > 0 on CPU (auto = cpp) is NativeDoRA's dropped-set identity, whose
# CSR of the dropped entries is rebuilt from the seed in backward; LoHa has no dropout
PATCHED = {"patched-lora": lambda: peft_lora(dropout=DROPOUT),
           "patched-dora": lambda: peft_dora(dropout=DROPOUT),
           "patched-loha": lambda: peft_loha()}
INJECTED = {"injected-lowrank": lambda: injected_lowrank(dropout=DROPOUT),
            "injected-dora": lambda: injected_lowrank(dropout=DROPOUT, magnitude=True)}


def build(kind):
    """``(model in training mode, layer-call counter)``."""
    if kind in PATCHED:
        model, report = PATCHED[kind]()
        return model.train(), lambda: report.call_counts()
    model = INJECTED[kind]().train()
    calls = [0]
    for _, m in delta_modules(model):
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return model, lambda: (calls[0], {})


def gradients(model, ids, seed, autocast):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("kind", [*PATCHED, *INJECTED])
def test_checkpointed_gradients_equal_the_plain_run(kind, use_reentrant, autocast):
    ids = token_batch(3, seed=8)
    plain, plain_calls = build(kind)
    ckpt, ckpt_calls = build(kind)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    loss0, g0 = gradients(plain, ids, seed=11, autocast=autocast)
    loss1, g1 = gradients(ckpt, ids, seed=11, autocast=autocast)
    # every adapted layer ran twice under checkpointing (forward, then recomputed in backward)
    (n0, fb0), (n1, fb1) = plain_calls(), ckpt_calls()
    assert not fb0 and not fb1, f"calls ran peft's forward: {dict(fb0)} {dict(fb1)}"
    assert (n0, n1) == (N_ADAPTED, 2 * N_ADAPTED), (n0, n1)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert g1.keys() == g0.keys()
    for k in g0:
        assert g0[k].abs().max() > 0, f"{k}: zero gradient"
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-9, msg=lambda m: f"{k}: {m}")
    if kind.endswith("loha"):
        return  # no dropout: nothing drawn from the generator
    # the masks are live: another seed gives other gradients
    _, g2 = gradients(plain, ids, seed=12, autocast=autocast)
    assert max((g2[k] - g0[k]).abs().max().item() for k in g0) > 1e-4


def test_trainer_gradient_checkpointing_bf16_gives_the_same_losses(tmp_path):
    """The Trainer way (``TrainingArguments(gradient_checkpointing=True)``), bf16 autocast, dropout
    0.25, 2 accumulated micro-batches: the same loss curve and weights, every call served
    (recomputations included)."""
    runs = []
    for checkpointing in (False, True):
        model, report = peft_lora(dropout=DROPOUT)
        losses = train(model, tmp_path / str(checkpointing), bf16=True, steps=3,
                       gradient_checkpointing=checkpointing)
        served, fallbacks = report.call_counts()
        assert not fallbacks, dict(fallbacks)
        assert served == N_ADAPTED * 3 * 2 * (2 if checkpointing else 1)
        runs.append((losses, adapter_state(model)))
    (l0, w0), (l1, w1) = runs
    assert l1 == l0, f"{l1} vs {l0}"
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-6, atol=1e-9, msg=lambda m: f"{k}: {m}")
