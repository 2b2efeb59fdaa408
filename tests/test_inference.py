"""Inference with patched and injected models: under ``torch.no_grad()`` /
``torch.inference_mode()`` nothing is saved for backward, dropout is off in eval, and
``model.generate()`` gives the unpatched model's tokens."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoKrConfig, LoraConfig, ShiraConfig, get_peft_model  # noqa: E402

import pypeft_fast as pf  # noqa: E402
from pypeft_fast.measure import SavedTensors  # noqa: E402
from test_patch import LLAMA_TARGETS, VOCAB, tiny_llama  # noqa: E402

CONFIGS = {
    "lora-dropout": lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=LLAMA_TARGETS,
                                       init_lora_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=4, target_modules=LLAMA_TARGETS, init_weights=False),
    "shira": lambda: ShiraConfig(r=2, target_modules=LLAMA_TARGETS, init_weights=False),
}
MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _ids(seed=1, batch=2, seq=9):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _served(report):
    return sum(e.served_calls for e in report.entries), sum(sum(e.fallback_calls.values()) for e in report.entries)


def _pair(method):
    peft_model = get_peft_model(tiny_llama(), CONFIGS[method]())
    patched = copy.deepcopy(peft_model)
    return peft_model, patched, pf.patch(patched)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_eval_forward_saves_nothing_and_matches_peft(method, mode):
    peft_model, patched, report = _pair(method)
    peft_model.eval(), patched.eval()
    ids = _ids()
    with MODES[mode]():
        want = peft_model(input_ids=ids).logits
        with SavedTensors() as saved:
            got = patched(input_ids=ids).logits
        again = patched(input_ids=ids).logits
    assert saved.total_bytes == 0 and not saved.storages, f"{saved.total_bytes} bytes saved for backward"
    assert got.grad_fn is None and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # eval: peft's dropout is off too
    assert torch.equal(got, again)  # ... and ours: the same logits every call
    served, fell = _served(report)
    assert fell == 0 and served == 2 * 2 * len(LLAMA_TARGETS), str(report)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_training_mode_no_grad_still_drops_and_saves_nothing(mode):
    """peft applies dropout in training mode even under no_grad; so does the patched layer,
    and still nothing is kept for a backward that cannot happen."""
    _, patched, _ = _pair("lora-dropout")
    patched.train()
    ids = _ids()
    with MODES[mode](), SavedTensors() as saved:
        a, b = patched(input_ids=ids).logits, patched(input_ids=ids).logits
    assert saved.total_bytes == 0
    assert not torch.equal(a, b)  # two fresh Philox seeds: two different masks
    patched.eval()
    with MODES[mode]():
        c, d = patched(input_ids=ids).logits, patched(input_ids=ids).logits
    assert torch.equal(c, d)


@pytest.mark.parametrize("family", ["lowrank", "kronecker", "phm", "sparse"])
def test_injected_eval_forward_saves_nothing(family):
    cfgs = {"lowrank": dict(r=3, dropout=0.3), "kronecker": {}, "phm": dict(n=4), "sparse": dict(density=0.05)}
    model = pf.inject(tiny_llama(), pf.DeltaConfig(family=family, target_modules=LLAMA_TARGETS, **cfgs[family]))
    model.eval()
    ids = _ids()
    for mode in MODES.values():
        with mode(), SavedTensors() as saved:
            a = model(input_ids=ids).logits
            b = model(input_ids=ids).logits
        assert saved.total_bytes == 0 and a.grad_fn is None
        assert torch.equal(a, b)  # dropout off in eval


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_generate_greedy_equals_unpatched(method):
    peft_model, patched, report = _pair(method)
    peft_model.eval(), patched.eval()
    ids = _ids(seed=4, batch=2, seq=5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = peft_model.generate(input_ids=ids, **kw)
    got = patched.generate(input_ids=ids, **kw)
    with torch.inference_mode():
        got_inference = patched.generate(input_ids=ids, **kw)
    assert want.shape == (2, 5 + 4)
    assert torch.equal(got, want) and torch.equal(got_inference, want)
    served, fell = _served(report)
    assert fell == 0 and served > 0, str(report)
