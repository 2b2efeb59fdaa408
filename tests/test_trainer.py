"""transformers ``Trainer`` runs of patched and injected models (issue 9, part 4).

* every layer call is served by pypeft_fast in fp32 and in ``bf16=True`` (CPU autocast) runs —
  the PatchReport counts 0 calls of peft's forward — and the loss curve follows flash-attention's
  rule against a float64 run of the same peft model: |pf − f64| ≤ 2·|peft − f64| + a few ulps;
* gradient accumulation (2 micro-batches of 2) gives the curve of one batch of 4;
* a run resumed from a mid-epoch checkpoint continues the uninterrupted loss curve exactly and
  ends with the same adapter weights, with dropout > 0 too: the Philox seeds are drawn from
  torch's default generator, whose state the checkpoint stores and ``Trainer`` restores.

Tiny Llama from a config, a 16-row token dataset in memory, output_dir under tmp_path.
"""
from __future__ import annotations

import functools
import tempfile

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from numerics import assert_within  # noqa: E402
from training_models import (  # noqa: E402
    N_ADAPTED, adapter_state, injected_lowrank, peft_dora, peft_loha, peft_lora, train,
)

# the peft models of the follow-peft test (dropout 0: unpatched peft's masks are not ours);
# LoHa has two more factors per layer
METHODS = {"lora": (peft_lora, 2), "dora": (peft_dora, 3), "loha": (lambda patch: peft_loha(patch=patch), 4)}


def curve(losses: dict[int, float]) -> torch.Tensor:
    return torch.tensor([losses[k] for k in sorted(losses)], dtype=torch.float64)


def trainer_run(patched: bool, bf16: bool = False, batch: int = 2, accumulation: int = 2,
                dtype: torch.dtype = torch.float32, method: str = "lora"):
    """One 4-step Trainer run of a peft model of METHODS (dropout 0), cached: several tests
    compare the same runs. Returns (loss curve, final adapter weights, (served, fallbacks) or None)."""
    return _trainer_run(patched, bf16, batch, accumulation, dtype, method)


@functools.lru_cache(maxsize=None)
def _trainer_run(patched, bf16, batch, accumulation, dtype, method):
    model, report = METHODS[method][0](patch=patched)
    with tempfile.TemporaryDirectory() as d:
        losses = train(model.to(dtype), d, bf16=bf16, batch=batch, accumulation=accumulation)
    counts = None if report is None else report.call_counts()
    return curve(losses), adapter_state(model), counts


def assert_served_every_call(counts, micro_batches: int):
    served, fallbacks = counts
    assert not fallbacks, f"calls ran peft's forward: {dict(fallbacks)}"
    assert served == N_ADAPTED * micro_batches, f"{served} calls served, expected {N_ADAPTED * micro_batches}"


# Open (reported): after 4 AdamW steps one weight element of these runs is 1.7-3x beyond
# flash-attention's rule (fp32-loha down_proj.hada_w1_b (0, 47): 2.9e-7 vs tol 1.1e-7; bf16 DoRA
# layers.1.k_proj.lora_B (8, 1): 0.020 vs tol 0.013; bf16 LoHa layers.0.k_proj.hada_w1_a (2, 0):
# 2.3e-3 vs tol 1.3e-3); every call served. What was found (lead, session 4): with
# optim="sgd" instead of AdamW (weights then move by lr × the gradients, linearly) fp32 and bf16
# LoHa have every weight within the rule — AdamW's per-element normalisation amplifies the
# rounding of small gradient entries; fp32 DoRA equals peft (error ratio 1.00 on every tensor).
# bf16 DoRA under SGD still has layer 0's v_proj lora_A at 2.7× peft's error norm after one step
# (the median tensor at 0.69×); over 8 fixed batches of one backward the same tensor ranges 1.3–5.6×
# (median tensor 0.56–0.87×). Given the same x and gy as its run, that layer's op is *more*
# accurate than peft's (dA 1.5e-3 vs 4.1e-3 relative to float64; dB 1.8e-3 vs 3.5e-3): the excess
# is in the gy reaching it, i.e. the rest of two bf16 pipelines that round at different points.
# Session 5: fp32 LoRA joined them when its dB left MKL's gyᵀ·u (the cpp backend's skinny_t_mm
# and the torch path's uᵀ·gy sum the tokens in another order): layers.0.mlp.up_proj.lora_B (26, 2)
# after 4 AdamW steps 4.0e-7 from float64 vs tol 3.7e-7, every other element within. One step's
# gradients of every lora_B against float64: pf's error ÷ peft's 0.89–1.10 (median 1.00), that
# element's gradient equal to peft's bit for bit; under SGD every weight within the rule.
# The served-call count and the loss-curve rule run first, so the mark covers the weights only.
# Strict, so the mark goes when the runs meet the rule.
ADAM_RULE_OPEN = pytest.mark.xfail(strict=True, reason="one element beyond the rule after AdamW; open")
_OPEN = {(False, "loha"), (False, "lora"), (True, "dora"), (True, "loha")}


