"""torchrun worker: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) training of patched peft
and injected models on CPU with gloo (issue 9, part 6). tests/test_distributed.py starts it::

    torchrun --standalone --nproc-per-node=2 tests/dist_workers/train_worker.py OUT_DIR [SCENARIO ...]

Every scenario trains a tiny Llama for STEPS SGD steps; each rank takes its half of the same
global batch of GLOBAL rows. Rank 0 then writes ``OUT_DIR/<scenario>.pt`` with the adapter
weights of every rank (FSDP2 shards gathered with ``full_tensor``), the same training run in one
process on the whole global batch (in the same dtype and in float64; dropout 0 only), the
PatchReport's call counts per rank, and the error text where a scenario is expected to raise.
The test asserts on those files; this script only computes.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from training_models import injected_lowrank, peft_dora, peft_lora, token_batch  # noqa: E402

STEPS = 3
GLOBAL = 4  # rows per global batch; each of the 2 ranks takes 2

# name: (parallelism, model, dropout, base dtype, FSDP2 wrapping and options: "" for DDP)
SCENARIOS = {
    "ddp-peft": ("ddp", "peft", 0.0, torch.float32, ""),
    "ddp-injected": ("ddp", "injected", 0.0, torch.float32, ""),
    "ddp-peft-dropout": ("ddp", "peft", 0.2, torch.float32, ""),
    "ddp-injected-dropout": ("ddp", "injected", 0.2, torch.float32, ""),
    # peft DoRA; at p > 0 on CPU (auto = cpp) NativeDoRA's dropped-set identity
    "ddp-peft-dora": ("ddp", "peft-dora", 0.0, torch.float32, ""),
    "ddp-peft-dora-dropout": ("ddp", "peft-dora", 0.2, torch.float32, ""),
    "fsdp2-peft": ("fsdp2", "peft", 0.0, torch.float32, "layers"),
    "fsdp2-injected": ("fsdp2", "injected", 0.0, torch.float32, "layers"),
    "fsdp2-peft-dropout": ("fsdp2", "peft", 0.2, torch.float32, "layers"),
    "fsdp2-injected-dropout": ("fsdp2", "injected", 0.2, torch.float32, "layers"),
    # peft DoRA: the magnitude vector sharded with its decoder layer like A and B
    "fsdp2-peft-dora": ("fsdp2", "peft-dora", 0.0, torch.float32, "layers"),
    "fsdp2-peft-dora-dropout": ("fsdp2", "peft-dora", 0.2, torch.float32, "layers"),
    # peft's default on a bf16 model: fp32 adapters, frozen bf16 base, one FSDP group per layer
    "fsdp2-peft-bf16-base": ("fsdp2", "peft", 0.0, torch.bfloat16, "layers"),
    "fsdp2-injected-bf16-base": ("fsdp2", "injected", 0.0, torch.bfloat16, "layers"),
    # the same with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): bf16 adapters in compute
    "fsdp2-peft-bf16-base-mp-policy": ("fsdp2", "peft", 0.0, torch.bfloat16, "layers, mp-bf16"),
    # the adapter modules themselves sharded (lora_A / lora_B, or an injected base_layer)
    "fsdp2-peft-lora-modules-sharded": ("fsdp2", "peft", 0.0, torch.float32, "adapter-modules"),
    "fsdp2-injected-base-layer-sharded": ("fsdp2", "injected", 0.0, torch.float32, "adapter-modules"),
    # a trainable bf16 norm next to the fp32 adapters: in one group FSDP2 refuses (its rule: one
    # dtype per group's trainable parameters); the norms in their own fully_shard groups work
    "fsdp2-peft-bf16-base-trainable-norms": ("fsdp2", "peft", 0.0, torch.bfloat16, "layers, norms"),
    "fsdp2-peft-bf16-base-trainable-norms-own-groups": (
        "fsdp2", "peft", 0.0, torch.bfloat16, "layers, norms in own groups"),
    # bf16 autocast around forward (fp32 model), as Trainer's bf16=True does
    "fsdp2-peft-autocast": ("fsdp2", "peft", 0.0, torch.float32, "layers, autocast"),
    "fsdp2-injected-autocast": ("fsdp2", "injected", 0.0, torch.float32, "layers, autocast"),
    # pf.patch called on the already sharded model (parameters are DTensors between forwards)
    "fsdp2-peft-patched-after-sharding": ("fsdp2", "peft", 0.0, torch.float32, "layers, then patch"),
}


def build(model_kind, dropout, dtype, sharding="", patch=True):
    if model_kind in ("peft", "peft-dora"):
        make = peft_dora if model_kind == "peft-dora" else peft_lora
        model, report = make(dropout=dropout, dtype=dtype, patch=patch)
    else:
        model, report = injected_lowrank(dropout=dropout, dtype=dtype), None
    if "norms" in sharding:
        for layer in decoder_layers(model):
            for norm in norms(layer):
                norm.weight.requires_grad_(True)
    return model, report


def norms(layer):
    return layer.input_layernorm, layer.post_attention_layernorm


def decoder_layers(model):
    inner = model.base_model.model if hasattr(model, "peft_config") else model  # PeftModel
    return list(inner.model.layers)


def adapter_modules(model):
    """The modules a user might (wrongly) wrap one by one: peft's lora_A/lora_B Linears, an
    injected layer's base_layer."""
    from pypeft_fast.inject.modules import delta_modules

    found = []
    for name, m in model.named_modules():
        if name.endswith((".lora_A.default", ".lora_B.default")):
            found.append(m)
    found += [m.base_layer for _, m in delta_modules(model)]
    return found


