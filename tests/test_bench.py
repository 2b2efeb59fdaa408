"""Smoke test of the main job, ``pypeft-fast bench``, at its tiny preset: every variant, every
row, fp32 and bf16 autocast each with its own floor, the JSON and the plot. (Speed targets are a
benchmark's business, not a test's: they live in bench/NOTES.md.)"""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from pypeft_fast import bench  # noqa: E402
from pypeft_fast.__main__ import main as cli_main  # noqa: E402
from pypeft_fast.bench import precision, variants  # noqa: E402


def test_bench_tiny_end_to_end_fp32_and_bf16_autocast(tmp_path, capsys):
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli_main(["bench", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--no-progress",
                   "--precision", "fp32,bf16-autocast", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out

    doc = json.loads(js.read_text())
    assert doc["config"]["preset"] == "tiny" and doc["config"]["hidden"] == 64
    assert doc["config"]["precision"] == ["fp32", "bf16-autocast"]
    assert doc["device"].startswith("cpu")
    assert {"torch", "peft", "transformers", "pypeft_fast"} <= set(doc)
    rows = doc["rows"]
    per_precision = [("floor", "floor")] + [(f, impl) for f in bench.FAMILIES
                                            for impl in (variants.VARIANTS[f].baseline, "pypeft_fast")]
    expected = [("fp32", *k) for k in per_precision] + [("bf16-autocast", *k) for k in per_precision]
    assert [(r["precision"], r["family"], r["impl"]) for r in rows] == expected
    by = {(r["precision"], r["family"], r["impl"]): r for r in rows}
    for r in rows:
        floor = by[(r["precision"], "floor", "floor")]
        for k in ("family", "impl", "step_s", "saved_bytes", "trainable_params", "device", "torch", "date"):
            assert k in r, f"row {r['label']} lacks {k}"
        assert r["dtype"] == "float32" and r["autocast"] == (None if r["precision"] == "fp32" else "bfloat16")
        assert r["step_s"] > 0 and math.isfinite(r["step_s"]), r
        assert len(r["step_s_all"]) == 2 and r["step_s"] == pytest.approx(sum(r["step_s_all"]) / 2)
        assert r["saved_bytes"] > 0 and r["trainable_params"] > 0, r
        assert r["time_over_floor"] == pytest.approx(r["step_s"] / floor["step_s"] - 1)
        assert r["saved_over_floor"] == pytest.approx(r["saved_bytes"] / floor["saved_bytes"] - 1)
        if r["impl"] == "pypeft_fast":
            ref = by[(r["precision"], r["family"], variants.VARIANTS[r["family"]].baseline)]
            assert r["speedup_vs_peft"] == pytest.approx(ref["step_s"] / r["step_s"])
            assert r["trainable_params"] == ref["trainable_params"]  # same adapter, same weights
            if "pf_fallback_calls" in r:  # patched peft: every call served, at both precisions
                assert r["pf_fallback_calls"] == 0 and r["pf_served_calls"] > 0, r
            assert "target_time_over_floor" not in r  # the project's targets are not user output
    floor = by[("fp32", "floor", "floor")]
    assert floor["trainable_params"] == (2 * 2 + 1) * 64  # norms only: 2 per layer + the final one
    lora = 4 * (4 * (64 + 64) + 2 * (64 + 176) + (176 + 64)) * 2  # r·(in+out), 7 projections, 2 layers
    assert by[("fp32", "lowrank", "peft")]["trainable_params"] == lora

    # the limit beside the measurement: the adapter's FLOPs over the floor step's, from the formula
    tokens, shapes = 2 * 32, [(64, 64)] * 4 + [(64, 176)] * 2 + [(176, 64)]  # tiny: batch 2 × 32
    lora_flops = 2 * sum(6 * tokens * 4 * (i + o) for i, o in shapes)  # 6·n·r·(in+out), r = 4, 2 layers
    frozen = 2 * sum(4 * tokens * i * o for i, o in shapes)  # the projections' fwd + dx
    for prec in ("fp32", "bf16-autocast"):
        lo = by[(prec, "lowrank", "pypeft_fast")]
        assert lo["adapter_flops"] == lora_flops
        assert lo["floor_step_flops"] > frozen  # counted by torch: attention and lm_head on top
        assert lo["flop_share"] == pytest.approx(lora_flops / lo["floor_step_flops"])
        assert by[(prec, "floor", "floor")]["flop_share"] is None
        for r in rows:
            if r["precision"] == prec and r["impl"] != "floor":
                assert 0 < r["flop_share"] < 5, r["label"]
    assert "FLOP share" in out

    # under autocast, pypeft_fast's rows also carry the limit of a float32-accumulated delta:
    # share × ρ, ρ = a float32 GEMM's time over a bf16 one's, measured in the run
    for r in rows:
        if r["impl"] != "pypeft_fast":
            assert r["fp32_rate_ratio"] is None and r["flop_share_at_fp32_rate"] is None, r["label"]
        elif r["precision"] == "fp32":
            assert r["fp32_rate_ratio"] == 1.0
            assert r["flop_share_at_fp32_rate"] == pytest.approx(r["flop_share"])
        else:
            assert math.isfinite(r["fp32_rate_ratio"]) and r["fp32_rate_ratio"] > 0
            # DoRA with dropout: peft's extra base(drop(x)) GEMMs run in bf16, priced at 1
            frozen = (2 * sum(4 * tokens * i * o for i, o in shapes) if r["family"] == "dora-dropout"
                      else 0)
            delta = r["adapter_flops"] - frozen
            assert r["flop_share_at_fp32_rate"] == pytest.approx(
                (delta * r["fp32_rate_ratio"] + frozen) / r["floor_step_flops"])
    rho = {r["fp32_rate_ratio"] for r in rows if r["precision"] == "bf16-autocast" and r["impl"] == "pypeft_fast"}
    assert len(rho) == 1  # one measurement per precision, shared by its rows
    assert "at fp32 rate" in out

    for r in rows:  # the printed table has every row
        assert r["label"] in out
    assert "time over floor" in out and "saved MiB" in out and "bf16-autocast" in out
    assert "MISS" not in out and "target" not in out
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--families", "lora,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "tiny", "--phm-n", "5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--precision", "fp8"])
    a = bench.parse_args(["--preset", "tiny", "--families", "lokr,lora", "--seq", "16"])
    assert a.families == ["lowrank", "kronecker"] and a.seq == 16 and a.hidden == 64
    assert a.precision == "auto"
    families = sorted({s.family for s in variants.VARIANTS.values()})
    assert a.backends == {f: "auto" for f in families}
    a = bench.parse_args(["--backend", "lora=torch,sparse=torch", "--precision", "bf16-autocast"])
    assert a.backends == {f: ("torch" if f in ("lowrank", "sparse") else "auto") for f in families}
    assert a.precision == ["bf16-autocast"]
    assert bench.parse_args(["--backend", "torch"]).backends == {f: "torch" for f in families}
    with pytest.raises(SystemExit):
        bench.parse_args(["--backend", "lowrank=fast"])


