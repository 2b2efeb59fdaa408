"""One torch.compile(fullgraph=True) forward+backward per family: no graph breaks, same numbers."""
import pytest
import torch

import pypeft_fast as pf


def calls():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    idx = torch.randperm(35 * 24, generator=g)[:50]
    idx = torch.stack([idx // 24, idx % 24])
    return {
        "lowrank": ((r(3, 24), r(35, 3)), lambda x, W, P: pf.lowrank_linear(x, W, None, *P, 0.5, 0.1, torch.tensor(7))),
        "kronecker": (((r(5, 2), r(2, 4)), r(7, 6)), lambda x, W, P: pf.kronecker_linear(x, W, None, *P, 0.5)),
        "phm": ((r(2, 5, 4), r(2, 7, 6)), lambda x, W, P: pf.phm_linear(x, W, None, *P, 0.5)),
        "sparse": ((r(50),), lambda x, W, P: pf.sparse_linear(x, W, None, P[0], idx, 0.5)),
    }


def _flat(P):
    return [t for p in P for t in (p if isinstance(p, tuple) else (p,))]


@pytest.mark.parametrize("family", ["lowrank", "kronecker", "phm", "sparse"])
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
