"""DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) on PyTorch's own engine, CPU + gloo, two
processes started by ``torchrun`` (issue 9, part 6).

One ``torchrun --standalone --nproc-per-node=2 tests/dist_workers/train_worker.py`` run trains
every scenario (a tiny Llama, 3 SGD steps, each rank half of the same global batch) and rank 0
saves what it saw; the tests below assert on it:

* dropout 0: the adapter weights equal a single-process run on the whole global batch by
  flash-attention's rule against a float64 single-process run — DDP and FSDP2 (per decoder layer,
  then the root), patched peft LoRA and DoRA and injected lowrank, fp32 and fp32 adapters on a bf16 base
  (with and without ``MixedPrecisionPolicy``; trainable bf16 norms in their own groups), bf16
  autocast, and ``pf.patch`` applied after sharding;
* FSDP2's one-dtype-per-group rule for trainable parameters: torch's error, and the fix;
* dropout 0.2: every rank ends with the same weights, and they differ from the dropout-0 run;
* ``fully_shard`` on the adapter modules themselves: a patched peft layer runs peft's forward
  (which unshards them), counted with the reason; an injected layer whose ``base_layer`` is
  sharded raises a ValueError naming the layer — never a computation on a shard;
* ``accelerate launch`` with the FSDP2 config of examples/accelerate (what accelerate does on CPU).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from numerics import assert_within  # noqa: E402
from training_models import N_ADAPTED  # noqa: E402

WORKER = Path(__file__).parent / "dist_workers" / "train_worker.py"
ACCELERATE_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate" / "fsdp2_cpu.yaml"
ACCELERATE_SCRIPT = ACCELERATE_CONFIG.with_name("train_lora.py")
TIMEOUT_S = 240  # the worker takes 25-50 s on the shared 2-core machine


def launcher(name: str, module: str, *subcommand: str) -> list[str]:
    """The venv's console script ``name`` (torchrun, accelerate launch), else ``python -m module``."""
    exe = shutil.which(name, path=os.path.dirname(sys.executable))
    return [exe, *subcommand] if exe else [sys.executable, "-m", module]