def wrap(model, parallelism, sharding):
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kw = {"mesh": mesh}
    if "mp-bf16" in sharding:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if sharding == "adapter-modules":
        for m in adapter_modules(model):
            fully_shard(m, **kw)
    for layer in decoder_layers(model):
        if "norms in own groups" in sharding:
            for norm in norms(layer):
                fully_shard(norm, **kw)
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def full_adapter_state(model):
    from torch.distributed.tensor import DTensor

    module = getattr(model, "module", model)  # DDP
    out = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[n] = t.detach().clone()
    return out


def train(model, rows_of_step, autocast=False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)  # weights move linearly with the gradients
    model.train()
    for step in range(STEPS):
        ids = rows_of_step(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def run_scenario(name, rank, world):
    parallelism, model_kind, dropout, dtype, sharding = SCENARIOS[name]
    data = token_batch(GLOBAL * STEPS, seed=21).view(STEPS, GLOBAL, -1)
    local = GLOBAL // world
    result = {"scenario": name}
    torch.manual_seed(1234)  # the same dropout seeds stream on every rank
    patch_after = sharding == "layers, then patch"
    model, report = build(model_kind, dropout, dtype, sharding, patch=not patch_after)
    try:
        model = wrap(model, parallelism, sharding)
        if patch_after:
            import pypeft_fast as pf

            report = pf.patch(model, strict=True)
        train(model, lambda s: data[s, rank * local:(rank + 1) * local], autocast="autocast" in sharding)
        result["state"] = full_adapter_state(model)
        result["error"] = None
    except Exception as e:  # noqa: BLE001 - the test checks the message
        result["state"] = None
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    if report is not None:
        served, fallbacks = report.call_counts()
        result["served"], result["fallbacks"] = served, dict(fallbacks)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank != 0:
        return
    out = {"scenario": name, "ranks": gathered, "steps": STEPS}
    if dropout == 0.0:  # the same steps in one process on the whole global batch
        for key, cast in (("single", dtype), ("single_f64", torch.float64)):
            torch.manual_seed(1234)
            ref, _ = build(model_kind, dropout, dtype, sharding)
            ref = ref.to(torch.float64) if cast == torch.float64 else ref
            train(ref, lambda s: data[s], autocast="autocast" in sharding and key == "single")
            out[key] = full_adapter_state(ref)
    torch.save(out, os.path.join(OUT_DIR, f"{name}.pt"))


if __name__ == "__main__":
    OUT_DIR = sys.argv[1]
    names = sys.argv[2:] or list(SCENARIOS)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for name in names:
        run_scenario(name, rank, world)
        dist.barrier()
    dist.destroy_process_group()
