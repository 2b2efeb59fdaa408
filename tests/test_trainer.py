"""transformers ``Trainer`` runs of patched and injected models (issue 9, part 4).

* every layer call is served by pypeft_fast in fp32 and in ``bf16=True`` (CPU autocast) runs —
  the PatchReport counts 0 calls of peft's forward — and the loss curve follows flash-attention's
  rule against a float64 run of the same peft model: |pf − f64| ≤ 2·|peft − f64| + a few ulps
  (AdamW, Trainer's default); the final adapter weights follow the same rule elementwise after
  the same run with SGD (below: under AdamW single elements are not comparable);
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
                dtype: torch.dtype = torch.float32, method: str = "lora", optim: str = "adamw_torch"):
    """One 4-step Trainer run of a peft model of METHODS (dropout 0), cached: several tests
    compare the same runs. Returns (loss curve, final adapter weights, (served, fallbacks) or None)."""
    return _trainer_run(patched, bf16, batch, accumulation, dtype, method, optim)


@functools.lru_cache(maxsize=None)
def _trainer_run(patched, bf16, batch, accumulation, dtype, method, optim):
    model, report = METHODS[method][0](patch=patched)
    with tempfile.TemporaryDirectory() as d:
        losses = train(model.to(dtype), d, bf16=bf16, batch=batch, accumulation=accumulation,
                       optim=optim)
    counts = None if report is None else report.call_counts()
    return curve(losses), adapter_state(model), counts


def assert_served_every_call(counts, micro_batches: int):
    served, fallbacks = counts
    assert not fallbacks, f"calls ran peft's forward: {dict(fallbacks)}"
    assert served == N_ADAPTED * micro_batches, f"{served} calls served, expected {N_ADAPTED * micro_batches}"


# The weights are compared after SGD steps, where they move by lr × the summed gradients (linear
# in them), so the rule on the weights is the rule on the gradients. After AdamW steps it is not:
# Adam divides each element's update by its own gradient's RMS, so an element whose gradient is
# near zero moves by ±lr with the sign of its rounding noise. Measured (sessions 4-5 on an AVX2
# EPYC, session 9 on an AVX-512 Xeon): after 4 AdamW steps 1-2 elements of some runs sat 1.1-3.8×
# beyond the rule (fp32 DoRA / LoHa / LoRA, bf16 DoRA / LoHa / LoRA; which runs, depended on the
# CPU), under SGD every weight of every run within it; a bf16-autocast LoRA element differed by
# 0.021 ≈ 4 steps × lr 5e-3 of Adam's unit-size updates. The AdamW runs still give the served
# calls and the loss curve.


@pytest.mark.parametrize("bf16, method", [
    pytest.param(b, m, id=f"{'bf16-autocast' if b else 'fp32'}-{m}")
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
    # the weights after the same 4 steps with SGD (fp32 adapters in every run; see above)
    _, ref_weights, _ = trainer_run(patched=False, dtype=torch.float64, method=method, optim="sgd")
    _, base_weights, _ = trainer_run(patched=False, bf16=bf16, method=method, optim="sgd")
    _, weights, counts = trainer_run(patched=True, bf16=bf16, method=method, optim="sgd")
    assert_served_every_call(counts, micro_batches=4 * 2)
    for k in ref_weights:
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
