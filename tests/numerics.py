"""Shared numerics for the family tests.

The tolerance rule is flash-attention's: a backend's error against the float64 reference must be
at most twice the error of plain PyTorch composition (the materialising reference run in the same
low precision) plus a small epsilon (a few ulps of the dtype at the reference's magnitude). It
adapts to the dtype without magic constants and cannot pass a wrong kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pypeft_fast import registry

# (activation/frozen-weight dtype, delta-parameter dtype). The last one is peft's default:
# adapters kept in float32 on a bfloat16 base model.
DTYPE_CASES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16+fp32-adapter": (torch.bfloat16, torch.float32),
}


def cpu_backends(family: str) -> list[str]:
    """Every backend that can run ``family`` on CPU here (torch always; cpp once the native
    extension is built; triton under TRITON_INTERPRET=1)."""
    cpu = torch.device("cpu")
    return [b for b in registry.BACKENDS if registry.why_unavailable(family, b, cpu) is None]


def routed(call, backend: str):
    """``call(backend)``; when the routing rule declines the call for the explicit ``backend``
    (pypeft_fast/registry.py: it raises naming the backend, the reason and the shapes — checked
    here), ``call("auto")``, which must serve it (tests/test_routing.py checks auto = torch)."""
    try:
        return call(backend)
    except RuntimeError as e:
        if f"backend '{backend}' cannot serve" not in str(e):
            raise
        assert "[x (" in str(e), f"the routing error names no shapes: {e}"
    return call("auto")


@dataclass
class Case:
    """One op call: ``op(backend, **tensors)`` and ``ref(**tensors)`` must agree.

    ``frozen`` tensors are cast to the activation dtype (x, weight, bias); ``params`` to the
    parameter dtype; ``grads`` names the tensors whose gradients are compared (x, bias, params).
    ``fixed`` are passed unchanged (indices, ...).
    """

    op: Callable
    ref: Callable
    frozen: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    grads: tuple[str, ...]
    fixed: dict = field(default_factory=dict)


def _leaves(case: Case, act_dtype, param_dtype, device=None):
    out = {}
    for k, v in case.frozen.items():
        out[k] = v.detach().to(device=device, dtype=act_dtype).requires_grad_(k in case.grads)
    for k, v in case.params.items():
        out[k] = v.detach().to(device=device, dtype=param_dtype).requires_grad_(k in case.grads)
    return out


def _run(fn, tensors, fixed, gy):
    """(y, grads), brought back to the CPU (where the references run)."""
    y = fn(**tensors, **fixed)
    y.backward(gy.to(y.device, y.dtype))
    return y.detach().cpu(), {k: tensors[k].grad.cpu() if tensors[k].grad is not None else None
                              for k in tensors if tensors[k].requires_grad}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within(name: str, got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, dtype):
    """``|got - ref| ≤ 2·|base - ref| + eps`` elementwise-max; the message says how many
    elements differ beyond the bound and where the worst one is."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert got.dtype == base.dtype, f"{name}: dtype {got.dtype}, expected {base.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    # A few ulps at the reference's magnitude. For outputs of a handful of elements (a scalar
    # Kronecker factor's gradient sums ~10⁶ products) the baseline's max error is a single
    # sample, not a statistic, so the epsilon there is 64 ulps.
    ulps = 4 if ref.numel() >= 16 else 64
    eps = ulps * torch.finfo(got.dtype).eps * max(scale, 1e-30)
    tol = 2 * max_err(base, ref) + eps
    diff = (got.double() - ref.double()).abs()
    bad = diff > tol
    if bad.any():
        worst = int(diff.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements beyond tol {tol:.3g} "
            f"(2×plain-PyTorch error {max_err(base, ref):.3g} + eps {eps:.3g}); worst at {idx}: "
            f"got {got.double().flatten()[worst].item():.6g}, reference {ref.flatten()[worst].item():.6g}"
        )


def check_case(case: Case, backend: str, dtype_case: str, seed: int = 0, device: str = "cpu") -> None:
    """Forward and every gradient of ``backend`` vs float64 with the tolerance rule. The op runs
    on ``device`` (tensors of ``fixed`` moved there too); both references run on the CPU."""
    act_dtype, param_dtype = DTYPE_CASES[dtype_case]
    g = torch.Generator().manual_seed(seed + 1234)
    probe = case.ref(**_leaves(case, torch.float64, torch.float64), **case.fixed)
    gy = torch.randn(probe.shape, generator=g, dtype=torch.float64)

    y64, g64 = _run(case.ref, _leaves(case, torch.float64, torch.float64), case.fixed, gy)
    yb, gb = _run(case.ref, _leaves(case, act_dtype, param_dtype), case.fixed, gy)
    op = lambda **kw: routed(lambda b: case.op(backend=b, **kw), backend)  # noqa: E731
    fixed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.fixed.items()}
    yo, go = _run(op, _leaves(case, act_dtype, param_dtype, device), fixed, gy)

    assert_within(f"[{backend}/{dtype_case}] y", yo, y64, yb, act_dtype)
    assert set(go) == set(g64), f"gradients for {sorted(go)}, expected {sorted(g64)}"
    for k in case.grads:
        assert go[k] is not None, f"[{backend}/{dtype_case}] no gradient reached {k}"
        assert_within(f"[{backend}/{dtype_case}] d{k}", go[k], g64[k], gb[k], gb[k].dtype)


def rand(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Fresh float64 normal values (never zeros) from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def declared_cases() -> dict[str, tuple[str, Callable[[], Case]]]:
    """``{variant: (registry family, case builder)}`` for every declared family
    (``registry.DECLARATIONS``): the ``CASES`` its own test module ``tests/test_<family>.py``
    exports — the family's test slice. The generic tests (autocast, the shared Function, CUDA)
    iterate these, so a new family's cases reach them without an edit there."""
    import importlib

    out: dict[str, tuple[str, Callable[[], Case]]] = {}
    for family in registry.DECLARATIONS:
        try:
            module = importlib.import_module(f"test_{family}")
        except ModuleNotFoundError:  # declared in process (a test's toy family): no test module
            continue
        for variant, build in getattr(module, "CASES", {}).items():
            out[variant] = (family, build)
    return out