def test_default_precisions_follow_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_reason", lambda: None)
    assert precision.default_precisions(cpu) == (["fp32", "bf16-autocast"], None)
    monkeypatch.setattr(precision, "cpu_bf16_reason", lambda: "no AVX512-BF16")
    names, note = precision.default_precisions(cpu)
    assert names == ["fp32"] and "no AVX512-BF16" in note and "--precision" in note


def test_a_variant_is_one_table_entry(monkeypatch):
    """Adding a variant is one VariantSpec: the CLI, the rows and the baseline pairing follow."""
    from peft import LoraConfig

    spec = variants.VariantSpec(
        "lowrank-r2", "lowrank", "LoRA r2", lambda a: "LoRA r=2",
        peft_config=lambda a: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        aliases=("lora2",))
    monkeypatch.setitem(variants.VARIANTS, spec.name, spec)
    a = bench.parse_args(["--preset", "tiny", "--families", "lora2"])
    assert a.families == ["lowrank-r2"]
    from pypeft_fast.bench.model import build_base

    built = variants.build_variants(a, build_base(a, torch.device("cpu"), torch.float32))
    assert [(v.family, v.impl) for v in built] == [("floor", "floor"), ("lowrank-r2", "peft"),
                                                   ("lowrank-r2", "pypeft_fast")]
    assert built[2].report is not None and len(built[2].report.entries) == 4


