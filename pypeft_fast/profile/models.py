"""The profiler's inputs: built-in model presets (configs only, random weights), local Hugging
Face model directories, the batch, and the parameter estimate checked before allocating.

Presets (reduced depth: the blocks are identical, :mod:`.projection` scales them back up):

=============  ==============================================================  ======  ==========
name           shape                                                           depth   batch×seq
=============  ==============================================================  ======  ==========
bench          the e2e bench's Llama: hidden 1024, intermediate 2752, 16 heads  4 (4)   4 × 256
bert-base      BERT-base: hidden 768, 12 heads, intermediate 3072 (MaskedLM)    2 (12)  8 × 128
t5-base        T5-base: d_model 768, d_ff 3072, 12 heads (encoder + decoder)    2 (12)  8 × 128
llama-3-8b     Llama-3-8B: hidden 4096, intermediate 14336, 32/8 heads, 128K v  2 (32)  1 × 512
mistral-7b     Mistral-7B: hidden 4096, intermediate 14336, 32/8 heads, 32K v   2 (32)  1 × 512
=============  ==============================================================  ======  ==========
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ProfileError(ValueError):
    """Bad input to ``pypeft-fast profile``: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Preset:
    arch: str                 # "llama", "mistral", "bert", "t5"
    config: dict = field(default_factory=dict)
    layers: int = 2           # depth measured by default
    full_layers: int = 2      # the real model's depth (a note suggests projecting to it)
    batch: int = 1
    seq: int = 128
    dtype: str = "float32"    # on CUDA; on CPU always float32 unless --dtype (bf16 GEMMs on CPUs
                              # without AVX512-BF16/AMX run ~200× slower: 0.04 vs 8 GFLOP/s measured)


PRESETS = {
    "bench": Preset("llama", dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=16,
                                  num_key_value_heads=16, vocab_size=4096), 4, 4, 4, 256),
    "bert-base": Preset("bert", dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                     vocab_size=30522), 2, 12, 8, 128),
    "t5-base": Preset("t5", dict(d_model=768, d_ff=3072, num_heads=12, d_kv=64, vocab_size=32128,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), 2, 12, 8, 128),
    "llama-3-8b": Preset("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
                         2, 32, 1, 512, "bfloat16"),
    "mistral-7b": Preset("mistral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                         num_key_value_heads=8, vocab_size=32000, sliding_window=4096),
                         2, 32, 1, 512, "bfloat16"),
}

_DEPTH_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer")


def preset_config(name: str, layers: int | None = None):
    if name not in PRESETS:
        raise ProfileError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    import transformers

    p = PRESETS[name]
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "bert": transformers.BertConfig, "t5": transformers.T5Config}[p.arch]
    depth = layers or p.layers
    kw = dict(p.config)
    if p.arch == "t5":
        kw.update(num_layers=depth, num_decoder_layers=depth)
    else:
        kw["num_hidden_layers"] = depth
    if p.arch in ("llama", "mistral"):
        kw["max_position_embeddings"] = 8192
    cfg = cls(**kw)
    cfg.use_cache = False
    return cfg


def path_config(path: str, layers: int | None = None):
    if not os.path.isdir(path):
        raise ProfileError(f"--model {path}: not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ProfileError(f"--model {path}: no config.json in it (a Hugging Face model directory is expected)")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001  (a broken config is bad input)
        raise ProfileError(f"--model {path}: config.json not readable: {str(e).splitlines()[0]}") from None
    if layers:
        for k in _DEPTH_KEYS:
            if hasattr(cfg, k):
                setattr(cfg, k, layers)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    return cfg


def model_class(cfg):
    """The training head for a config: causal LM, else seq2seq LM, else masked LM, else the bare model."""
    import transformers as t

    for auto in (t.AutoModelForCausalLM, t.AutoModelForSeq2SeqLM, t.AutoModelForMaskedLM, t.AutoModel):
        if type(cfg) in auto._model_mapping:
            return auto
    raise ProfileError(f"no transformers model class for a {type(cfg).__name__}")


def depth(cfg) -> int:
    return next((getattr(cfg, k) for k in _DEPTH_KEYS if isinstance(getattr(cfg, k, None), int)), 1)


def estimate_params(cfg) -> int:
    """Parameters of the model the config describes, counted on the meta device (no memory)."""
    auto = model_class(cfg)
    with torch.device("meta"):
        m = auto.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(what: str, cfg, dtype: torch.dtype, copies: int, device: torch.device) -> int:
    """Raise :class:`ProfileError` (before allocating) when the parameters alone exceed the memory."""
    n = estimate_params(cfg)
    need = n * torch.empty((), dtype=dtype).element_size() * copies
    have = available_bytes(device)
    if need > have:
        gib = 2 ** 30
        raise ProfileError(
            f"{what} at {depth(cfg)} layers has {n / 1e9:.2f} B parameters: {need / gib:.1f} GiB in "
            f"{str(dtype).replace('torch.', '')}{f' × {copies} copies' if copies > 1 else ''}, more than the "
            f"{have / gib:.1f} GiB available on {device.type} (use --layers, --dtype bfloat16)")
    return n


def build_model(cfg, dtype: torch.dtype, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    model = model_class(cfg).from_config(cfg)
    return model.to(device=device, dtype=dtype).train()


def make_batch(cfg, batch: int, seq: int, device: torch.device, seed: int = 3) -> dict:
    """Random token ids; labels = the ids (causal/masked LM, and T5's decoder)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}
