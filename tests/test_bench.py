"""Smoke test of the main job, ``pypeft-fast bench``, at its tiny preset: every family, every
row, the JSON and the plot. (Speed targets are a benchmark's business, not a test's.)"""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from pypeft_fast import bench  # noqa: E402
from pypeft_fast.__main__ import main as cli_main  # noqa: E402


def test_bench_tiny_end_to_end(tmp_path, capsys):
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli_main(["bench", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--no-progress",
                   "--json", str(js), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out

    doc = json.loads(js.read_text())
    assert doc["config"]["preset"] == "tiny" and doc["config"]["hidden"] == 64
    assert doc["device"].startswith("cpu") and doc["dtype"] == "float32"
    assert {"torch", "peft", "transformers", "pypeft_fast"} <= set(doc["versions"])
    rows = doc["rows"]
    expected = [("floor", "floor")] + [(f, impl) for f in bench.FAMILIES
                                       for impl in (("reference" if f == "phm" else "peft"), "pypeft_fast")]
    assert [(r["family"], r["impl"]) for r in rows] == expected
    floor = rows[0]
    by = {(r["family"], r["impl"]): r for r in rows}
    for r in rows:
        for k in ("family", "impl", "step_s", "saved_bytes", "trainable_params", "device", "versions", "date"):
            assert k in r, f"row {r['label']} lacks {k}"
        assert r["step_s"] > 0 and math.isfinite(r["step_s"]), r
        assert len(r["step_s_all"]) == 2 and r["step_s"] == pytest.approx(sorted(r["step_s_all"])[0] / 2
                                                                          + sorted(r["step_s_all"])[1] / 2)
        assert r["saved_bytes"] > 0 and r["trainable_params"] > 0, r
        assert r["time_over_floor"] == pytest.approx(r["step_s"] / floor["step_s"] - 1)
        assert r["saved_over_floor"] == pytest.approx(r["saved_bytes"] / floor["saved_bytes"] - 1)
        if r["impl"] == "pypeft_fast":
            ref = by[(r["family"], "reference" if r["family"] == "phm" else "peft")]
            assert r["speedup_vs_peft"] == pytest.approx(ref["step_s"] / r["step_s"])
            # the same adapter on the same weights: the same number of trainable parameters
            assert r["trainable_params"] == ref["trainable_params"]
            assert r.get("pf_fallback_calls", 0) == 0, f"{r['label']}: calls ran peft's forward"
            assert "target_time_over_floor" in r
    # floor trains the norms only: 2 per layer + the final one, hidden each
    assert floor["trainable_params"] == (2 * 2 + 1) * 64
    # LoRA r=4 on 7 projections of 2 layers: r·(in+out) each
    lora = 4 * (4 * (64 + 64) + 2 * (64 + 176) + (176 + 64)) * 2
    assert by[("lowrank", "peft")]["trainable_params"] == lora

    for r in rows:  # the printed table has every row
        assert r["label"] in out
    assert "time over floor" in out and "saved MiB" in out
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--families", "lora,dora"])
    assert "unknown ['dora']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "tiny", "--phm-n", "5"])
    a = bench.parse_args(["--preset", "tiny", "--families", "lokr,lora", "--seq", "16"])
    assert a.families == ["lowrank", "kronecker"] and a.seq == 16 and a.hidden == 64
    assert a.backends == {f: "auto" for f in bench.FAMILIES}
    a = bench.parse_args(["--backend", "lora=torch,sparse=torch"])
    assert a.backends == {"lowrank": "torch", "kronecker": "auto", "sparse": "torch", "phm": "auto"}
    assert bench.parse_args(["--backend", "torch"]).backends == {f: "torch" for f in bench.FAMILIES}
    with pytest.raises(SystemExit):
        bench.parse_args(["--backend", "lowrank=fast"])


def test_bench_reports_a_failing_variant_and_goes_on(tmp_path, capsys):
    """A pypeft_fast row that raises (here: a backend that cannot run on CPU) is reported as
    failed, with the reason, and the other rows are still measured; the exit code says so."""
    js = tmp_path / "bench.json"
    rc = bench.main(["--preset", "tiny", "--families", "lora", "--backend", "lowrank=cuda", "--steps", "1",
                     "--warmup", "0", "--no-progress", "--json", str(js)])
    assert rc == 1
    rows = json.loads(js.read_text())["rows"]
    assert [(r["impl"], "error" in r) for r in rows] == [("floor", False), ("peft", False), ("pypeft_fast", True)]
    assert "cuda" in rows[2]["error"] and rows[2]["step_s"] is None
    assert rows[1]["step_s"] > 0 and rows[1]["saved_bytes"] > 0
    captured = capsys.readouterr()
    assert "failed" in captured.out and "FAIL" not in captured.out  # tiny: no target lines
