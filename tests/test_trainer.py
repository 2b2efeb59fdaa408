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
transformers = pytest.importorskip("transformers")

from numerics import assert_within  # noqa: E402
from training_models import N_ADAPTED, TokenDataset, adapter_state, injected_lowrank, peft_lora  # noqa: E402



class LossRecorder(transformers.TrainerCallback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def train(model, output_dir, *, bf16=False, steps=4, batch=2, accumulation=2, resume=None,
          save_steps=None):
    """Trainer run; returns ``{global step: logged loss}`` (one log per optimizer step)."""
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to="none", use_cpu=True, bf16=bf16, seed=5, dataloader_num_workers=0,
        disable_tqdm=True)
    recorder = LossRecorder()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(16),
                                   callbacks=[recorder])
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    assert len(recorder.losses) == steps - (0 if resume is None else int(resume.name.split("-")[1]))
    return recorder.losses


def curve(losses: dict[int, float]) -> torch.Tensor:
    return torch.tensor([losses[k] for k in sorted(losses)], dtype=torch.float64)


def assert_served_every_call(report, micro_batches: int):
    served, fallbacks = report.call_counts()
    assert not fallbacks, f"calls ran peft's forward: {dict(fallbacks)}\n{report}"
    assert served == N_ADAPTED * micro_batches, report.summary()


@functools.lru_cache(maxsize=None)
def float64_peft_run() -> tuple[torch.Tensor, dict]:
    """The same peft model (unpatched) in float64: the reference every run is measured against.
    Returns (loss curve, final adapter weights). Trainer accumulates the logged loss in float32."""
    model, _ = peft_lora(patch=False)
    with tempfile.TemporaryDirectory() as d:
        return curve(train(model.double(), d)), adapter_state(model)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_trainer_serves_every_call_and_follows_peft(bf16, tmp_path):
    ref, ref_weights = float64_peft_run()
    plain, _ = peft_lora(patch=False)
    base = curve(train(plain, tmp_path / "peft", bf16=bf16))
    model, report = peft_lora()
    got = curve(train(model, tmp_path / "pf", bf16=bf16))
    assert_served_every_call(report, micro_batches=4 * 2)
    base_weights, weights = adapter_state(plain), adapter_state(model)
    assert weights.keys() == ref_weights.keys() and len(weights) == 2 * N_ADAPTED
    for k in ref_weights:  # after 4 AdamW steps (fp32 adapters in both runs)
        assert_within(k, weights[k], ref_weights[k], base_weights[k], torch.float32)
    # flash-attention's rule on the whole curve (eps: 4 ulps of float32, the loss's dtype)
    peft_err = (base - ref).abs().max().item()
    tol = 2 * peft_err + 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= tol, (f"loss curve off by {err:.3g} (tol {tol:.3g}, peft's own error {peft_err:.3g})"
                        f"\npf   {got.tolist()}\npeft {base.tolist()}\nf64  {ref.tolist()}")
    print(f"loss curve error vs float64: pf {err:.3g}, peft {peft_err:.3g}")


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    """2 accumulated micro-batches of 2 = one batch of 4 (Trainer normalises by the token count)."""
    model, report = peft_lora()
    accumulated = train(model, tmp_path / "acc", batch=2, accumulation=2)
    weights_acc = adapter_state(model)
    assert_served_every_call(report, micro_batches=4 * 2)
    model, report = peft_lora()
    full = train(model, tmp_path / "full", batch=4, accumulation=1)
    assert_served_every_call(report, micro_batches=4)
    torch.testing.assert_close(curve(accumulated), curve(full), rtol=1e-5, atol=1e-6)
    for k, w in adapter_state(model).items():
        torch.testing.assert_close(weights_acc[k], w, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


RESUME_CASES = {
    "patched-lora-fp32": (lambda: peft_lora(dropout=0.2), False),
    "patched-lora-bf16-autocast": (lambda: peft_lora(dropout=0.2), True),
    "injected-lowrank-fp32": (lambda: (injected_lowrank(dropout=0.2), None), False),
    "injected-lowrank-bf16-autocast": (lambda: (injected_lowrank(dropout=0.2), None), True),
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
        assert_served_every_call(report, micro_batches=4 * 2)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "rng_state.pth").exists()
    model, report = build()
    resumed = train(model, tmp_path, bf16=bf16, steps=4, save_steps=2, resume=checkpoint)
    if report is not None:
        assert_served_every_call(report, micro_batches=2 * 2)
    assert sorted(resumed) == [3, 4]
    assert [resumed[k] for k in (3, 4)] == [full[k] for k in (3, 4)], (
        f"resumed {resumed} vs uninterrupted {full}")
    got = adapter_state(model)
    assert got.keys() == final.keys() and len(got) > 0
    for k in final:
        assert torch.equal(got[k], final[k]), f"{k}: resumed weights differ by {(got[k] - final[k]).abs().max():.3g}"
