"""The bench's model and batch: a Llama-architecture model built from a config (random weights,
seed 0; nothing downloaded) and one fixed batch of token ids, and the materialising reference
used where peft has no implementation of a family (PHM)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.heads, vocab_size=a.vocab,
                       max_position_embeddings=max(a.seq, 16), use_cache=False)


def build_base(a, device, dtype) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(a)).to(device=device, dtype=dtype)
    model.train()
    return model


def make_batch(a, device) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def randomise_zeros(model: nn.Module) -> None:
    """Zero-initialised factors (LoRA's B, SHiRA's values, PHM's B) get small random values, so
    the bench does not run on an all-zero delta (which some library paths could short-cut)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and not p.any():
                p.copy_((torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype))


class MaterialisingDelta(nn.Module):
    """The naive reference for an injected layer: ΔW built from the same Parameters every call,
    then ``F.linear`` — what peft's LoKr/LoHa do, and what PHM costs without pypeft_fast."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner  # the pf DeltaLinear whose Parameters and base layer are used

    def forward(self, x):
        m = self.inner
        base = F.linear(x, m.base_weight(), m.base_layer.bias)
        dw = m.delta_weight()
        return (base + F.linear(x.to(dw.dtype), dw)).to(base.dtype)


def materialising_copy(model: nn.Module) -> nn.Module:
    """A copy of an injected model whose layers materialise ΔW (a shared A stays shared)."""
    from ..inject import delta_modules

    ref = copy.deepcopy(model)
    for name, m in delta_modules(ref):
        parent_name, _, child = name.rpartition(".")
        parent = ref.get_submodule(parent_name) if parent_name else ref
        setattr(parent, child, MaterialisingDelta(m))
    return ref


def floor_copy(base: nn.Module) -> nn.Module:
    """The frozen floor: the same forward/backward through every layer, only the norms train."""
    floor = copy.deepcopy(base)
    for n, p in floor.named_parameters():
        p.requires_grad_("norm" in n)
    return floor
