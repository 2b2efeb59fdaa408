"""A patched peft LoRA model trained with accelerate (DDP or FSDP2, whatever the launch config says).

    accelerate launch --config_file examples/accelerate/fsdp2_cpu.yaml examples/accelerate/train_lora.py

A tiny Llama built from a config (random weights, nothing downloaded), LoRA r = 4 with dropout on
all seven projections, ``pf.patch`` before ``accelerator.prepare`` (patching after it works too),
a few AdamW steps on random tokens. Prints, per rank, the loss and the PatchReport's call counts
(every call served: 0 ran peft's forward), and on rank 0 a checksum of the gathered adapter weights.
"""
from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import pypeft_fast as pf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(0)  # the same initial weights on every rank
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=args.dropout, target_modules=TARGETS))
    report = pf.patch(model, strict=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)

    g = torch.Generator().manual_seed(1 + accelerator.process_index)  # each rank its own rows
    model.train()
    for step in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=g).to(accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        served, fallbacks = report.call_counts()
        print(f"rank {accelerator.process_index} step {step}: loss {loss.item():.4f}, "
              f"{served} layer calls served, {sum(fallbacks.values())} ran peft's forward", flush=True)

    state = accelerator.get_state_dict(model)  # gathers FSDP2 shards (collective: every rank)
    if accelerator.is_main_process:
        lora = {k: v for k, v in state.items() if "lora_" in k}
        checksum = sum(v.double().abs().sum().item() for v in lora.values())
        print(f"distributed type {accelerator.distributed_type.value}, {accelerator.num_processes} "
              f"processes; {len(lora)} adapter tensors, sum |w| = {checksum:.6f}")
        if os.environ.get("ACCELERATE_USE_FSDP") == "true" and accelerator.distributed_type.value != "FSDP":
            print("note: the config asks for FSDP, but accelerate enables FSDP only on accelerators "
                  "(GPU/NPU/XPU/...); on CPU it runs as MULTI_CPU (DDP over gloo)")
        print(report.summary())


if __name__ == "__main__":
    main()
