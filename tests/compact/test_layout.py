"""fastmdl.compact: the pruned network in the compact layout computes what its
union layout and the masked model compute, on every kind of batch."""

import copy

import pytest
import torch

import fastmdl
from fastmdl.compact import PACK_LIMIT, Segments, Support, plan as plan_module
from fastmdl.compact.padded import PaddedPlan
from fastmdl.compact.support import reindex
from models import CatNet, OddNet, SEBlockNet, TinyResNet, TinyVGG
from problems import require_backend
from test_prune import trained

MODELS = {"resnet": TinyResNet, "vgg": TinyVGG, "cat": CatNet, "se": SEBlockNet, "odd": OddNet}
TOL = dict(rtol=1e-5, atol=1e-5)


def _both(p, x, domain, storage="auto"):
    """(compact, union) outputs of the pruned network ``p``."""
    with torch.no_grad():
        p.layout, p.storage = "compact", storage
        compact = p(x, domain)
        p.layout = "union"
        union = p(x, domain)
    p.layout, p.storage = "auto", "auto"
    return compact, union


def _same(a, b, **tol):
    """Equal to rounding, with the -inf padding of the logits in the same places."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), **(tol or TOL))


@pytest.mark.parametrize("storage", ["ragged", "padded"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fuse", [True, False])
def test_compact_equals_union_and_the_masked_model(name, fuse, storage):
    m = trained(MODELS[name])
    p = fastmdl.prune(m, fuse=fuse)
    assert p.compact_plan() is not None, p.compact_error
    g = torch.Generator().manual_seed(7)
    x = torch.randn(11, 3, 8, 8, generator=g)
    cases = {"mixed": torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 0]),
             "no_domain_1": torch.tensor([0, 2, 2, 0, 0, 2, 2, 0, 0, 0, 2]),
             "one_domain_tensor": torch.full((11,), 1),
             "int": 2}
    for case, domain in cases.items():
        compact, union = _both(p, x, domain, storage)
        _same(compact, union)
        with torch.no_grad():
            _same(compact, m(x, domain))
    compact, union = _both(p, x[:1], torch.tensor([1]), storage)  # a batch of one
    _same(compact, union)


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_storage_on_the_triton_kernel_with_aligned_slots(name):
    """What a GPU runs (channel slots rounded to 16, one Triton launch per
    convolution), here under Triton's interpreter."""
    require_backend("triton")
    p = fastmdl.prune(trained(MODELS[name]))
    padded = PaddedPlan(p.compact_plan(), backend="triton", align=16)
    x = torch.randn(7, 3, 8, 8)
    domain = torch.tensor([2, 0, 2, 1, 0, 0, 2])
    with torch.no_grad():
        got = padded(x, domain)
    _same(got, _both(p, x, domain)[1])


def test_compile_fullgraph_runs_the_padded_storage():
    p = fastmdl.prune(trained(OddNet))  # a union island inside the graph too
    x = torch.randn(6, 3, 8, 8)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        want = p(x, torch.tensor([0, 1, 2, 0, 1, 2]))
        got = torch.compile(p, fullgraph=True, backend=record)(x, torch.tensor([0, 1, 2, 0, 1, 2]))
        _same(got, want)
        assert graphs and "segment_conv2d" in graphs[-1] and "domain_conv2d" not in graphs[-1]
        torch._dynamo.reset()
        compiled = torch.compile(p, fullgraph=True)  # inductor
        for domain in (torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 2, 2, 2, 2])):
            _same(compiled(x, domain), p(x, domain))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_any_input_memory_layout(layout):
    p = fastmdl.prune(trained(TinyResNet))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 8, 8, generator=g)
    if layout == "channels_last":
        xin = x.to(memory_format=torch.channels_last)
    else:
        xin = torch.randn(6, 3, 8, 16, generator=g)
        xin[..., ::2] = x
        xin = xin[..., ::2]
    domain = torch.tensor([2, 0, 1, 0, 2, 2])
    compact, _ = _both(p, xin, domain)
    _, union = _both(p, x, domain)
    _same(compact, union)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    m = trained(SEBlockNet)
    p = fastmdl.prune(m).to(dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, 8, 8, generator=g, dtype=dtype)
    domain = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    compact, union = _both(p, x, domain)
    assert compact.dtype == dtype
    tol = TOL if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
    _same(compact.float(), union.float(), **tol)