def launch(cmd: list[str], **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd[0]} did not finish in {TIMEOUT_S} s:\n{(e.stderr or '')[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    launch([*launcher("torchrun", "torch.distributed.run"), "--standalone", "--nproc-per-node=2",
            str(WORKER), str(out)])
    return {p.stem: torch.load(p, weights_only=False) for p in out.glob("*.pt")}


def completed(runs, name):
    assert name in runs, f"scenario {name} wrote no result; have {sorted(runs)}"
    run = runs[name]
    for rank, r in enumerate(run["ranks"]):
        assert r["error"] is None, f"{name}, rank {rank}: {r['error']}\n{r.get('traceback', '')}"
    states = [r["state"] for r in run["ranks"]]
    assert len(states) == 2 and len(states[0]) > 0
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"{name}: ranks differ in {k}"
    return run, states[0]


def assert_served(run, *, served: bool = True):
    for rank, r in enumerate(run["ranks"]):
        if "served" not in r:
            continue  # injected: every call is the op
        calls = N_ADAPTED * run["steps"]
        if served:
            assert r["fallbacks"] == {}, f"rank {rank}: calls ran peft's forward: {r['fallbacks']}"
            assert r["served"] == calls, f"rank {rank}: {r['served']} of {calls} calls served"
        else:
            assert r["served"] == 0 and sum(r["fallbacks"].values()) == calls, r["fallbacks"]


SAME_AS_ONE_PROCESS = [
    "ddp-peft", "ddp-injected", "ddp-peft-dora", "fsdp2-peft", "fsdp2-injected", "fsdp2-peft-dora",
    "fsdp2-peft-bf16-base",
    "fsdp2-injected-bf16-base", "fsdp2-peft-bf16-base-mp-policy", "fsdp2-peft-patched-after-sharding",
    "fsdp2-peft-bf16-base-trainable-norms-own-groups", "fsdp2-peft-autocast", "fsdp2-injected-autocast",
]


@pytest.mark.parametrize("name", SAME_AS_ONE_PROCESS)
def test_two_ranks_equal_one_process_on_the_global_batch(runs, name):
    run, state = completed(runs, name)
    assert_served(run)
    single, single_f64 = run["single"], run["single_f64"]
    assert state.keys() == single.keys()
    for k in single:
        # adapters fp32 (peft's and inject's default on a bf16 base); trainable norms stay bf16
        expected = torch.bfloat16 if "norm" in k else torch.float32
        assert state[k].dtype == single[k].dtype == expected, f"{k}: {state[k].dtype}"
        assert_within(f"{name} {k}", state[k], single_f64[k], single[k], expected)


@pytest.mark.parametrize("name", ["ddp-peft", "ddp-injected", "ddp-peft-dora", "fsdp2-peft", "fsdp2-injected",
                                  "fsdp2-peft-dora"])
def test_dropout_keeps_every_rank_identical(runs, name):
    run, state = completed(runs, name + "-dropout")
    assert_served(run)
    _, without = completed(runs, name)
    moved = max((state[k] - without[k]).abs().max().item() for k in state)
    assert moved > 1e-4, f"{name}: dropout 0.2 gave the dropout-0 weights (max diff {moved:.3g})"


def test_fsdp2_refuses_two_trainable_dtypes_in_one_group(runs):
    """FSDP2's own rule (torch: _fsdp_param_group._init_mp_dtypes, whatever MixedPrecisionPolicy
    says): one dtype for the trainable parameters of a fully_shard group. fp32 adapters next to a
    trainable bf16 norm in one decoder-layer group fail at the first forward; the fix (README) is
    fully_shard on the norms first, tested above as ...-trainable-norms-own-groups."""
    for r in runs["fsdp2-peft-bf16-base-trainable-norms"]["ranks"]:
        err = r["error"]
        assert err is not None and "FSDP expects uniform original parameter dtype" in err, err


def test_fully_shard_on_lora_modules_runs_peft_forward_with_the_reason(runs):
    """lora_A/lora_B wrapped one by one: pypeft_fast would read shards, so every call runs peft's
    forward (which calls those modules, so FSDP2 unshards them): correct and counted."""
    name = "fsdp2-peft-lora-modules-sharded"
    run, state = completed(runs, name)
    assert_served(run, served=False)
    (reason,) = run["ranks"][0]["fallbacks"]
    assert "fully_shard" in reason and "decoder layer" in reason, reason
    for k in run["single"]:
        assert_within(f"{name} {k}", state[k], run["single_f64"][k], run["single"][k], torch.float32)


def test_fully_shard_on_an_injected_base_layer_raises_naming_the_layer(runs):
    run = runs["fsdp2-injected-base-layer-sharded"]
    for r in run["ranks"]:
        err = r["error"]
        assert err is not None, "a sharded base_layer was computed on"
        assert err.startswith("ValueError: model.layers.0.self_attn.q_proj: weight is a DTensor"), err
        assert "local shard (16, 32) of (32, 32)" in err and "fully_shard" in err, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_with_the_fsdp2_config_on_cpu():
    """README's command. accelerate 1.15 turns the FSDP config into FSDP only on accelerators
    (GPU/NPU/XPU/...): on CPU, with ACCELERATE_USE_CPU=true (without it the two processes do not
    even form a process group), it trains as MULTI_CPU — DDP over gloo. Every call is served."""
    pytest.importorskip("accelerate")
    cmd = [*launcher("accelerate", "accelerate.commands.launch", "launch"),
           "--config_file", str(ACCELERATE_CONFIG), "--main_process_port", str(free_port()),
           str(ACCELERATE_SCRIPT), "--steps", "2"]
    out = launch(cmd, ACCELERATE_USE_CPU="true").stdout
    for rank in (0, 1):
        assert f"rank {rank} step 1: loss" in out, out
    assert out.count(f"{2 * N_ADAPTED} layer calls served, 0 ran peft's forward") == 2, out
    assert "distributed type MULTI_CPU, 2 processes; 28 adapter tensors" in out, out
    assert "note: the config asks for FSDP" in out, out
