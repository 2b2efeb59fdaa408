"""Tiny models for the training-recipe tests (Trainer, activation checkpointing, DDP/FSDP2).

Shared by tests/test_trainer.py, tests/test_checkpointing.py, tests/test_distributed.py and the
torchrun worker tests/dist_workers/train_worker.py (which puts this directory on sys.path).
Everything is built from configs with fixed seeds: random weights, nothing downloaded.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB = 101
SEQ = 12
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTED = 2 * len(LLAMA_TARGETS)  # adapted projections of tiny_llama(layers=2)


def tiny_llama(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(dtype)


def peft_lora(dropout: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32, patch=True,
              use_dora: bool = False):
    """A peft LoRA model (r = 4, all seven projections, both factors random: every adapter
    gradient is non-zero from step 0), patched by ``pf.patch(strict=True)`` unless ``patch`` is
    False. ``use_dora``: peft's DoRA, the magnitudes moved off their init (c = m / ‖V‖ in
    0.8-1.2, not 1: the (c − 1) terms are live). Returns ``(model, report or None)``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed, dtype=dtype), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LLAMA_TARGETS,
        init_lora_weights=False, use_dora=use_dora))
    if use_dora:
        _scale_magnitudes(model, seed)
    return _patched(model, patch)


def peft_dora(dropout: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32, patch=True):
    """:func:`peft_lora` with ``use_dora=True``."""
    return peft_lora(dropout, seed, dtype, patch, use_dora=True)


def peft_loha(seed: int = 0, dtype: torch.dtype = torch.float32, patch=True):
    """A peft LoHa model (r = 4, all seven projections, every factor random, halved: a
    trained-delta size), patched unless ``patch`` is False. Returns ``(model, report or None)``."""
    from peft import LoHaConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed, dtype=dtype), LoHaConfig(
        r=4, alpha=8, target_modules=LLAMA_TARGETS, init_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hada_w" in n:
                p.mul_(0.5)
    return _patched(model, patch)


def _patched(model, patch):
    import pypeft_fast as pf

    return model, (pf.patch(model, strict=True) if patch else None)


@torch.no_grad()
def _scale_magnitudes(model, seed):
    g = torch.Generator().manual_seed(seed + 200)
    for n, p in model.named_parameters():
        if "lora_magnitude_vector" in n or n.endswith(".magnitude"):
            p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g).to(p.dtype))


@torch.no_grad()
def injected_lowrank(dropout: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32,
                     magnitude: bool = False):
    """``pf.inject`` lowrank (r = 4) on all seven projections; B (zero at injection) randomised
    so that A gets a gradient from step 0. ``magnitude``: DoRA, the magnitudes moved off their
    init as in :func:`peft_lora`."""
    import pypeft_fast as pf
    from pypeft_fast.inject.modules import delta_modules

    model = pf.inject(tiny_llama(seed, dtype=dtype), pf.DeltaConfig(
        family="lowrank", r=4, alpha=8.0, dropout=dropout, target_modules=LLAMA_TARGETS,
        magnitude=magnitude))
    g = torch.Generator().manual_seed(seed + 100)
    for _, m in delta_modules(model):
        m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)
    if magnitude:
        _scale_magnitudes(model, seed)
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter, detached and cloned, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def token_batch(n: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, SEQ), generator=g)


class TokenDataset(Dataset):
    """``n`` random token rows, each its own causal-LM labels."""

    def __init__(self, n: int = 16, seed: int = 3):
        self.ids = token_batch(n, seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model, output_dir, *, bf16=False, steps=4, batch=2, accumulation=2, resume=None,
          save_steps=None, **training_args):
    """A transformers ``Trainer`` run on a 16-row :class:`TokenDataset` (AdamW lr 1e-2, seed 5, CPU);
    returns ``{global step: logged loss}`` (one log per optimizer step). ``resume``: a
    ``checkpoint-N`` directory; ``training_args``: more ``TrainingArguments``."""
    import transformers

    losses: dict[int, float] = {}

    class LossRecorder(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to="none", use_cpu=True, bf16=bf16, seed=5, dataloader_num_workers=0,
        disable_tqdm=True, **training_args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(16),
                                   callbacks=[LossRecorder()])
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    assert len(losses) == steps - (0 if resume is None else int(resume.name.split("-")[1]))
    return losses