def test_ops_outside_the_analysis_run_as_counted_union_islands():
    p = fastmdl.prune(trained(OddNet))
    plan = p.compact_plan()
    assert [name for name, _ in plan.islands] == ["roll"]
    assert "roll" in plan.summary() or "1 union island" in plan.summary()


def test_inference_runs_compact_and_training_runs_union():
    p = fastmdl.prune(trained(TinyResNet))
    x = torch.randn(5, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 1, 0])
    calls = []
    original = plan_module.CompactPlan.__call__

    def spy(self, *a):
        calls.append(1)
        return original(self, *a)

    plan_module.CompactPlan.__call__ = spy
    try:
        with torch.no_grad():
            p(x, domain)
        assert len(calls) == 1
        with torch.inference_mode():
            p(x, domain)
        assert len(calls) == 2
        out = p(x, domain)  # gradients wanted: the union graph (autograd through the op)
        assert len(calls) == 2 and out.requires_grad
        p.train()
        with torch.no_grad():
            p(x, domain)
        assert len(calls) == 2
        p.eval()
        p.layout = "compact"
        with pytest.raises(RuntimeError, match="gradients"):
            p(x, domain)
    finally:
        plan_module.CompactPlan.__call__ = original


def test_layout_is_validated():
    p = fastmdl.prune(trained(CatNet))
    for bad in ("fast", None, 1):
        with pytest.raises(ValueError, match="layout"):
            p.layout = bad


def test_the_plan_is_repacked_after_weights_change():
    m = trained(TinyResNet)
    p = fastmdl.prune(m)
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 2, 1, 0])
    first = p.compact_plan()
    assert p.compact_plan() is first  # nothing changed: the same packing
    with torch.no_grad():
        for prm in p.parameters():  # an optimizer step: in place
            prm.mul_(1.1)
    assert p.compact_plan() is not first
    compact, union = _both(p, x, domain)
    _same(compact, union)
    p.load_state_dict(fastmdl.prune(m).state_dict())
    compact, union = _both(p, x, domain)
    _same(compact, union)
    with torch.no_grad():
        _same(compact, m(x, domain))
    p.double()
    compact, union = _both(p, x.double(), domain)
    _same(compact, union)


def test_a_copy_packs_its_own_weights():
    p = fastmdl.prune(trained(CatNet))
    p.compact_plan()
    q = copy.deepcopy(p)
    assert q._plan_cache.plan is None
    with torch.no_grad():
        for prm in q.parameters():
            prm.add_(0.1)
    x = torch.randn(4, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 0])
    compact, union = _both(q, x, domain)
    _same(compact, union)
    assert not torch.allclose(compact.nan_to_num(0, 0, 0), _both(p, x, domain)[0].nan_to_num(0, 0, 0))


def test_save_and_load_run_compact(tmp_path):
    p = fastmdl.prune(trained(TinyVGG))
    fastmdl.save(p, tmp_path / "m.fmdl")
    q = fastmdl.load(tmp_path / "m.fmdl")
    assert q._plan_cache.plan is not None  # packed at load
    x = torch.randn(5, 3, 8, 8)
    domain = torch.tensor([2, 2, 0, 1, 0])
    _same(_both(q, x, domain)[0], _both(p, x, domain)[1])


