"""One torch.compile(fullgraph=True) forward+backward per family: no graph breaks, same numbers."""
import pytest
import torch

import pypeft_fast as pf


def calls():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    idx = torch.randperm(35 * 24, generator=g)[:50]
    idx = torch.stack([idx // 24, idx % 24])
    m = r(35).abs() + 0.5
    m[[0, 4]] = 0.0  # DoRA: a magnitude entry exactly 0 takes the recomputed-z branch of dm
    dora = lambda p: lambda x, W, P: pf.lowrank_linear(  # noqa: E731
        x, W, None, *P[:2], 0.5, p, torch.tensor(7), magnitude=P[2])
    return {
        "lowrank": ((r(3, 24), r(35, 3)), lambda x, W, P: pf.lowrank_linear(x, W, None, *P, 0.5, 0.1, torch.tensor(7))),
        "dora": ((r(3, 24), r(35, 3), m), dora(0.0)),
        "dora-dropout": ((r(3, 24), r(35, 3), m + 1.0), dora(0.1)),
        "hadamard": ((r(35, 2), r(2, 24), r(35, 2), r(2, 24)),
                     lambda x, W, P: pf.hadamard_linear(x, W, None, *P, 0.5)),
        "kronecker": (((r(5, 2), r(2, 4)), r(7, 6)), lambda x, W, P: pf.kronecker_linear(x, W, None, *P, 0.5)),
        "phm": ((r(2, 5, 4), r(2, 7, 6)), lambda x, W, P: pf.phm_linear(x, W, None, *P, 0.5)),
        "sparse": ((r(50),), lambda x, W, P: pf.sparse_linear(x, W, None, P[0], idx, 0.5)),
    }


def _flat(P):
    return [t for p in P for t in (p if isinstance(p, tuple) else (p,))]


@pytest.mark.parametrize("family", ["lowrank", "dora", "dora-dropout",
                                    "hadamard", "kronecker", "phm", "sparse"])
def test_compile_fullgraph_forward_backward(family):
    torch._dynamo.reset()
    P, call = calls()[family]
    W = torch.randn(35, 24)
    x = torch.randn(3, 5, 24)

    def run(fn):
        xs = x.clone().requires_grad_(True)
        leaves = [t.clone().requires_grad_(True) for t in _flat(P)]
        it = iter(leaves)
        Ps = tuple(tuple(next(it) for _ in p) if isinstance(p, tuple) else next(it) for p in P)
        y = fn(xs, W, Ps)
        y.square().sum().backward()
        return [y.detach(), xs.grad] + [t.grad for t in leaves]

    eager = run(call)
    compiled = run(torch.compile(call, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- models under the default (inductor) backend

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, LoraConfig, ShiraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from pypeft_fast.inject import delta_modules  # noqa: E402


class MLP(nn.Module):
    """Tiny: two layers for peft (the first one's input needs no gradient, as after a frozen
    embedding), seven for the injected model (one family or variant each)."""

    def __init__(self, n=2):
        super().__init__()
        dims = [24, 40, 32, 48, 20, 28, 36, 18][: n + 1]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.tanh(x))
        return x


class Block(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


PEFT_CONFIGS = {
    "lora-dropout": lambda: LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1, target_modules=["0", "1"],
                                       init_lora_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=4, target_modules=["0", "1"], init_weights=False),
    "shira": lambda: ShiraConfig(r=2, target_modules=["0", "1"], init_weights=False),
    "dora": lambda: LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["0", "1"],
                               init_lora_weights=False),
    # auto on CPU: the cpp backend's dropped-set identity (NativeDoRA), its CSR of the dropped x
    "dora-dropout": lambda: LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1, use_dora=True,
                                       target_modules=["0", "1"], init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=2, alpha=4, target_modules=["0", "1"], init_weights=False),
}


def _step(model, x):
    """Forward + backward from a fixed generator state (the dropout seeds come from it)."""
    torch.manual_seed(123)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    return [y.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _graph_breaks(model, x) -> int:
    """Graph breaks dynamo records compiling one forward+backward of ``model``."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _step(torch.compile(model, backend="eager"), x)
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@pytest.mark.parametrize("method", sorted(PEFT_CONFIGS))
def test_patched_peft_model_compiles_with_inductor(method):
    """Default inductor backend, training mode (LoRA dropout > 0: the crash of issue 9 was the
    first layer's dA-only dropout backward); compiled == eager; no graph break of ours."""
    torch.manual_seed(0)
    model = get_peft_model(MLP(), PEFT_CONFIGS[method]())
    model.train()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    unpatched_breaks = _graph_breaks(model, x)
    report = pf.patch(model)
    assert _graph_breaks(model, x) <= unpatched_breaks
    eager = _step(model, x)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # seeds drawn as in eager
        compiled = _step(torch.compile(model), x)
    assert len(compiled) == len(eager) > 1
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert sum(sum(e.fallback_calls.values()) for e in report.entries) == 0, str(report)


def test_injected_model_of_every_family_compiles_fullgraph_with_inductor():
    """One model, one layer per family or variant (inject takes one adapter per module tree, so
    each layer is injected through its own container); dropout on; fullgraph. DoRA at p > 0 runs
    the torch kernels' 'saved' source under compile (NativeDoRA's dropped-set path is eager-only)."""
    torch.manual_seed(0)
    cfgs = (dict(family="lowrank", r=3, dropout=0.1), dict(family="kronecker"),
            dict(family="phm", n=4), dict(family="sparse", density=0.1),
            dict(family="lowrank", r=3, magnitude=True), dict(family="lowrank", r=3, magnitude=True, dropout=0.1),
            dict(family="hadamard", r=2, alpha=4.0))
    model = MLP(len(cfgs))
    model.layers = nn.ModuleList(Block(layer) for layer in model.layers)
    for block, cfg in zip(model.layers, cfgs, strict=True):
        pf.inject(block, pf.DeltaConfig(target_modules=["lin"], **cfg))
    assert len(delta_modules(model)) == len(cfgs)
    with torch.no_grad():  # the zero-initialised factors get values: every gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    model.train()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    eager = _step(model, x)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = _step(torch.compile(model, fullgraph=True), x)
    assert len(compiled) == len(eager) > len(cfgs)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
