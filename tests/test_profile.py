"""The memory profiler (pypeft_fast/profile): attribution by module and cause on a hand-built model
whose saved tensors are known exactly, the compare figures against an independent
saved_tensors_hooks measurement (pypeft_fast.measure, also the bench's), the projection against
a measured run at twice the size, and the CLI's bad-input errors."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import pypeft_fast as pf
from pypeft_fast.measure import saved_activation_bytes
from pypeft_fast.profile import causes
from pypeft_fast.profile.attribution import OUTSIDE
from pypeft_fast.profile.cli import main
from pypeft_fast.profile.projection import project
from pypeft_fast.profile.report import Comparison

N, IN, HID, OUT, R = 7, 12, 20, 24, 2
F32, F64 = 4, 8


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(IN))

    def forward(self, x):
        return x * self.p            # keeps x (the batch tensor: a step input)


class Cast(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Parameter(torch.randn(HID, dtype=torch.float64))

    def forward(self, h):
        return (h.double() * self.q).float()   # keeps the float64 copy of h


class DropMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)
        self.r = nn.Parameter(torch.randn(HID))

    def forward(self, h):
        return self.dropout(h) * self.r        # nn.Dropout keeps its noise; "* r" keeps dropout(h)


class Materialise(nn.Module):
    """ΔW = B·A built every call (the naive LoKr/LoHa way): keeps a weight-sized tensor."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(OUT, 16), requires_grad=False)
        self.A = nn.Parameter(torch.randn(R, 16))
        self.B = nn.Parameter(torch.randn(OUT, R))

    def forward(self, h):
        return F.linear(h, self.weight + self.B @ self.A)