def test_a_linear_layer_too_large_to_pack_reads_scattered_features(monkeypatch):
    m = trained(TinyVGG)
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 2, 1, 0])
    packed = fastmdl.prune(m)
    monkeypatch.setattr(plan_module, "PACK_LIMIT", 0.0)
    gathered = fastmdl.prune(m)
    linears = [s for s in gathered.compact_plan().steps if s.label == "linear"]
    assert any(all(w is None for w in s.weights) for s in linears)
    assert PACK_LIMIT > 0
    _same(_both(gathered, x, domain)[0], _both(packed, x, domain)[1])


def test_a_domain_that_keeps_no_filter_of_a_group():
    m = trained(TinyResNet)
    m.mask_groups()[1].scores.data[0] = -1.0  # domain 0: nothing in the second group
    p = fastmdl.prune(m)
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 0, 0, 1])
    compact, union = _both(p, x, domain)
    _same(compact, union)


def test_segments_group_and_restore_the_batch():
    domain = torch.tensor([2, 0, 2, 1, 0, 2])
    seg = Segments.of(domain, 6, 4, torch.device("cpu"))
    assert seg.counts == [2, 1, 3, 0] and seg.live == [0, 1, 2]
    x = torch.randn(6, 5)
    parts = seg.split(x)
    assert parts[3] is None
    for d in range(3):
        torch.testing.assert_close(parts[d], x[domain == d], rtol=0, atol=0)
    assert torch.equal(seg.join(parts, x), x)
    one = Segments.of(3, 4, 4, torch.device("cpu"))
    assert one.order is None and one.live == [3] and one.counts == [0, 0, 0, 4]


