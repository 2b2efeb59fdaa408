"""pypeft_fast.measure, the one measurement module: exact bytes on hand-made tensors."""
import torch

from pypeft_fast.measure import LiveBytes, OpOutputs, SavedTensors, environment, saved_bytes, storage_parts


def test_live_bytes_counts_allocations_frees_and_resizes_exactly():
    w = torch.randn(10, 10)
    with LiveBytes(baseline=[w, w.t()]) as live:  # a view of w: one storage
        assert live.baseline == 400
        live.label = "a"
        a = torch.randn(1000)                 # +4000
        b = a * 2                             # +4000
        del a                                 # -4000
        live.label = "c"
        c = torch.empty(10)
        c.resize_(3000)                       # resized in place: counts its new size
        assert live.current == 400 + 4000 + 12000
        del b, c
    assert live.current == 400
    assert live.peak == 400 + 4000 + 12000 and live.peak_label == "c"


def test_saved_tensors_counts_each_storage_once_and_sparse_by_parts():
    x = torch.randn(6, 5, requires_grad=True)
    total, ptrs, _ = saved_bytes(lambda: (x * x).sum())  # mul saves x twice: one storage
    assert total == 120 and ptrs == {x.untyped_storage().data_ptr()}
    s = torch.randn(4, 3).to_sparse().requires_grad_(True)
    dense = torch.randn(3, 2, requires_grad=True)
    with SavedTensors(exclude=[dense]) as saved:
        torch.sparse.mm(s, dense).sum()
    assert saved.total_bytes == sum(n for _, n in storage_parts(s.detach()))


def test_op_outputs_tells_fresh_allocations_from_views_and_in_place():
    seen = []
    x = torch.randn(3, 4)
    with OpOutputs(lambda func, t, fresh: seen.append((str(func), fresh))):
        x.t()
        x.add_(1)
        x + 1
    assert seen == [("aten.t.default", False), ("aten.add_.Tensor", False), ("aten.add.Tensor", True)]


def test_environment_record():
    env = environment("cpu")
    assert env["device"].startswith("cpu: ") and env["torch"] == torch.__version__ and env["date"]


def test_saved_tensors_frees_the_graph_after_the_forward():
    """A saved output (exp saves its result) must not outlive its graph: a pack hook that returned
    the tensor itself tied the output to its own grad_fn (a C++ cycle gc cannot free), and the e2e
    bench, measuring 30 runs' forwards, ran out of memory."""
    import gc
    import weakref

    from pypeft_fast.measure import SavedTensors
    x = torch.randn(1000, requires_grad=True)
    with SavedTensors() as saved:
        y = x.exp()
    assert saved.total_bytes == 4000
    alive = weakref.ref(y)
    del y
    gc.collect()
    assert alive() is None, "the measured forward's output (and its graph) is still alive"
