"""pypeft_fast.workloads (the benchmarks' shared setups and formulas) and bench/report.py."""
import json
import sys
from pathlib import Path

import pytest
import torch

from pypeft_fast import workloads
from numerics import assert_within

BENCH = Path(__file__).resolve().parent.parent / "bench"
AVAILABLE = [n for n in workloads.CASE_FAMILIES if workloads.unavailable(n) is None]


def test_flop_formulas_against_the_notes():
    """bench/NOTES.md's hand counts at the e2e model's attention shape (n = 1024, r = 16)."""
    s = workloads.SHAPES["pf-bench/q_proj"]
    assert workloads.frozen_flops(s, 1024) == 4 * 1024 * 1024 * 1024
    assert workloads.adapter_flop_share("lowrank", s, 16, 1024) == pytest.approx(0.046875)   # 4.7 %
    assert workloads.adapter_flops("kronecker", s, 16, 1024, "forward") == 2 * 1024 * 32 * 32 * 64  # 134 M
    assert workloads.adapter_flops("kronecker", s, 16, 1024) == pytest.approx(470e6, rel=0.01)
    assert workloads.adapter_flops("sparse", s, 16, 1024) == 6 * 1024 * 16 * 2048
    assert workloads.kron_factors(workloads.SHAPES["llama-3-8b/q_proj"], 16) == ((64, 64), (64, 64), 16)
    b = workloads.bytes_moved(None, s, 16, 1024, "forward")
    assert b == 4 * (1024 * 1024 * 3)


def test_shape_registry_has_the_real_models():
    S = workloads.SHAPES
    assert (S["llama-3-8b/k_proj"].in_features, S["llama-3-8b/k_proj"].out_features) == (4096, 1024)
    assert S["llama-2-7b/down_proj"].in_features == 11008 and S["mistral-7b/up_proj"].out_features == 14336
    assert S["bert-base/intermediate"].out_features == 3072 and S["t5-base/wo"].in_features == 3072
    with pytest.raises(ValueError, match="unknown projection shape"):
        workloads.shape_of("gpt-5/q_proj")


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_each_setup_matches_its_float64_reference_and_a_wrong_op_fails(name, impl):
    w = workloads.make_case(name, "tiny/wide", 4, workloads.TINY_TOKENS)
    assert all(p.requires_grad and p.abs().sum() > 0 for p in w.params.values())
    fn = w.ours("torch") if impl == "ours" else w.reference()
    mask = "peft" if impl == "reference" else "ours"

    def run():
        w.zero_grad()
        if mask == "peft":
            torch.manual_seed(workloads.REFERENCE_RNG_SEED)
        y = fn()
        y.backward(w.gy)
        return y.detach(), {"x": w.x.grad, **{k: p.grad for k, p in w.params.items()}}

    y, g = run()
    y64, g64 = w.expected(torch.float64, mask)
    yb, gb = w.expected(None, mask)
    assert_within(f"{name} y", y, y64, yb, yb.dtype)
    for k in g64:
        assert_within(f"{name} d{k}", g[k], g64[k], gb[k], gb[k].dtype)
    with torch.no_grad():  # a perturbed factor: the same check must fail
        next(iter(w.params.values())).mul_(1.01)
    y2, _ = run()
    with pytest.raises(AssertionError, match="beyond tol"):
        assert_within(f"{name} y", y2, y64, yb, yb.dtype)


def test_unavailable_says_why():
    assert workloads.unavailable("nope").startswith("unknown case family")
    with pytest.raises(ValueError, match="cannot run"):
        workloads.make_case("nope", "tiny/wide", 4, 8)


def _fake_json(path):
    rows = []
    for impl, t, fz in (("reference", 3e-3, 1e-3), ("torch", 1.5e-3, 1e-3), ("triton", 1.2e-3, 1e-3)):
        info = {"kind": "layer", "family": "lowrank", "impl": impl, "backend": impl, "reference_name": "peft",
                "mode": "full", "shape": "llama-3-8b/q_proj", "rank": 16, "tokens": 16384, "dtype": "bf16",
                "flops": 1e12, "bytes": 1e9, "median_s": t, "frozen_s": fz, "ratio_to_frozen": t / fz,
                "gflops_per_s": 1e3 / t, "gb_per_s": 1 / t, "adapter_flop_share": 0.0078,
                "device": "cuda: NVIDIA H200", "torch": "2.11.0", "threads": 16, "date": "2026-12-01"}
        rows.append({"name": f"test_kernel[{impl}]", "stats": {"median": t}, "extra_info": info})
    rows.append({"name": "test_op[x]", "stats": {"median": 1e-3},
                 "extra_info": {"kind": "op", "family": "sparse", "op": "sddmm", "provider": "torch",
                                "shape": "bert-base/query", "rank": 16, "tokens": 1024, "flops": 1e9,
                                "bytes": 1e7, "median_s": 1e-3, "gflops_per_s": 1e3, "gb_per_s": 10.0}})
    path.write_text(json.dumps({"benchmarks": rows}))


def test_report_markdown_and_png(tmp_path):
    sys.path.insert(0, str(BENCH))
    import report

    _fake_json(tmp_path / "b.json")
    assert report.main([str(tmp_path / "b.json"), "--md", str(tmp_path / "r.md"), "--png", str(tmp_path / "r.png")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "| llama-3-8b/q_proj | 16 | 16384 | torch | 1.5 | 1 | 1.50 | 2.00× |" in md      # speed-up over peft
    assert "+200.0 %" in md and "0.8 %" in md                                            # limit table
    assert "| sparse | sddmm |" in md                                                     # op level
    assert "(1.10×)" in md                                                                # roofline beside triton
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
