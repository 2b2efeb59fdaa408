"""The precisions a bench run measures: the base model's dtype and whether the step runs under
``torch.autocast`` (mixed precision: fp32 weights, matmuls in bf16/fp16)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    base_dtype: torch.dtype          # the frozen model's dtype (adapters stay fp32)
    autocast: torch.dtype | None     # the autocast dtype of the forward, or None

    @property
    def frozen_gemm_dtype(self) -> torch.dtype:
        """The dtype the floor's GEMMs run in: the autocast dtype, else the base model's."""
        return self.autocast or self.base_dtype

    def context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", torch.float32, None),
    Precision("bf16-autocast", torch.float32, torch.bfloat16),
    Precision("fp16-autocast", torch.float32, torch.float16),
    Precision("bf16", torch.bfloat16, None),   # bf16 base, fp32 adapters (peft's default)
    Precision("fp16", torch.float16, None),
)}


def cpu_bf16_reason() -> str | None:
    """None when this CPU computes bf16 natively (AVX512-BF16 or AMX), else why not: without it
    bf16 matmuls are emulated and slower than fp32, so the bench skips bf16 there by default."""
    cpu = getattr(torch, "cpu", None)
    has = [f for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
           if cpu is not None and getattr(cpu, f, lambda: False)()]
    if has:
        return None
    return (f"this CPU has no native bf16 (no AVX512-BF16, no AMX; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}): bf16 matmuls are emulated")


def default_precisions(device: torch.device) -> tuple[list[str], str | None]:
    """``(precisions, note)``: fp32, plus bf16 autocast where the device computes bf16 natively
    (every CUDA GPU: bf16, or fp16 autocast where bf16 is not supported)."""
    if device.type == "cuda":
        return ["fp32", "bf16-autocast" if torch.cuda.is_bf16_supported() else "fp16-autocast"], None
    reason = cpu_bf16_reason()
    if reason is None:
        return ["fp32", "bf16-autocast"], None
    return ["fp32"], f"bf16-autocast rows skipped: {reason}; ask for them with --precision fp32,bf16-autocast"
