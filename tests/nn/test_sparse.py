"""Sparse inference: the sparse kernels vs F.conv2d / F.linear, sparsify on whole models, save/load."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastprune
from fastprune.models import get_model
from fastprune.nn import SparseConv2d, SparseLinear, fold_masks, load_sparse, prune_model, save_sparse, sparsify
from fastprune.ops.sparse import (_CONV_SPEC, _LINEAR_SPEC, is_batch_innermost, sparse_conv2d, sparse_linear,
                                  to_batch_innermost)
from fastprune.reference.sparse import csr_to_dense, dense_to_csr

from ..conftest import GPU, backend_device_pairs

# (N, C, H, W, OC, k, stride, padding, sparsity): 1x1 and 3x3, strides 1 and 2, paddings 0-2,
# batch 1 and more, an all-zero layer (1.0) and a fully dense one (0.0), odd sizes.
CONV_CASES = [
    (1, 3, 8, 8, 4, 3, 1, 1, 0.9),
    (2, 5, 9, 7, 6, 3, 1, 1, 0.5),
    (3, 4, 8, 8, 6, 3, 2, 1, 0.7),
    (2, 6, 7, 7, 5, 1, 2, 0, 0.3),
    (2, 3, 5, 5, 4, 3, 1, 2, 0.0),
    (2, 3, 5, 5, 4, 3, 1, 0, 1.0),
    (4, 16, 4, 4, 8, 3, 1, 1, 0.95),
    (1, 2, 33, 31, 3, 3, 2, 1, 0.6),
    (2, 8, 6, 6, 7, 1, 1, 0, 0.8),
    (2, 3, 17, 20, 5, 3, 1, 1, 0.8),  # wide enough for the direct algorithm
    (1, 2, 18, 16, 3, 3, 1, 2, 0.5),
    (2, 4, 16, 16, 3, 1, 1, 0, 0.5),
    (2, 3, 17, 18, 4, 3, 2, 1, 0.5),  # stride 2, odd height, on the direct algorithm too
    (1, 4, 16, 15, 3, 1, 2, 0, 0.4),
    (2, 20, 6, 6, 37, 3, 1, 1, 0.7),  # three tiles of 16 output channels (the last partial), long unions
    (1, 32, 4, 4, 20, 3, 1, 1, 0.97),  # a 4x4 map at batch 1: the GPU kernels' smallest block
]


def sparse_weight(shape, sparsity, seed, empty_row=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) >= sparsity)
    if empty_row and shape[0] > 1:
        w[1] = 0  # an output channel with no weights at all
    return w


@pytest.mark.parametrize("backend,device", backend_device_pairs(_CONV_SPEC))
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_sparse_conv_matches_conv2d(backend, device, case):
    n, c, h, w, oc, k, stride, pad, sparsity = case
    gen = torch.Generator().manual_seed(sum(case[:8]))
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    weight = sparse_weight((oc, c, k, k), sparsity, seed=n * 7 + c).to(device)
    bias = torch.randn(oc, generator=gen).to(device)
    row_ptr, col_idx, values = dense_to_csr(weight)
    assert torch.equal(csr_to_dense(row_ptr, col_idx, values, weight.shape), weight)
    want = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=pad)
    algos = [0, 1, 3] + ([2] if stride in (1, 2) else [])
    # every algorithm, on contiguous, channels_last and batch-innermost inputs
    for algo in algos:
        for xin in (x, x.contiguous(memory_format=torch.channels_last), to_batch_innermost(x)):
            if algo == 2 and not xin.is_contiguous():
                continue
            with fastprune.use_backend(backend):
                got = sparse_conv2d(xin, row_ptr, col_idx, values, bias, c, k, k, stride, stride, pad, pad, algo)
            assert got.shape == want.shape
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
            if backend == "cpp" and algo == 3:
                assert is_batch_innermost(got), "the batch-innermost algorithm writes its own layout"
    if backend == "triton":  # half precision inputs (the GPU path), float32 accumulation
        with fastprune.use_backend(backend):
            got = sparse_conv2d(x.half(), row_ptr, col_idx, values, bias, c, k, k, stride, stride, pad, pad)
        want = F.conv2d(x.half().double(), weight.double(), bias.double(), stride=stride, padding=pad)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.double(), want, atol=2e-3 * max(1.0, want.abs().max().item()), rtol=1e-3)


@pytest.mark.parametrize("rows,columns,sparsity", [(1, 1, 0.0), (16, 9, 0.5), (37, 180, 0.9), (20, 5, 1.0)])
def test_tiled_weight_round_trip(rows, columns, sparsity):
    from fastprune.reference.sparse import OC_TILE, TiledWeight

    weight = sparse_weight((rows, columns), sparsity, seed=rows + columns)
    bias = torch.randn(rows)
    tiled = TiledWeight(*dense_to_csr(weight), bias, columns)
    assert torch.equal(tiled.to_dense(), weight)
    assert torch.equal(tiled.bias[:rows], bias) and not tiled.bias[rows:].any()
    for t in range(tiled.tiles):  # each tile's columns: sorted, exactly the union of its rows' non-zeros
        cols = tiled.tile_cols[tiled.tile_ptr[t]:tiled.tile_ptr[t + 1]].long()
        union = weight[t * OC_TILE:(t + 1) * OC_TILE].ne(0).any(0).nonzero()[:, 0]
        assert torch.equal(cols, union)


def test_bad_csr_is_refused_by_the_gpu_format():
    from fastprune.reference.sparse import TiledWeight

    row_ptr, col_idx, values = dense_to_csr(sparse_weight((4, 6), 0.5, seed=3))
    with pytest.raises(ValueError, match="col_idx"):
        TiledWeight(row_ptr, torch.where(col_idx == col_idx.max(), 6, col_idx).int(), values, None, 6)
    with pytest.raises(ValueError, match="row_ptr"):
        TiledWeight(row_ptr.flip(0), col_idx, values, None, 6)
    with pytest.raises(ValueError, match="values"):
        TiledWeight(row_ptr, col_idx, values[1:], None, 6)


@pytest.mark.parametrize("total_p,oc", [(16, 8), (1, 70_000), (1024 * 224 * 224, 64), (256 * 32 * 32, 512)])
def test_gpu_sparse_launch_grid(total_p, oc):
    # One flat grid axis (CUDA allows 2^31 - 1 programs there, 65535 on the others): the old
    # (positions, channels) grid could not launch a linear layer of more than 65535 outputs.
    pytest.importorskip("triton")
    from fastprune.kernels.sparse_conv import OC_TILE, launch_grid

    programs, n_pblocks, bp = launch_grid(total_p, oc)
    assert programs < 2**31 and programs == -(-oc // OC_TILE) * n_pblocks and n_pblocks * bp >= total_p
    if total_p <= 16:
        assert bp == 16  # a 4x4 map at batch 1 fills its block (the old fixed 256 left 94% idle)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_LINEAR_SPEC))
@pytest.mark.parametrize("n,fin,fout,sparsity", [(1, 7, 5, 0.5), (9, 33, 17, 0.9), (4, 10, 3, 1.0), (3, 8, 6, 0.0),
                                                (130, 40, 35, 0.8)])
def test_sparse_linear_matches_linear(backend, device, n, fin, fout, sparsity):
    gen = torch.Generator().manual_seed(n + fin)
    x = torch.randn(n, fin, generator=gen).to(device)
    weight = sparse_weight((fout, fin), sparsity, seed=fout).to(device)
    row_ptr, col_idx, values = dense_to_csr(weight)
    with fastprune.use_backend(backend):
        got = sparse_linear(x, row_ptr, col_idx, values, None, fin)
    torch.testing.assert_close(got.double(), x.double() @ weight.double().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_CONV_SPEC) + [pytest.param("reference", torch.device("cpu"))])
def test_fused_epilogues(backend, device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 18, 17, generator=gen).to(device)
    weight = sparse_weight((5, 4, 3, 3), 0.6, seed=4).to(device)
    bias = torch.randn(5, generator=gen).to(device)
    row_ptr, col_idx, values = dense_to_csr(weight)
    conv = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    residual = torch.randn(conv.shape, generator=gen).to(device)
    for algo in (0, 1, 2, 3):
        with fastprune.use_backend(backend):
            relu = sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, algo, 1)
            pooled = sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, algo, 2)
            added = sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, algo, 3, residual)
        torch.testing.assert_close(relu.double(), F.relu(conv), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled.double(), F.max_pool2d(F.relu(conv), 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(added.double(), F.relu(conv + residual.double()), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, 3, 1, residual)
    with pytest.raises(ValueError, match="residual"):
        sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, 3, 3)


LAYOUT_INPUTS = {"contiguous": lambda x: x, "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
                 "batch_innermost": to_batch_innermost}


@pytest.mark.parametrize("layout", list(LAYOUT_INPUTS))
@pytest.mark.parametrize("algo,epilogue", [(0, 0), (0, 1), (1, 2), (2, 1), (3, 0), (3, 2), (3, 3)])
def test_opcheck_on_every_layout_the_sparse_op_sees(layout, algo, epilogue):
    # The fake must give the real output's strides (torch.compile relies on them): every layout the
    # tuner can feed the op, every algorithm and fused epilogue.
    if algo == 2 and layout != "contiguous":
        pytest.skip("the direct algorithm takes contiguous inputs only")
    gen = torch.Generator().manual_seed(algo * 10 + epilogue)
    x = LAYOUT_INPUTS[layout](torch.randn(9, 4, 8, 8, generator=gen))
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((6, 4, 3, 3), 0.6, seed=algo))
    residual = torch.randn(9, 6, 8, 8, generator=gen) if epilogue == 3 else None
    args = (x, row_ptr, col_idx, values, torch.randn(6, generator=gen), 4, 3, 3, 1, 1, 1, 1, algo, epilogue, residual)
    torch.library.opcheck(torch.ops.fastprune.sparse_conv2d.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out = torch.ops.fastprune.sparse_conv2d.default(*args)
    want = "batch_innermost" if algo == 3 else ("channels_last" if layout == "channels_last" else "contiguous")
    assert {"batch_innermost": is_batch_innermost(out), "contiguous": out.is_contiguous(),
            "channels_last": out.is_contiguous(memory_format=torch.channels_last)}[want]


@pytest.mark.parametrize("layout", list(LAYOUT_INPUTS))
def test_torch_compile_of_a_sparse_layer_on_every_layout(layout):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        dense[0].weight.mul_(torch.rand_like(dense[0].weight) > 0.7)
    layer = SparseConv2d.from_dense(dense[0])
    layer.algo, layer.epilogue = (3, 1) if layout == "batch_innermost" else (0, 1)
    x = LAYOUT_INPUTS[layout](torch.rand(9, 4, 8, 8))
    compiled = torch.compile(lambda t: layer(t) * 2.0 + 1.0, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), dense(x) * 2.0 + 1.0, atol=1e-5, rtol=1e-5)


def test_opcheck_sparse_ops():
    x = torch.randn(2, 3, 6, 6)
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((4, 3, 3, 3), 0.6, seed=1))
    torch.library.opcheck(torch.ops.fastprune.sparse_conv2d.default,
                          (x, row_ptr, col_idx, values, torch.randn(4), 3, 3, 3, 1, 1, 1, 1, 0, 0))
    torch.library.opcheck(torch.ops.fastprune.sparse_conv2d.default,
                          (torch.randn(2, 3, 16, 16), row_ptr, col_idx, values, None, 3, 3, 3, 1, 1, 1, 1, 2, 2))
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((5, 7), 0.6, seed=2))
    torch.library.opcheck(torch.ops.fastprune.sparse_linear.default, (torch.randn(3, 7), row_ptr, col_idx, values,
                                                                       None, 7))


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "cnn-small"])
def test_sparsify_whole_models_equals_the_masked_model(name, device):
    torch.manual_seed(0)
    channels, size = (1, 8) if name == "cnn-small" else (3, 32)
    model = get_model(name, 10, channels).to(device).eval()
    # BatchNorm statistics that are not the identity, so that folding mistakes would show.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    prune_model(model, 0.9, method="magnitude")
    x = torch.rand(3, channels, size, size, device=device)
    for kwargs in ({"example_input": x}, {}):  # timed per layer, and by the sparsity rule
        sparse = sparsify(model, **kwargs)
        with torch.no_grad():
            want, got = model(x), sparse(x)
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
        fused = [m.epilogue for m in sparse.modules() if isinstance(m, SparseConv2d)]
        if name == "vgg16" and not kwargs:  # untimed: every layer sparse, so every conv -> ReLU fuses
            assert fused and all(e > 0 for e in fused), "VGG's conv -> ReLU pairs should be fused"
        decisions = sparse.sparsify_decisions
        assert len(decisions) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        assert all(abs(d["sparsity"] - 0.9) < 0.01 for d in decisions.values())
    # Without timing every layer at 90% is converted; with timing, only the faster ones.
    assert any(isinstance(m, (SparseConv2d, SparseLinear)) for m in sparsify(model).modules())
    assert not any(type(m).__name__.startswith("Masked") for m in sparse.modules())


def test_fast_pooling_equals_max_pool():
    from fastprune.nn.sparse import MaxPool2x2

    pool = MaxPool2x2()
    for shape in [(2, 3, 8, 8), (1, 2, 7, 9), (3, 1, 2, 2)]:
        x = torch.randn(shape)
        assert torch.equal(pool(x), F.max_pool2d(x, 2))
        assert torch.equal(pool(x.contiguous(memory_format=torch.channels_last)), F.max_pool2d(x, 2))
    assert MaxPool2x2.replaces(nn.MaxPool2d(2)) and not MaxPool2x2.replaces(nn.MaxPool2d(3))
    assert not MaxPool2x2.replaces(nn.MaxPool2d(2, ceil_mode=True))


def test_fast_adaptive_pooling_equals_adaptive_max_pool():
    from fastprune.nn.sparse import AdaptiveMaxPool2x2

    pool = AdaptiveMaxPool2x2.from_module(nn.AdaptiveMaxPool2d(4))
    # (8, 8) takes the 2x2 path, in both layouts; other sizes fall back to PyTorch's adaptive windows
    for shape in [(2, 3, 8, 8), (1, 2, 7, 9), (3, 1, 12, 8), (2, 2, 4, 4)]:
        x = torch.randn(shape)
        assert torch.equal(pool(x), F.adaptive_max_pool2d(x, 4)), shape
        assert torch.equal(pool(x.contiguous(memory_format=torch.channels_last)), F.adaptive_max_pool2d(x, 4))
    assert AdaptiveMaxPool2x2.from_module(nn.AdaptiveMaxPool2d((2, 3))).output_size == (2, 3)
    assert AdaptiveMaxPool2x2.replaces(nn.AdaptiveMaxPool2d(4))
    assert not AdaptiveMaxPool2x2.replaces(nn.AdaptiveMaxPool2d((None, 4)))
    assert not AdaptiveMaxPool2x2.replaces(nn.AdaptiveMaxPool2d(4, return_indices=True))
    assert not AdaptiveMaxPool2x2.replaces(nn.AdaptiveAvgPool2d(4))


def test_save_load_round_trip_and_size(tmp_path):
    torch.manual_seed(0)
    model = prune_model(get_model("resnet18", 10, 3).eval(), 0.99, method="magnitude")
    sparse = sparsify(model)
    path = tmp_path / "sparse.pt"
    save_sparse(sparse, str(path))
    loaded = load_sparse(str(path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))
    dense_bytes = sum(p.numel() * 4 for p in get_model("resnet18").parameters())
    assert os.path.getsize(path) < 0.05 * dense_bytes, "a 99% sparse model must store about 1% of the weights"
    with pytest.raises(FileNotFoundError):
        load_sparse(str(tmp_path / "missing.pt"))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="save_sparse"):
        load_sparse(str(tmp_path / "other.pt"))


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_every_candidate_sparsify_can_pick_reloads_exactly(name, tmp_path):
    # Whatever timing picks (layout, per-layer algorithm, fused epilogues, micro-batches, dense),
    # save_sparse + load_sparse rebuild it from tensors and plain data with identical outputs.
    from fastprune.nn.sparse import (BatchInnermostInput, ChannelsLastInput, MicroBatched, _fast_pooling,
                                     _layout_candidates, _plan_of, fold_batchnorm)

    torch.manual_seed(1)
    model = prune_model(get_model(name, 10, 3).eval(), 0.95, method="magnitude")
    for m in model.modules():  # BatchNorm statistics that are not the identity: folding must be redone
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(9, 3, 32, 32)
    dense = _fast_pooling(fold_batchnorm(fold_masks(copy.deepcopy(model).eval())))
    layouts = {"contiguous": None, "channels_last": ChannelsLastInput, "batch innermost": BatchInnermostInput}
    candidates = _layout_candidates(dense, x, layouts, 0.5, repeats=1)
    key, (innermost, _) = next((k, v) for k, v in candidates.items() if k == "sparse, batch innermost")
    candidates["sparse, batch innermost, micro-batches of 4"] = (MicroBatched(innermost, 4), None)
    assert len(candidates) == 6
    for key, (candidate, _) in candidates.items():
        candidate.sparsify_plan = _plan_of(candidate, key.split(",")[0])
        candidate.fastprune_recipe = model.fastprune_recipe
        path = tmp_path / "m.pt"
        save_sparse(candidate, str(path))
        loaded = load_sparse(str(path))
        assert type(loaded).__name__ == type(candidate).__name__, key
        assert loaded.state_dict().keys() == candidate.state_dict().keys(), key
        with torch.no_grad():
            assert torch.equal(loaded(x), candidate(x)), key


def test_save_sparse_needs_a_sparsify_result_of_a_zoo_model(tmp_path):
    with pytest.raises(ValueError, match="sparsify"):
        save_sparse(nn.Linear(3, 2), str(tmp_path / "a.pt"))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match="get_model"):
        save_sparse(sparsify(plain), str(tmp_path / "b.pt"))


def test_bad_inputs():
    layer = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(ValueError, match="4D"):
        layer(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.randn(1, 3, 8, 8).double())
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    lin = SparseLinear.from_dense(nn.Linear(5, 3))
    with pytest.raises(ValueError, match="features"):
        lin(torch.randn(2, 4))
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(nn.Sequential(nn.Linear(2, 2)), min_sparsity=1.5)


def test_semi_structured_needs_a_capable_gpu_and_a_2_to_4_weight():
    from fastprune.nn import SemiStructuredLinear, is_2to4, semi_structured_supported

    assert not semi_structured_supported(torch.device("cpu"), torch.float16)
    w = torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4]])
    assert is_2to4(w) and not is_2to4(torch.ones(1, 8)) and not is_2to4(torch.ones(2, 6))
    with pytest.raises(ValueError, match="compute capability"):
        SemiStructuredLinear(w, None)
    # on the CPU sparsify never picks it, and records each layer's format
    model = prune_model(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), 0.5, "magnitude", pattern="2:4")
    sparse = sparsify(model, benchmark=False, min_sparsity=0.4)
    assert {d["format"] for d in sparse.sparsify_decisions.values()} == {"csr"}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU or not torch.cuda.get_device_capability()[0] >= 8, reason="needs an sm_80+ CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_linear_matches_the_masked_dense_layer(dtype, tmp_path):
    from fastprune.nn import SemiStructuredLinear

    torch.manual_seed(0)
    layer = prune_model(nn.Sequential(nn.Linear(256, 128)), 0.5, "magnitude", pattern="2:4")[0]
    dense = fold_masks(nn.Sequential(layer))[0].to("cuda", dtype)
    semi = SemiStructuredLinear.from_dense(dense)
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    ref = F.linear(x.double(), dense.weight.double(), dense.bias.double())
    assert torch.allclose(semi(x).double(), ref, rtol=2e-2, atol=2e-2)
    assert torch.allclose(semi(x.view(8, 8, 256)).double().view(64, 128), ref, rtol=2e-2, atol=2e-2)
    path = tmp_path / "semi.pt"
    torch.save(semi, path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded(x), semi(x))


@pytest.mark.parametrize("backend,device", backend_device_pairs(_CONV_SPEC))
@pytest.mark.parametrize("stride", [(1, 2), (2, 1), (3, 3)])
def test_sparse_conv_other_strides(backend, device, stride):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 11, 10, generator=gen).to(device)
    weight = sparse_weight((6, 5, 3, 3), 0.7, seed=5).to(device)
    bias = torch.randn(6, generator=gen).to(device)
    row_ptr, col_idx, values = dense_to_csr(weight)
    want = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=1)
    with fastprune.use_backend(backend):
        got = sparse_conv2d(x, row_ptr, col_idx, values, bias, 5, 3, 3, *stride, 1, 1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_residual_add_and_relu_fuse_into_one_op():
    from fastprune.nn.sparse import _fuse_add_relu, add_relu

    torch.manual_seed(0)
    model = get_model("resnet18", 10, 3).eval()
    traced = torch.fx.symbolic_trace(model)
    _fuse_add_relu(traced)
    traced.recompile()
    fused = [n for n in traced.graph.nodes if n.target is add_relu]
    assert len(fused) == 8  # one per residual block
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_CONV_SPEC))
@pytest.mark.parametrize("case", [(3, 4, 9, 11, 5, 3, 1, 1), (2, 3, 13, 12, 4, 3, 2, 1), (2, 6, 8, 8, 7, 1, 1, 0),
                                  (1, 5, 7, 7, 3, 3, 1, 0)], ids=str)
def test_pooling_epilogue_on_the_padded_algorithm(backend, device, case):
    n, c, h, w, oc, k, stride, pad = case  # odd sizes, stride 2, 1x1, no padding
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    weight = sparse_weight((oc, c, k, k), 0.5, seed=c).to(device)
    bias = torch.randn(oc, generator=gen).to(device)
    row_ptr, col_idx, values = dense_to_csr(weight)
    want = F.max_pool2d(F.relu(F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=pad)), 2)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        with fastprune.use_backend(backend):
            got = sparse_conv2d(xin, row_ptr, col_idx, values, bias, c, k, k, stride, stride, pad, pad, 1, 2)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_fast_adaptive_avg_pooling_equals_pytorch():
    from fastprune.nn.sparse import FastAdaptiveAvgPool2d

    for size in (2, (2, 3), 1):
        pool = FastAdaptiveAvgPool2d.from_module(nn.AdaptiveAvgPool2d(size))
        for shape in [(2, 3, 1, 1), (2, 3, 8, 6), (1, 4, 7, 9), (2, 2, 4, 12)]:  # broadcast, multiples, other
            x = torch.randn(shape)
            for xin in (x, x.contiguous(memory_format=torch.channels_last)):
                torch.testing.assert_close(pool(xin), F.adaptive_avg_pool2d(x, size), atol=1e-6, rtol=1e-6)
    assert FastAdaptiveAvgPool2d.replaces(nn.AdaptiveAvgPool2d(2))
    assert not FastAdaptiveAvgPool2d.replaces(nn.AdaptiveAvgPool2d((None, 2)))
    assert not FastAdaptiveAvgPool2d.replaces(nn.AdaptiveMaxPool2d(2))


@pytest.mark.parametrize("backend,device", backend_device_pairs(_CONV_SPEC))
@pytest.mark.parametrize("hw", [(1, 5), (5, 1), (1, 1), (2, 3)])
def test_tiny_inputs_with_wide_padding_and_stride_two(backend, device, hw):
    # taps can point past the last input row: the valid output range must not go negative
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *hw, generator=gen).to(device)
    weight = torch.randn(4, 3, 3, 3, generator=gen).to(device)
    bias = torch.randn(4, generator=gen).to(device)
    row_ptr, col_idx, values = dense_to_csr(weight)
    want = F.conv2d(x.double(), weight.double(), bias.double(), stride=2, padding=1)
    for algo in (0, 1, 2, 3):
        with fastprune.use_backend(backend):
            got = sparse_conv2d(x, row_ptr, col_idx, values, bias, 3, 3, 3, 2, 2, 1, 1, algo)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [(1, 3, 7, 6, 4, 3, 1, 1), (9, 5, 8, 8, 6, 3, 2, 1), (70, 3, 6, 5, 4, 3, 1, 2),
                                  (130, 2, 5, 7, 3, 1, 2, 0), (65, 4, 9, 9, 5, 3, (1, 2), 1)], ids=str)
def test_batch_innermost_algorithm_blocks_and_epilogues(case):
    # batches of 1, under and over the 64-image block (70, 65 and 130 split unevenly), strides 1, 2
    # and unequal, every epilogue, the output in the (OC, H', W', N) layout
    n, c, h, w, oc, k, stride, pad = case
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    gen = torch.Generator().manual_seed(n + c)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = sparse_weight((oc, c, k, k), 0.5, seed=n)
    bias = torch.randn(oc, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    conv = F.conv2d(x.double(), weight.double(), bias.double(), stride=(sh, sw), padding=pad)
    residual = to_batch_innermost(torch.randn(conv.shape, generator=gen))
    wants = {0: conv, 1: F.relu(conv), 2: F.max_pool2d(F.relu(conv), 2), 3: F.relu(conv + residual.double())}
    for epilogue, want in wants.items():
        got = sparse_conv2d(to_batch_innermost(x), row_ptr, col_idx, values, bias, c, k, k, sh, sw, pad, pad, 3,
                            epilogue, residual if epilogue == 3 else None)
        assert got.shape == want.shape and is_batch_innermost(got)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_batch_innermost_resnet_fuses_every_residual_into_a_conv():
    from fastprune.nn import BatchInnermostInput
    from fastprune.nn.sparse import _convert_layers, add_relu, fold_batchnorm, fuse_epilogues

    torch.manual_seed(0)
    model = prune_model(get_model("resnet18", 10, 3).eval(), 0.9, method="magnitude")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    graph, _ = _convert_layers(fold_batchnorm(fold_masks(copy.deepcopy(model))), {}, 0.5, 1)
    for m in graph.modules():
        if isinstance(m, SparseConv2d):
            m.algo = 3
    graph = fuse_epilogues(graph)
    assert sum(m.epilogue == 3 for m in graph.modules() if isinstance(m, SparseConv2d)) == 8  # one per block
    assert not any(n.target is add_relu for n in graph.graph.nodes)
    x = torch.rand(9, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        for run in (graph, BatchInnermostInput(graph)):
            torch.testing.assert_close(run(x), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_sparsify_tries_the_batch_innermost_layout_on_cpu_batches():
    torch.manual_seed(0)
    model = prune_model(get_model("cnn-small", 10, 1).eval(), 0.9, method="magnitude")
    x = torch.rand(70, 1, 8, 8)
    sparse = sparsify(model, x, repeats=2)
    assert "sparse, batch innermost" in sparse.sparsify_choice["seconds"]
    # over 64 images, micro-batched candidates too
    assert "sparse, batch innermost, micro-batches of 64" in sparse.sparsify_choice["seconds"]
    small = sparsify(model, x[:2], repeats=2)  # a batch of 2 does not fill a vector register
    assert "sparse, batch innermost" not in small.sparsify_choice["seconds"]
    forced = sparsify(model, x, repeats=2, batch_innermost=True, channels_last=False)
    with torch.no_grad():
        for result in (sparse, small, forced):
            torch.testing.assert_close(result(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch_innermost"):
        sparsify(model, x, batch_innermost="yes")


@pytest.mark.parametrize("epilogue", [0, 1, 2, 3])
def test_sparse_layers_give_input_gradients_for_attacks(epilogue, device):
    # attacks on a sparse model need dL/dx: checked against the dense layers in float64
    torch.manual_seed(epilogue)
    dense = nn.Conv2d(4, 6, 3, stride=1, padding=1).double().to(device)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) > 0.6)
    layer = SparseConv2d.from_dense(copy.deepcopy(dense).float())
    layer.epilogue, layer.algo = epilogue, 3 if epilogue == 3 else 0
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    residual = torch.randn(3, 6, 8, 8, dtype=torch.float64, device=device) if epilogue == 3 else None
    want = dense(x)
    want = {0: want, 1: F.relu(want), 2: F.max_pool2d(F.relu(want), 2)}.get(epilogue, F.relu(want + residual)
                                                                          if residual is not None else want)
    g = torch.randn_like(want)
    want_grad = torch.autograd.grad(want, x, g)[0]
    xf = x.detach().float().requires_grad_()
    got = layer(xf, None if residual is None else residual.float())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    got_grad = torch.autograd.grad(got, xf, g.float())[0]
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-5, rtol=1e-5)
    lin = nn.Linear(7, 5).double().to(device)
    sparse_lin = SparseLinear.from_dense(copy.deepcopy(lin).float())
    v = torch.randn(4, 7, dtype=torch.float64, device=device, requires_grad=True)
    want_grad = torch.autograd.grad(lin(v), v, torch.ones(4, 5, dtype=torch.float64, device=device))[0]
    vf = v.detach().float().requires_grad_()
    got_grad = torch.autograd.grad(sparse_lin(vf), vf, torch.ones(4, 5, device=device))[0]
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-5, rtol=1e-5)


def test_an_attack_runs_on_a_sparsified_model(device):
    from fastprune.attacks import PGD

    torch.manual_seed(0)
    model = prune_model(get_model("resnet18", 10, 3).to(device).eval(), 0.99, method="magnitude")
    x, y = torch.rand(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device)
    attack = dict(eps=8 / 255, alpha=2 / 255, steps=2, random_start=False)
    want = PGD(model, **attack)(x, y)
    # Untimed (every 99% layer sparse, add_relu ops in the graph), then timed: fused add_relu ops,
    # or (a CPU layout) residuals fused into the convs, or dense where timing found it faster.
    untimed = sparsify(model)
    assert sum(isinstance(m, SparseConv2d) for m in untimed.modules()) == 20
    torch.testing.assert_close(PGD(untimed, **attack)(x, y), want, atol=1e-5, rtol=0)
    for innermost in (False, True) if device.type == "cpu" else (False,):
        sparse = sparsify(model, x, repeats=1, channels_last=False, batch_innermost=innermost)
        torch.testing.assert_close(PGD(sparse, **attack)(x, y), want, atol=1e-5, rtol=0)


def test_micro_batched_equals_the_whole_batch():
    from fastprune.nn import MicroBatched

    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1).eval()
    x = torch.rand(11, 1, 8, 8)
    with torch.no_grad():
        for size in (1, 4, 11, 64):
            torch.testing.assert_close(MicroBatched(model, size)(x), model(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="micro_batch"):
        MicroBatched(model, 0)