@pytest.mark.parametrize("bf16, method", [
    pytest.param(b, m, marks=ADAM_RULE_OPEN, id=f"{'bf16-autocast' if b else 'fp32'}-{m}") if (b, m) in _OPEN
    else pytest.param(b, m, id=f"{'bf16-autocast' if b else 'fp32'}-{m}")
    for b in (False, True) for m in sorted(METHODS)])
def test_trainer_serves_every_call_and_follows_peft(bf16, method):
    # the reference: the same peft model (unpatched) in float64; Trainer accumulates the logged
    # loss in float32, so the curve's resolution is float32's
    ref, ref_weights, _ = trainer_run(patched=False, dtype=torch.float64, method=method)
    base, base_weights, _ = trainer_run(patched=False, bf16=bf16, method=method)
    got, weights, counts = trainer_run(patched=True, bf16=bf16, method=method)
    assert_served_every_call(counts, micro_batches=4 * 2)
    assert weights.keys() == ref_weights.keys() and len(weights) == METHODS[method][1] * N_ADAPTED
    # flash-attention's rule on the whole curve (eps: 4 ulps of float32, the loss's dtype)
    peft_err = (base - ref).abs().max().item()
    tol = 2 * peft_err + 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= tol, (f"loss curve off by {err:.3g} (tol {tol:.3g}, peft's own error {peft_err:.3g})"
                        f"\npf   {got.tolist()}\npeft {base.tolist()}\nf64  {ref.tolist()}")
    for k in ref_weights:  # after 4 AdamW steps (fp32 adapters in both runs); last: the open cases
        assert_within(k, weights[k], ref_weights[k], base_weights[k], torch.float32)


def test_gradient_accumulation_equals_the_full_batch():
    """2 accumulated micro-batches of 2 = one batch of 4 (Trainer normalises by the token count)."""
    accumulated, weights_acc, counts = trainer_run(patched=True, batch=2, accumulation=2)
    assert_served_every_call(counts, micro_batches=4 * 2)
    full, weights_full, counts = trainer_run(patched=True, batch=4, accumulation=1)
    assert_served_every_call(counts, micro_batches=4)
    torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-6)
    for k, w in weights_full.items():
        torch.testing.assert_close(weights_acc[k], w, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


RESUME_CASES = {
    "patched-lora-fp32": (lambda: peft_lora(dropout=0.2), False),
    "patched-lora-bf16-autocast": (lambda: peft_lora(dropout=0.2), True),
    "injected-lowrank-bf16-autocast": (lambda: (injected_lowrank(dropout=0.2), None), True),
    "patched-dora-bf16-autocast": (lambda: peft_dora(dropout=0.2), True),  # cpp: dropped-set identity
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_from_checkpoint_continues_the_loss_curve_exactly(case, tmp_path):
    """Dropout 0.2: save at step 2 of 4 (mid-epoch: 4 optimizer steps of 2×2 rows = one pass over
    the 16 rows), resume a fresh model from it; steps 3-4 and the final adapter weights equal
    the uninterrupted run's bit for bit."""
    build, bf16 = RESUME_CASES[case]
    model, report = build()
    full = train(model, tmp_path, bf16=bf16, steps=4, save_steps=2)
    final = adapter_state(model)
    if report is not None:
        assert_served_every_call(report.call_counts(), micro_batches=4 * 2)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "rng_state.pth").exists()
    model, report = build()
    resumed = train(model, tmp_path, bf16=bf16, steps=4, save_steps=2, resume=checkpoint)
    if report is not None:
        assert_served_every_call(report.call_counts(), micro_batches=2 * 2)
    assert sorted(resumed) == [3, 4]
    assert [resumed[k] for k in (3, 4)] == [full[k] for k in (3, 4)], (
        f"resumed {resumed} vs uninterrupted {full}")
    got = adapter_state(model)
    assert got.keys() == final.keys() and len(got) > 0
    for k in final:
        diff = (got[k] - final[k]).abs().max().item()
        assert torch.equal(got[k], final[k]), f"{k}: resumed weights differ by {diff:.3g}"