def test_reindex_moves_a_compact_form_between_supports():
    a = Support(5, torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.bool))
    b = Support(5, torch.tensor([[1, 1, 0, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.bool))
    moves = reindex(a, b)
    assert moves[1] is None
    x = torch.randn(2, 3, 4)  # domain 0 holds channels 0, 2, 3
    y = moves[0](x)  # it should hold 0, 1, 3: channel 1 is a zero, channel 2 is dropped
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(y[:, 2], x[:, 2])
    assert torch.equal(y[:, 1], torch.zeros(2, 4))


@pytest.mark.parametrize("storage", ["ragged", "padded"])
def test_bad_domain_ids_are_refused_in_the_compact_layout(storage):
    p = fastmdl.prune(trained(TinyResNet))
    p.storage = storage
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        for bad, shown in ((torch.tensor([0, 7, 1]), "7"), (torch.tensor([0, -1, 2]), "-1"),
                           (3, "3")):
            with pytest.raises(ValueError, match=f"domain.* {shown} is out of range"):
                p(x, bad)
        with pytest.raises(TypeError, match="int64"):
            p(x, torch.tensor([0, 1, 2], dtype=torch.int32))
        with pytest.raises(ValueError, match="shape"):
            p(x, torch.tensor([0, 1]))


def test_rows_run_side_by_side_give_what_one_thread_gives(monkeypatch):
    """The ragged storage cuts a batch's rows into runs of equal work for worker
    threads (one per intra-op thread): the result is the sequential one, and the
    caller's no-grad / inference mode reaches the workers."""
    from fastmdl.compact import parallel

    monkeypatch.setattr(parallel, "MIN_PARALLEL_MACS", 0)  # these networks are tiny
    p = fastmdl.prune(trained(OddNet))  # an island: two per-domain phases around it
    plan = p.compact_plan()
    x = torch.randn(9, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            plan.parallel = False
            sequential = plan(x, domain)
            plan.parallel = True
            side_by_side = plan(x, domain)
        with torch.inference_mode():
            inference = plan(x, domain)
    finally:
        torch.set_num_threads(threads)
    _same(side_by_side, sequential, rtol=1e-6, atol=1e-6)
    _same(inference, sequential, rtol=1e-6, atol=1e-6)
    assert not side_by_side.requires_grad and inference.is_inference()
    from fastmdl.compact import parallel
    whole = [(a, b) for a, b, how in parallel.phases(plan.steps, plan.kinds, plan._drop)
             if how == parallel.WHOLE]
    assert whole == [(i, i + 1) for i, s in enumerate(plan.steps)
                     if s.label in ("input", "union island", "output")]
    seg = Segments.of(torch.tensor([0] * 6 + [1] * 2 + [2] * 3), 11, 3, torch.device("cpu"))
    # Rows of equal work: domain 0's six samples cost 1 each, the others 2.
    assert parallel.chunks(seg, [1.0, 2.0, 2.0], 2) == [[(0, 0, 6), (1, 0, 1)],
                                                        [(1, 1, 1), (2, 0, 3)]]
    assert parallel.chunks(seg, [1.0, 1.0, 1.0], 3) == [[(0, 0, 4)], [(0, 4, 2), (1, 0, 1)],
                                                        [(1, 1, 1), (2, 0, 3)]]


def test_the_domain_workers_leave_other_threads_thread_count_alone():
    import threading

    from fastmdl.compact import parallel

    parallel._POOLS.pop((3, 1), None)
    before = torch.get_num_threads()
    workers = parallel.pool(3, 1)
    assert sorted(workers.map(lambda _: torch.get_num_threads(), range(6))) == [1] * 6
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == before and seen == [before]


def test_pointwise_convolutions_choose_blas_or_onednn_by_shape():
    """The rule in steps.Conv._blas (measured in benchmarks/NOTES.md): BLAS for small
    products, oneDNN for large ones and for tall, narrow ones (8-15 filters over at
    most 16 channels and 2048 or more pixel rows); both give the same result."""
    from fastmdl.compact import steps as S

    p = fastmdl.prune(trained(TinyVGG))
    plan = p.compact_plan()
    conv = next(s for s in plan.steps if isinstance(s, S.Conv))
    conv.pointwise = True  # the rule only: which path a 1x1 call of these shapes takes

    def blas(rows_hw, cin, cout):
        x = torch.randn(2, cin, *rows_hw).contiguous(memory_format=torch.channels_last)
        return conv._blas(x, torch.randn(cout, cin, 1, 1))

    assert blas((8, 8), 16, 10)  # 128 rows: BLAS
    assert not blas((32, 32), 16, 10)  # 2048 rows, 10 filters over 16 channels: oneDNN
    assert blas((32, 32), 16, 4)  # 4 filters: BLAS was faster
    assert blas((32, 32), 32, 8)  # 32 channels in: BLAS
    assert blas((32, 32), 16, 16)  # 16 filters: BLAS
    assert not blas((64, 64), 256, 256)  # past the multiply-add bound: oneDNN
    assert not conv._blas(torch.randn(2, 16, 32, 32), torch.randn(10, 16, 1, 1))  # NCHW input


def test_narrow_pointwise_layers_on_onednn_equal_the_masked_model():
    """Fire's squeeze/expand layers at 64x64: several domains' calls take the
    oneDNN path of the rule above; the compact batch still equals the masked model."""
    import families
    from layouts import check_every_layout, per_domain_statistics
    from pruned_model import set_masks
    from fastmdl.compact import steps as S

    torch.manual_seed(0)
    model = fastmdl.convert(families.fire(), 3, [10, 4, 7], input_size=(3, 64, 64))
    set_masks(model, keep=0.5, shared=0.0, seed=0)
    per_domain_statistics(model, 64)
    pruned = fastmdl.prune(model)
    taken = []
    blas = S.Conv._blas

    def spy(self, x, w):
        chose = blas(self, x, w)
        if self.pointwise:
            taken.append((chose, w.shape[0], x.numel() // x.shape[1]))
        return chose

    S.Conv._blas = spy
    try:
        check_every_layout(pruned, model, "fire at 64x64", 64, **TOL)
    finally:
        S.Conv._blas = blas
    onednn = [(cout, rows) for chose, cout, rows in taken if not chose]
    assert onednn and all(8 <= cout < 16 and rows >= 2048 for cout, rows in onednn)
    assert any(chose for chose, _, _ in taken)