def test_bench_reports_a_failing_variant_and_goes_on(tmp_path, capsys):
    """A pypeft_fast row that raises (here: a backend that cannot run on CPU) is reported as
    failed, with the reason, and the other rows are still measured; the exit code says so."""
    js = tmp_path / "bench.json"
    rc = bench.main(["--preset", "tiny", "--families", "lora", "--backend", "lowrank=cuda", "--steps", "1",
                     "--warmup", "0", "--precision", "fp32", "--no-progress", "--json", str(js)])
    assert rc == 1
    rows = json.loads(js.read_text())["rows"]
    assert [(r["impl"], "error" in r) for r in rows] == [("floor", False), ("peft", False), ("pypeft_fast", True)]
    assert "cuda" in rows[2]["error"] and rows[2]["step_s"] is None
    assert rows[1]["step_s"] > 0 and rows[1]["saved_bytes"] > 0
    captured = capsys.readouterr()
    assert "FAILED" in captured.out


def test_scaling_view_runs_every_rank_and_sequence_length(tmp_path, capsys):
    js = tmp_path / "sweep.json"
    rc = cli_main(["bench", "--preset", "tiny", "--families", "lora", "--precision", "fp32", "--steps", "1",
                   "--warmup", "0", "--no-progress", "--rank", "2,4", "--seq", "8,12", "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    doc = json.loads(js.read_text())
    assert doc["ranks"] == [2, 4] and doc["seqs"] == [8, 12]
    fast = {(r["rank"], r["seq"]): r for r in doc["rows"] if r["impl"] == "pypeft_fast"}
    assert sorted(fast) == [(2, 8), (2, 12), (4, 8), (4, 12)]
    for (rank, seq), r in fast.items():  # the adapter's FLOPs grow with r and with the tokens
        assert r["adapter_flops"] == 2 * sum(6 * 2 * seq * rank * (i + o) for i, o in
                                             [(64, 64)] * 4 + [(64, 176)] * 2 + [(176, 64)])
    assert fast[(4, 8)]["flop_share"] == pytest.approx(2 * fast[(2, 8)]["flop_share"])
    assert "time / share" in out and out.count("pypeft_fast LoRA") >= 8  # 4 tables + the summary
    with pytest.raises(SystemExit):
        bench.parse_args(["--rank", "8,x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--seq", "0,256"])


def test_plot_labels_do_not_overlap(tmp_path, monkeypatch):
    """Every family's x tick label and the figure title stay apart when all seven families are
    plotted ("dora-dropout" beside "kronecker" on one line overlapped, and the long title ran
    off the figure)."""
    import matplotlib.pyplot as plt

    from pypeft_fast.bench import report

    rows = [{"precision": p, "family": f, "impl": impl, "time_over_floor": 1.5, "saved_over_floor": 0.4}
            for p in ("fp32", "bf16-autocast") for f in variants.VARIANTS
            for impl in (variants.VARIANTS[f].baseline, "pypeft_fast")]
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    report.plot(rows, str(tmp_path / "p.png"), "pypeft-fast bench: " + "a long configuration line, " * 8)
    (fig,) = figs
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
        assert len(boxes) == len(variants.VARIANTS)
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 <= right.x0, (ax.get_title(), left, right)
    title = fig._suptitle.get_window_extent(renderer)
    assert 0 <= title.x0 and title.x1 <= fig.bbox.x1
    plt.close(fig)


def test_fp32_rate_ratio_is_the_median_time_ratio(monkeypatch):
    """ρ is the float32 GEMM's median time over the low-precision one's (the timer replaced by
    fixed times: 3 × slower in float32, an outlier in each list that the median ignores)."""
    from types import SimpleNamespace

    from pypeft_fast import measure
    from pypeft_fast.bench import flops

    seen = {}

    def fake_times(fns, *, warmup, reps, device):
        for fn in fns.values():
            seen.setdefault("dtypes", []).append(fn().dtype)
        return {"fp32": [6.0, 60.0, 6.0, 5.0, 7.0], "low": [2.0, 2.0, 0.1, 2.5, 1.5]}

    monkeypatch.setattr(measure, "interleaved_times", fake_times)
    a = SimpleNamespace(batch=2, seq=8, hidden=16, intermediate=24)
    assert flops.fp32_rate_ratio(a, torch.device("cpu"), torch.bfloat16) == pytest.approx(3.0)
    assert seen["dtypes"] == [torch.float32, torch.bfloat16]
