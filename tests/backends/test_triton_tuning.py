"""The Triton backend's tuning machinery on the CPU (interpreter): the split-K path
against the reference, the configuration heuristics as plain functions, and the
batch plan that lets the layers of a forward pass share their metadata."""

import pytest
import torch

import fastmdl
from fastmdl.backends import triton as triton_backend
from fastmdl.ops import domain_conv2d

from problems import Case, check_close as _check_close, make, require_backend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

@pytest.fixture(autouse=True)
def triton_usable():
    require_backend("triton")


@pytest.fixture
def kernel_module():
    from fastmdl.kernels import domain_conv2d as module
    return module


def check_close(got, args):
    """No TF32 allowance: these tests hold every path to x's own dtype."""
    _check_close(got, args, tf32=False)


# Small shapes: every split multiplies the interpreter's programs.
SPLIT_CASES = [
    (Case("base", n=4, hw=(6, 6)), 3),
    (Case("domain_without_samples", n=4, hw=(6, 6), domains=[0, 2, 2, 0]), 2),
    (Case("batch_of_one", n=1, hw=(6, 6)), 4),
    (Case("channels_not_multiple_of_16", n=3, c_in=37, c_out=23, hw=(5, 5)), 3),
    (Case("one_input_channel_and_none", n=4, hw=(6, 6), in_sizes={0: 1, 2: 0}), 2),
    (Case("stride2", n=4, hw=(7, 7), stride=(2, 2)), 2),
    (Case("dilation2", n=3, hw=(6, 6), dilation=(2, 2), padding=(2, 2)), 3),
    (Case("kernel1x1_more_splits_than_steps", n=4, k=1, padding=(0, 0), hw=(5, 5)), 5),
    (Case("channels_last", n=4, hw=(6, 6), layout="channels_last"), 2),
    (Case("strided_input", n=4, hw=(6, 6), layout="strided"), 2),
    (Case("no_epilogue", n=4, hw=(6, 6), epilogue=False), 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case,split_k", SPLIT_CASES, ids=[c.name for c, _ in SPLIT_CASES])
def test_split_k_matches_reference(case, split_k, dtype, monkeypatch, poisoned_empty):
    monkeypatch.setenv("FASTMDL_TRITON_SPLIT_K", str(split_k))
    args = make(case, dtype, "cpu", seed=len(case.name))
    got = domain_conv2d(**args, backend="triton")
    check_close(got, args)
    want_format = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    assert got.is_contiguous(memory_format=want_format)


def test_split_k_equals_the_direct_path(kernel_module):
    args = make(Case("direct", n=3, hw=(5, 5)), torch.float32, "cpu", seed=2)
    op_args = [args[k] for k in ("x", "weight", "domain", "in_index", "in_offsets", "out_index",
                                 "out_offsets", "scale", "shift", "residual", "relu", "stride",
                                 "padding", "dilation")]
    direct = kernel_module.domain_conv2d(*op_args, split_k=1)
    split = kernel_module.domain_conv2d(*op_args, split_k=2)
    torch.testing.assert_close(split, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="split_k"):
        kernel_module.domain_conv2d(*op_args, split_k=0)


@pytest.mark.parametrize("blocks", [(32, 16, 16, 1, 1), (16, 32, 32, 1, 1)], ids=["bm32", "bn32"])
def test_other_tile_sizes_map_tiles_to_domains(blocks, kernel_module, monkeypatch, poisoned_empty):
    """The grid and each program's domain follow whatever BLOCK_M the autotuner picks."""
    monkeypatch.setattr(kernel_module, "INTERPRETER_BLOCKS", blocks)
    args = make(Case("tiles", n=5, d=4, hw=(5, 5), domains=[3, 0, 3, 3, 1]), torch.float32,
                "cpu", seed=4)
    check_close(domain_conv2d(**args, backend="triton"), args)


def test_forced_split_k_env(kernel_module, monkeypatch):
    monkeypatch.delenv("FASTMDL_TRITON_SPLIT_K", raising=False)
    assert kernel_module.forced_split_k() is None
    monkeypatch.setenv("FASTMDL_TRITON_SPLIT_K", "4")
    assert kernel_module.forced_split_k() == 4
    for bad in ("0", "two"):
        monkeypatch.setenv("FASTMDL_TRITON_SPLIT_K", bad)
        with pytest.raises(ValueError, match="FASTMDL_TRITON_SPLIT_K"):
            kernel_module.forced_split_k()


# --- the heuristics, as plain functions ------------------------------------------------

def test_estimate_is_per_domain_and_bucketed(kernel_module):
    # 64 samples of 14x14 over 8 domains, 48 of 96 filters and 40 of 64 channels each.
    est = kernel_module.estimate(64, 196, 8, 8 * 40, 8 * 48, 3, 3)
    assert est == {"M_EST": 2048, "N_EST": 64, "K_EST": 512}
    # A batch of 2 has at most 2 domains present, whatever D is.
    assert kernel_module.estimate(2, 49, 10, 10 * 16, 10 * 16, 1, 1)["M_EST"] == 64
    assert [kernel_module.bucket(v) for v in (0, 1, 1.5, 2, 33, 64)] == [1, 1, 2, 2, 64, 64]


def _blocks(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs}


def test_select_configs_prunes_by_the_per_domain_gemm(kernel_module):
    configs = kernel_module.tuning_configs()
    assert len(configs) == len(kernel_module.TUNING_SPACE)
    big = _blocks(kernel_module.select_configs(configs, 4096, 256, 1024, 1, 1, 1, 2))
    assert (128, 128, 64) in big and (64, 64, 128) in big

    small = kernel_module.select_configs(configs, 64, 16, 16 * 9, 3, 3, 1, 2)
    assert small and all(bm <= 64 and bn <= 32 and bk <= 32 for bm, bn, bk in _blocks(small))

    # float32 operands: the 128 x 128 x 64 tile's three stages do not fit in shared memory.
    fp32 = _blocks(kernel_module.select_configs(configs, 4096, 256, 1024, 1, 1, 1, 4))
    assert (128, 128, 64) not in fp32 and (128, 128, 32) in fp32

    # Split-K problems keep to the 64 x 64 reference tile the split was sized for.
    split = _blocks(kernel_module.select_configs(configs, 4096, 256, 4096, 3, 3, 4, 2))
    assert split and all(bm <= 64 and bn <= 64 for bm, bn, _ in split)

    # Never empty, even for a degenerate key.
    assert kernel_module.select_configs(configs, 1, 1, 1, 1, 1, 1, 4)


def test_autotuner_keys_and_pruning_hook(kernel_module):
    tuned = kernel_module.domain_conv2d_tuned
    assert tuned.keys == ["M_EST", "N_EST", "K_EST", "KH", "KW", "SPLIT_K"]
    x = torch.empty(1, dtype=torch.float16)
    kept = kernel_module._early_prune(tuned.configs, {"x_ptr": x},
                                      M_EST=64, N_EST=16, K_EST=144, KH=3, KW=3, SPLIT_K=1)
    assert kept == kernel_module.select_configs(tuned.configs, 64, 16, 144, 3, 3, 1, 2)


def test_choose_split_k(kernel_module):
    choose = kernel_module.choose_split_k
    # ResNet-50 stage 2 at batch 64, one domain: thousands of tiles, no split.
    assert choose(64, 56 * 56, 1, 64, 64, 3, 3, 64, 132) == 1
    # Last stage, batch 8 over 4 domains, 256 of 512 filters and channels each:
    # 4 domains x 2 row tiles x 4 column tiles = 32 tiles; 4 splits make 128 programs,
    # still short of 132 SMs, so 8 (each with 9 of the 72 steps).
    assert choose(8, 49, 4, 4 * 256, 4 * 256, 3, 3, 512, 132) == 8
    assert choose(8, 49, 4, 4 * 256, 4 * 256, 3, 3, 512, 128) == 4
    # More SMs, more splits, within MAX_SPLIT_K.
    assert choose(8, 49, 4, 4 * 256, 4 * 256, 3, 3, 512, 10_000) == kernel_module.MAX_SPLIT_K
    # A short reduction is not split: 1x1 over 64 channels is 2 steps of 32.
    assert choose(1, 49, 1, 64, 64, 1, 1, 64, 132) == 1
    # Domains with no channels or no filters on average: nothing to split.
    assert choose(4, 49, 4, 0, 64, 3, 3, 64, 132) == 1
    # The workspace bound wins over the SM count.
    assert choose(1, 4096, 1, 4096, 8, 3, 3, 8192, 132) == 2  # 2 x 128 MiB
    assert choose(1, 4096, 1, 4096, 8, 3, 3, 16384, 132) == 1  # 2 x 256 MiB


def test_num_sms_falls_back_off_cuda(kernel_module):
    assert kernel_module.num_sms(torch.device("cpu")) == kernel_module.DEFAULT_NUM_SMS


# --- the shared batch plan ---------------------------------------------------------------

def _layer(seed, c_in=10, c_out=12, d=3, **kw):
    """One layer's arguments for a batch of 4 samples with domains [2, 0, 2, 1]."""
    case = Case(f"layer{seed}", n=4, d=d, c_in=c_in, c_out=c_out, hw=(5, 5),
                domains=[2, 0, 2, 1], **kw)
    return make(case, torch.float32, "cpu", seed=seed)


def test_layers_in_a_scope_share_one_grouping():
    a, b = _layer(1), _layer(2, c_in=12, c_out=7, k=1, padding=(0, 0))
    domain = a["domain"]
    assert triton_backend.current_batch_plan() is None
    with triton_backend.shared_batch_plan() as plan:
        assert triton_backend.current_batch_plan() is plan
        ya = domain_conv2d(**a, backend="triton")
        yb = domain_conv2d(**dict(b, domain=domain), backend="triton")
        ya_again = domain_conv2d(**a, backend="triton")
    assert triton_backend.current_batch_plan() is None
    assert plan.builds["grouping"] == 1
    assert plan.builds["columns"] == 2  # one per layer; the repeated layer reuses its own
    check_close(ya, a)
    check_close(yb, dict(b, domain=domain))
    torch.testing.assert_close(ya_again, ya, rtol=0, atol=0)


def test_in_place_change_of_domain_rebuilds():
    a = _layer(3)
    domain = a["domain"]
    with triton_backend.shared_batch_plan() as plan:
        domain_conv2d(**a, backend="triton")
        domain[0] = 0  # version bump: the cached grouping is stale
        got = domain_conv2d(**a, backend="triton")
    assert plan.builds["grouping"] == 2
    check_close(got, a)


def test_new_domain_tensor_gets_new_metadata():
    a = _layer(4)
    with triton_backend.shared_batch_plan() as plan:
        domain_conv2d(**a, backend="triton")
        other = torch.tensor([1, 1, 0, 2])
        got = domain_conv2d(**dict(a, domain=other), backend="triton")
    assert plan.builds["grouping"] == 2
    check_close(got, dict(a, domain=other))


def test_scopes_do_not_leak_entries():
    a = _layer(5)
    with triton_backend.shared_batch_plan() as outer:
        domain_conv2d(**a, backend="triton")
        with triton_backend.shared_batch_plan() as inner:
            domain_conv2d(**a, backend="triton")
        assert triton_backend.current_batch_plan() is outer
    assert outer.builds["grouping"] == 1 and inner.builds["grouping"] == 1


def test_plan_checks_identity_and_inference_tensors():
    plan = triton_backend.BatchPlan()
    t = torch.arange(4)
    assert plan.lookup((t,), ("k",), lambda: "first") == "first"
    assert plan.lookup((t,), ("k",), lambda: "second") == "first"
    # An entry under another tensor's id and version (as if the id had been
    # recycled): the stored reference does not match, so it is rebuilt.
    u = torch.arange(4)
    plan._entries[((id(u), u._version, u.device), "k")] = ((t,), "stale")
    assert plan.lookup((u,), ("k",), lambda: "fresh") == "fresh"
    with torch.inference_mode():
        v = torch.arange(4)
        assert plan.lookup((v,), ("k",), lambda: "inference") == "inference"
        assert plan.lookup((v,), ("k",), lambda: "again") == "inference"
    assert plan.builds["k"] == 3


def test_pruned_model_groups_the_batch_once_per_forward(monkeypatch, kernel_module):
    from models import TinyResNet

    torch.manual_seed(0)
    m = fastmdl.convert(TinyResNet(), 3, [5, 2, 7], input_size=(3, 8, 8)).eval()
    p = fastmdl.prune(m)
    x = torch.randn(4, 3, 8, 8)
    domain = torch.tensor([0, 2, 2, 1])
    with torch.no_grad():
        want = p(x, domain)
        p.backend = "triton"
        p.layout = "union"  # the union op's shared batch plan
        builds = []
        real = kernel_module.batch_grouping
        monkeypatch.setattr(kernel_module, "batch_grouping",
                            lambda *a: builds.append(1) or real(*a))
        got = p(x, domain)
    n_convs = sum(isinstance(mod, fastmdl.pruned.PrunedConv2d) for mod in p.modules())
    assert n_convs > 2 and len(builds) == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