class HandBuilt(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale, self.act, self.lin = Scale(), nn.Tanh(), nn.Linear(IN, HID, bias=False)
        self.cast, self.drop = Cast(), DropMul()
        self.proj = nn.Linear(HID, 16)          # injected: pf lowrank r=3
        self.mat = Materialise()

    def forward(self, x):
        h = self.act(self.scale(x)) * 2.0       # tanh keeps its output; "* 2" (this module) keeps nothing
        return self.mat(self.proj(self.drop(self.cast(self.lin(h)))))


def hand_built():
    torch.manual_seed(0)
    model = pf.inject(HandBuilt(), pf.DeltaConfig(family="lowrank", target_modules=["proj"], r=3))
    for n, p in model.named_parameters():
        if n.split(".")[0] in ("scale", "lin", "cast", "drop") or n in ("mat.A", "mat.B"):
            p.requires_grad_(True)
    return model


def test_attribution_of_a_hand_built_model_is_exact():
    model = hand_built()
    x = torch.randn(N, IN)
    rep = pf.profile_memory(model, (x,))
    got = {(m.name, c): n for m in rep.modules.values() for c, n in m.saved.items()}
    expected = {
        ("scale", causes.STEP_INPUT): N * IN * F32,        # x, kept by x * p for p's gradient
        ("act", causes.ACTIVATION): N * IN * F32,          # tanh's output
        ("lin", causes.INPUT): N * IN * F32,               # h = 2·tanh(.), made by the model's forward
        ("cast", causes.CAST): N * HID * F64,              # h.double()
        ("drop.dropout", causes.DROPOUT): N * HID * F32,   # the dropout noise (a mask), kept by nn.Dropout
        ("drop", causes.INPUT): N * HID * F32,             # dropout(h): made by another unit (h is not kept,
                                                           # so it is no extra copy; peft's lora_dropout is
                                                           # folded into its layer and is one)
        ("proj", causes.INPUT): N * HID * F32,             # pf lowrank keeps x itself ...
        ("proj", causes.ADAPTER): N * 3 * F32,             # ... and u = x·Aᵀ (n × r, float32)
        ("mat", causes.WEIGHT_SIZED): OUT * 16 * F32,      # W + B·A
        ("mat", causes.INPUT): N * 16 * F32,               # proj's output
        (OUTSIDE, causes.INPUT): N * OUT * F32,            # the default loss (square) keeps the output
    }
    assert got == expected
    assert rep.saved == sum(expected.values())
    # the frozen/trainable weights kept for input gradients are references, not activations
    assert rep.modules["lin"].weight_refs == IN * HID * F32 and rep.weight_ref_bytes > 0
    # parameters, gradients and AdamW state (exp_avg, exp_avg_sq, a 4-byte step) per module
    lin = rep.modules["lin"]
    assert (lin.params, lin.trainable, lin.grads, lin.optimizer) == (IN * HID * F32,) * 3 + (2 * IN * HID * F32 + 4,)
    mat = rep.modules["mat"]
    assert mat.params == (OUT * 16 + R * 16 + OUT * R) * F32 and mat.grads == (R * 16 + OUT * R) * F32
    assert rep.modules["proj"].grads == (3 * HID + 16 * 3) * F32  # A (3, 20), B (16, 3); frozen W, bias
    # PyTorch's MemTracker on the same step agrees with the saved total (up to the 4-byte loss)
    assert abs(rep.crosscheck.memtracker_activations - rep.crosscheck.saved_made_in_forward) <= 16
    assert rep.peak_bytes >= rep.static_bytes + rep.saved
    json.dumps(rep.to_dict(storages=True), default=str)


def _tiny_llama(layers=2, dropout=0.1, patch=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=112, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=128, use_cache=False)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformers.LlamaForCausalLM(cfg),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    if patch:
        pf.patch(model, strict=True)
    return model


def _batch(b, s):
    ids = torch.randint(0, 97, (b, s), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def test_compare_figures_match_an_independent_saved_tensors_measurement():
    peft_model = _tiny_llama()
    fast = copy.deepcopy(peft_model)
    pf.patch(fast, strict=True)
    batch = _batch(2, 13)
    cmp = Comparison(pf.profile_memory(peft_model, batch, label="peft"),
                     pf.profile_memory(fast, batch, label="pf.patch"))
    indep = {name: saved_activation_bytes(m, batch) for name, m in (("peft", peft_model), ("patched", fast))}
    for rep, (total, nonparam) in ((cmp.baseline, indep["peft"]), (cmp.fast, indep["patched"])):
        assert rep.saved == nonparam                      # every storage once, parameters apart
        assert rep.saved + rep.weight_ref_bytes == total
        assert abs(rep.crosscheck.difference_pct) < 1.0   # MemTracker on the same step
    saving, pct = cmp.saved_saving()
    assert saving == indep["peft"][1] - indep["patched"][1] > 0
    assert pct == pytest.approx(100 * saving / indep["peft"][1])
    # peft keeps dropout(x) and its mask per adapted layer; pypeft_fast keeps neither
    assert cmp.baseline.by_cause()[causes.DROPOUT] > 0 and causes.DROPOUT not in cmp.fast.by_cause()
    assert cmp.peak_saving() > 0
    assert "patching saves" in cmp.sentence() and "measured" in cmp.sentence()
    kinds = cmp.baseline.by_kind()
    assert kinds["model.layers.*.self_attn.v_proj"].saved[causes.DROPOUT] > 0
    assert set(cmp.baseline.by_layer()) == {"model.layers.0", "model.layers.1", "(other)"}


@pytest.mark.parametrize("patch", [False, True], ids=["peft", "patched"])
def test_projection_matches_a_measured_run_at_twice_the_size(patch):
    small = pf.profile_memory(_tiny_llama(2, patch=patch), _batch(2, 19), crosscheck=False)
    big = pf.profile_memory(_tiny_llama(4, patch=patch), _batch(4, 38), crosscheck=False)
    proj = project(small, layers=4, batch=4, seq=38)
    assert proj.projected and "PROJECTED" in proj.table()
    for what in ("params", "grads", "optimizer"):
        assert getattr(proj, what) == getattr(big, what), what
    for what in ("saved", "peak_bytes"):
        assert getattr(proj, what) == pytest.approx(getattr(big, what), rel=0.05), what
    for cause, n in big.by_cause().items():
        assert proj.by_cause().get(cause, 0) == pytest.approx(n, rel=0.05), cause


def test_projection_refuses_a_sequence_length_equal_to_a_model_dimension():
    rep = pf.profile_memory(_tiny_llama(1, dropout=0.0), _batch(1, 48), crosscheck=False)  # 48 = hidden
    with pytest.raises(ValueError, match="seq = 48 is also a Parameter dimension"):
        project(rep, seq=96)


def _tiny_model_dir(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=61)
    cfg.save_pretrained(tmp_path)
    return str(tmp_path)


def test_cli_compare_on_a_model_directory_writes_json_plot_markdown(tmp_path, capsys):
    d = _tiny_model_dir(tmp_path / "model")
    out = tmp_path / "r"
    rc = main(["--model", d, "--method", "lowrank", "--r", "2", "--dropout", "0.1", "--compare",
               "--batch", "2", "--seq", "9", "--quiet", "--json", f"{out}.json", "--plot", f"{out}.png",
               "--markdown", f"{out}.md", "--project-layers", "3", "--project-seq", "18"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "pypeft_fast saves" in text and "of saved activations" in text and "PROJECTED" in text
    res = json.loads(open(f"{out}.json").read())
    assert res["baseline"]["label"] == "peft lora" and res["fast"]["label"] == "pf.inject lowrank"
    assert res["saved_saving_bytes"] > 0 and res["fast"]["projected"]
    assert open(f"{out}.png", "rb").read(4) == b"\x89PNG"
    assert "pypeft_fast saves" in open(f"{out}.md").read()


@pytest.mark.parametrize("argv, message", [
    (["--preset", "gpt-9"], "unknown preset 'gpt-9'"),
    (["--model", "{tmp}"], "no config.json"),
    (["--method", "shira", "--dropout", "0.1"], "--dropout is not an option of shira"),
    (["--method", "kronecker", "--dropout", "0.1"], "--dropout is not an option of kronecker"),
    (["--method", "bitfit"], "unknown method 'bitfit'"),
    (["--preset", "llama-3-8b", "--layers", "400", "--dtype", "float32"], "B parameters"),
    (["--method", "phm", "--compare"], "phm has no peft counterpart"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "phm" in argv:  # a tiny model so that only the comparison is refused
        argv += ["--model", _tiny_model_dir(tmp_path / "m"), "--batch", "1", "--seq", "5"]
    rc = main(argv + ["--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
