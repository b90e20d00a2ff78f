"""The sparse ops (fastprune::sparse_conv2d, sparse_linear): every backend vs F.conv2d / F.linear in
float64, on every layout, algorithm and fused epilogue; the GPU weight format; opcheck."""
import pytest
import torch
import torch.nn.functional as F

import fastprune
from fastprune.ops.sparse import (_CONV_SPEC, _LINEAR_SPEC, is_batch_innermost, sparse_conv2d, sparse_linear,
                                  to_batch_innermost)
from fastprune.reference.sparse import csr_to_dense, dense_to_csr

from ..conftest import backend_device_pairs

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
    algos = [0, 1, 3, 4] + ([2] if stride in (1, 2) else [])
    # every algorithm, on contiguous, channels_last and batch-innermost inputs; each layout gets its
    # own values (x scaled), so a kernel that left part of its staged copy from the previous call
    # (the same shape: the same workspace) cannot pass
    for algo in algos:
        for scale, to_layout in enumerate((lambda t: t, lambda t: t.contiguous(memory_format=torch.channels_last),
                                           to_batch_innermost), start=1):
            if algo == 2 and scale > 1:
                continue
            xin = to_layout(x * scale)
            with fastprune.use_backend(backend):
                got = sparse_conv2d(xin, row_ptr, col_idx, values, bias, c, k, k, stride, stride, pad, pad, algo=algo)
            assert got.shape == want.shape
            torch.testing.assert_close(got.double(), scale * want - (scale - 1) * bias.double()[:, None, None],
                                       atol=1e-5 * scale, rtol=1e-5)
            if backend == "cpp" and algo in (3, 4):
                assert is_batch_innermost(got), "the batch-innermost and tiled algorithms write their own layout"
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
    from fastprune.kernels.sparse import OC_TILE, launch_grid

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
    for algo in (0, 1, 2, 3, 4):
        with fastprune.use_backend(backend):
            relu = sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, 1, algo=algo)
            pooled = sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, 2, algo=algo)
            added = sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, 3, residual, algo=algo)
        torch.testing.assert_close(relu.double(), F.relu(conv), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled.double(), F.max_pool2d(F.relu(conv), 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(added.double(), F.relu(conv + residual.double()), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, 1, residual, algo=3)
    with pytest.raises(ValueError, match="residual"):
        sparse_conv2d(x, row_ptr, col_idx, values, bias, 4, 3, 3, 1, 1, 1, 1, 3, algo=3)



LAYOUT_INPUTS = {"contiguous": lambda x: x, "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
                 "batch_innermost": to_batch_innermost}



@pytest.mark.parametrize("layout", list(LAYOUT_INPUTS))
@pytest.mark.parametrize("algo,epilogue", [(0, 0), (0, 1), (1, 2), (2, 1), (3, 0), (3, 2), (3, 3), (4, 1), (4, 2),
                                            (4, 3), (5, 0), (5, 3)])
def test_opcheck_on_every_layout_the_sparse_op_sees(layout, algo, epilogue):
    # The fake must give the real output's strides (torch.compile relies on them): every layout the
    # tuner can feed the op, every algorithm and fused epilogue.
    if algo == 2 and layout != "contiguous":
        pytest.skip("the direct algorithm takes contiguous inputs only")
    gen = torch.Generator().manual_seed(algo * 10 + epilogue)
    x = LAYOUT_INPUTS[layout](torch.randn(9, 4, 8, 8, generator=gen))
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((6, 4, 3, 3), 0.6, seed=algo))
    residual = torch.randn(9, 6, 8, 8, generator=gen) if epilogue == 3 else None
    common = (x, row_ptr, col_idx, values, torch.randn(6, generator=gen), 4, 3, 3, 1, 1, 1, 1)
    # algorithm 0 through the device-generic op, a chosen one through the CPU's own op
    op, args = ((torch.ops.fastprune.sparse_conv2d.default, common + (epilogue, residual)) if algo == 0 else
                (torch.ops.fastprune.sparse_conv2d_cpu.default, common + (algo, epilogue, residual)))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out = op(*args)
    want = "batch_innermost" if algo in (3, 4, 5) else ("channels_last" if layout == "channels_last" else "contiguous")
    assert {"batch_innermost": is_batch_innermost(out), "contiguous": out.is_contiguous(),
            "channels_last": out.is_contiguous(memory_format=torch.channels_last)}[want]



def test_opcheck_sparse_ops():
    x = torch.randn(2, 3, 6, 6)
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((4, 3, 3, 3), 0.6, seed=1))
    torch.library.opcheck(torch.ops.fastprune.sparse_conv2d.default,
                          (x, row_ptr, col_idx, values, torch.randn(4), 3, 3, 3, 1, 1, 1, 1, 0))
    torch.library.opcheck(torch.ops.fastprune.sparse_conv2d_cpu.default,
                          (torch.randn(2, 3, 16, 16), row_ptr, col_idx, values, None, 3, 3, 3, 1, 1, 1, 1, 2, 2))
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((5, 7), 0.6, seed=2))
    torch.library.opcheck(torch.ops.fastprune.sparse_linear.default, (torch.randn(3, 7), row_ptr, col_idx, values,
                                                                       None, 7))



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
            got = sparse_conv2d(xin, row_ptr, col_idx, values, bias, c, k, k, stride, stride, pad, pad, 2, algo=1)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)



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
    for algo in (0, 1, 2, 3, 4):
        with fastprune.use_backend(backend):
            got = sparse_conv2d(x, row_ptr, col_idx, values, bias, 3, 3, 3, 2, 2, 1, 1, algo=algo)
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
        got = sparse_conv2d(to_batch_innermost(x), row_ptr, col_idx, values, bias, c, k, k, sh, sw, pad, pad,
                            epilogue, residual if epilogue == 3 else None, algo=3)
        assert got.shape == want.shape and is_batch_innermost(got)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("case", [(1, 3, 7, 6, 4, 3, 1, 1), (1, 5, 32, 32, 6, 3, 1, 1), (1, 4, 9, 13, 3, 3, 2, 1),
                                  (9, 5, 8, 8, 6, 3, 2, 1), (21, 3, 6, 5, 4, 3, 1, 2), (37, 2, 5, 7, 3, 1, 2, 0),
                                  (64, 6, 4, 4, 40, 3, 1, 1), (16, 4, 2, 2, 5, 3, 1, 1)], ids=str)
def test_tiled_algorithm_tiles_blocks_and_epilogues(case, isa, monkeypatch):
    # The tiled algorithm on every instruction set it has (the narrower ones forced on this CPU):
    # batch 1 (whole-row runs), batch blocks of 16 with a partial last one (21, 37), 4x4 and 2x2
    # maps, strides 1 and 2, wide padding, more output channels than tasks per thread, every epilogue.
    if isa != "native":
        monkeypatch.setenv("FASTPRUNE_TILED_ISA", isa)
    n, c, h, w, oc, k, stride, pad = case
    gen = torch.Generator().manual_seed(n * 3 + c)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = sparse_weight((oc, c, k, k), 0.5, seed=n, empty_row=True)
    bias = torch.randn(oc, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    residual = None
    # each call its own input values (x scaled): a staged copy left from the previous call cannot pass
    for scale, to_layout in enumerate((lambda t: t, lambda t: t.contiguous(memory_format=torch.channels_last),
                                       to_batch_innermost), start=1):
        conv = F.conv2d(x.double() * scale, weight.double(), bias.double(), stride=stride, padding=pad)
        if residual is None:
            residual = torch.randn(conv.shape, generator=gen)
        wants = {0: conv, 1: F.relu(conv), 2: F.max_pool2d(F.relu(conv), 2), 3: F.relu(conv + residual.double())}
        for epilogue, want in wants.items():
            got = sparse_conv2d(to_layout(x * scale), row_ptr, col_idx, values, bias, c, k, k, stride, stride, pad,
                                pad, epilogue, residual if epilogue == 3 else None, algo=4)
            assert got.shape == want.shape and is_batch_innermost(got)
            torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("n,block", [(33, 32), (48, 32), (64, 64), (80, 64), (96, 32), (64, None), (48, None)],
                         ids=str)
def test_tiled_algorithm_batch_blocks_of_32_and_64(n, block, isa, monkeypatch):
    # Batch blocks larger than one vector per position (2 and 4 AVX-512 vectors; the AVX2 kernels cap
    # the block at 16): forced, with partial last blocks of 1 and 16 images, and as the block size
    # heuristic picks them (a small layer's window fits: the largest block); strides 1 and 2, every
    # epilogue, every input layout (one block of a batch-innermost input stages whole rows at once).
    if block is not None:
        monkeypatch.setenv("FASTPRUNE_TILED_BATCH_BLOCK", str(block))
    if isa != "native":
        monkeypatch.setenv("FASTPRUNE_TILED_ISA", isa)
    gen = torch.Generator().manual_seed(n + (block or 0))
    c, oc = 5, 7
    weight = sparse_weight((oc, c, 3, 3), 0.5, seed=n, empty_row=True)
    bias = torch.randn(oc, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    for stride, hw in ((1, 6), (2, 9)):
        x = torch.randn(n, c, hw, hw, generator=gen)
        conv = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=1)
        residual = torch.randn(conv.shape, generator=gen)
        wants = {0: conv, 1: F.relu(conv), 2: F.max_pool2d(F.relu(conv), 2), 3: F.relu(conv + residual.double())}
        layouts = (lambda t: t, lambda t: t.contiguous(memory_format=torch.channels_last), to_batch_innermost)
        for scale, to_layout in enumerate(layouts, start=1):  # x scaled per layout: no stale staged copy passes
            for epilogue, want in wants.items():
                got = sparse_conv2d(to_layout(x * scale), row_ptr, col_idx, values, bias * scale, c, 3, 3, stride,
                                    stride, 1, 1, epilogue, residual * scale if epilogue == 3 else None, algo=4)
                assert got.shape == want.shape and is_batch_innermost(got)
                torch.testing.assert_close(got.double(), want * scale, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("case", [(16, 12, 8, 8, 9, 1), (16, 6, 4, 4, 1, 1), (33, 5, 9, 9, 11, 2), (1, 4, 2, 2, 3, 1)],
                         ids=str)
def test_tiled_algorithm_splits_its_work_by_cost_over_any_thread_count(case, threads):
    # Each thread takes a contiguous range of (batch block, tile, output channel) of equal estimated
    # cost: ranges that end inside a tile, output channels of very different non-zero counts (empty,
    # dense), fewer items than threads (one output channel of one tile), partial batch blocks.
    n, c, h, w, oc, stride = case
    gen = torch.Generator().manual_seed(n * 7 + oc)
    weight = sparse_weight((oc, c, 3, 3), 0.7, seed=n + oc, empty_row=oc > 1)
    if oc > 2:
        weight[oc // 2] = torch.randn(c, 3, 3, generator=gen)  # one dense row among sparse ones
    bias = torch.randn(oc, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    x = torch.randn(n, c, h, w, generator=gen)
    conv = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=1)
    residual = torch.randn(conv.shape, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for epilogue, want in {1: F.relu(conv), 3: F.relu(conv + residual.double())}.items():
            got = sparse_conv2d(to_batch_innermost(x), row_ptr, col_idx, values, bias, c, 3, 3, stride, stride, 1, 1,
                                epilogue, residual if epilogue == 3 else None, algo=4)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("case", [(6, 40, 37, 9, 3, 1, 1), (5, 33, 30, 7, 3, 2, 1), (8, 21, 19, 10, 1, 2, 0),
                                  (4, 26, 26, 5, 5, 1, 2), (3, 23, 17, 6, 3, 3, 2), (2, 64, 9, 3, 3, 2, 0),
                                  (7, 4, 4, 12, 3, 1, 1), (9, 8, 8, 5, 3, 1, 1), (6, 16, 15, 4, 3, 2, 1),
                                  (5, 8, 8, 11, 1, 2, 0), (4, 2, 8, 6, 3, 1, 1), (3, 6, 6, 5, 5, 1, 1),
                                  (300, 4, 4, 3, 3, 1, 1), (6, 4, 4, 24, 3, 1, 1), (4, 8, 8, 96, 3, 1, 1),
                                  (5, 16, 16, 90, 3, 2, 1), (3, 6, 6, 50, 5, 1, 1)], ids=str)
def test_tiled_algorithm_at_batch_1_stages_each_threads_rows(case, threads, isa, monkeypatch):
    # Batch 1, each thread staging into its own memory: on the padded grid, the rows its tiles read
    # (tall maps of many row tiles, thread ranges ending inside one; strides 1 to 3, 1x1 to 5x5 kernels,
    # no or wide padding); on im2col rows, small maps of whole vectors of positions with enough non-zeros
    # (4 x 4, 8 x 8 from 8 x 8 and from 16 x 16 by stride 2, 4 x 4 from 6 x 6 by a 5x5 kernel, 1x1 stride
    # 2), output channels split by non-zeros; the same maps with few output channels (too few non-zeros
    # to build the rows for) and past the rows' size (300 channels at 4 x 4) on the grid again. More threads than work, every input
    # layout and a strided view, AVX-512 and AVX2 vectors. The staging memory is first filled from an
    # input of NaN: a row no thread staged, or staged from the wrong place, is NaN.
    if isa != "native":
        monkeypatch.setenv("FASTPRUNE_TILED_ISA", isa)
    c, h, w, oc, k, stride, pad = case
    gen = torch.Generator().manual_seed(h * 31 + w + k)
    weight = sparse_weight((oc, c, k, k), 0.6, seed=h + oc, empty_row=True)
    bias = torch.randn(oc, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    base = torch.randn(1, c, h, w + 3, generator=gen)
    inputs = {"contiguous": base[..., :w].contiguous(), "channels_last":
              base[..., :w].contiguous(memory_format=torch.channels_last), "view": base[..., 1:w + 1]}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, x in inputs.items():
            conv = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=pad)
            residual = torch.randn(conv.shape, generator=gen)
            wants = {1: F.relu(conv), 3: F.relu(conv + residual.double())}
            if conv.shape[-1] >= 2 and conv.shape[-2] >= 2:
                wants[2] = F.max_pool2d(F.relu(conv), 2)
            for epilogue, want in wants.items():
                res = residual if epilogue == 3 else None
                sparse_conv2d(torch.full_like(x, float("nan")), row_ptr, col_idx, values, bias, c, k, k, stride,
                              stride, pad, pad, epilogue, res, algo=4)
                got = sparse_conv2d(x, row_ptr, col_idx, values, bias, c, k, k, stride, stride, pad, pad, epilogue,
                                    res, algo=4)
                assert got.shape == want.shape, name
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    finally:
        torch.set_num_threads(before)


def _planes_in_nan(x: torch.Tensor, gap: int) -> torch.Tensor:
    """x (1, C, H, W) with its channel planes ``gap`` floats further apart than their size, the gaps
    and one more plane past the last NaN: a read outside a plane that reaches the output is NaN."""
    _, c, h, w = x.shape
    plane = h * w + gap
    storage = torch.full(((c + 1) * plane,), float("nan"))
    framed = storage.as_strided((1, c, h, w), (c * plane, plane, w, 1))
    framed.copy_(x)
    return framed


def _check_batch_1_same_conv(case, threads, atol=1e-5):
    """Batch 1, stride 1, "same" padding, case (c, h, w, oc, kh, kw): the tiled algorithm (algo 4)
    against float64 F.conv2d with and without a bias, every epilogue without pooling, input planes
    packed and 16 / 5 floats apart in a frame of NaN, on ``threads`` threads. The weight's output
    channel 3 (of more than 3) is dense, and others empty."""
    c, h, w, oc, kh, kw = case
    gen = torch.Generator().manual_seed(c * 13 + h * 7 + w + oc)
    weight = sparse_weight((oc, c, kh, kw), 0.8, seed=c + oc + kh + h, empty_row=oc > 1)
    if oc > 3:
        weight[3] = torch.randn(c, kh, kw, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    x = torch.randn(1, c, h, w, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (torch.randn(oc, generator=gen), None):
            conv = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(),
                            padding=(kh // 2, kw // 2))
            residual = torch.randn(conv.shape, generator=gen)
            wants = {0: conv, 1: F.relu(conv), 3: F.relu(conv + residual.double())}
            for name, given in {"packed": x.contiguous(), "planes 16 apart": _planes_in_nan(x, 16),
                                "planes 5 apart": _planes_in_nan(x, 5)}.items():
                for epilogue, want in wants.items():
                    got = sparse_conv2d(given, row_ptr, col_idx, values, bias, c, kh, kw, 1, 1, kh // 2, kw // 2,
                                        epilogue, residual if epilogue == 3 else None, algo=4)
                    assert got.shape == want.shape
                    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-5,
                                               msg=lambda m: f"{name}, epilogue {epilogue}: {m}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", [(64, 4, 4, 40, 3, 3), (32, 8, 8, 24, 3, 3), (48, 2, 2, 17, 3, 3), (9, 3, 5, 8, 3, 3),
                                  (7, 7, 9, 6, 3, 3), (5, 1, 7, 9, 3, 3), (3, 1, 1, 5, 3, 3), (12, 4, 4, 10, 1, 1),
                                  (6, 5, 6, 7, 5, 5), (10, 4, 6, 9, 3, 1), (1, 4, 4, 3, 3, 3), (700, 4, 4, 3, 3, 3)],
                         ids=str)
def test_batch_1_small_maps_shift_whole_planes_per_tap(case, threads):
    # Batch 1 on a map of at most 64 positions, stride 1, "same" padding (the tiled algorithm's
    # small-map path on AVX-512; elsewhere the same cases run the grid or im2col rows): each tap is a
    # shift of the flattened plane, with the positions it cannot reach masked. Maps of one to four
    # vectors and partial last vectors (3 x 5, 7 x 9, 2 x 2, 1 x 7, 1 x 1), 1x1, 5x5 and 3x1 kernels,
    # one input channel and 700 of them, empty and dense output channels, more threads than work;
    # input planes packed and 16 / 5 floats apart in a frame of NaN (the generated algorithm's padded
    # planes), every epilogue without pooling, with and without a bias.
    _check_batch_1_same_conv(case, threads)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", [(64, 32, 32, 64), (5, 16, 16, 7), (3, 32, 32, 20), (6, 17, 32, 9), (9, 1, 16, 4),
                                  (4, 3, 32, 5), (2, 41, 16, 3), (40, 9, 16, 1)], ids=str)
def test_batch_1_rows_of_16_or_32_shift_their_column_taps(case, threads):
    # Batch 1, 3 x 3, stride 1, padding 1 on rows of 16 or 32 floats (the tiled algorithm's row-shift
    # path on AVX-512; elsewhere the grid): row taps are aligned addresses into a thread's staged band,
    # column taps lane shifts of the sums with zeros shifted in. Bands of unequal height and a last
    # partial tile of rows (17, 41, 9 rows), a map of one row and of fewer rows than a tile, more threads
    # than tiles, one output channel, empty and dense output channels; input planes packed and in a
    # frame of NaN (a read past a plane or a shift that takes a lane it should zero shows as NaN).
    # (float32 sums of up to 576 products of unit normals: a wrong index errs by about 1)
    _check_batch_1_same_conv((*case, 3, 3), threads, atol=5e-5)


def test_batch_1_small_maps_follow_values_and_patterns_changed_under_their_cache():
    # The small-map path keeps each weight's non-zeros grouped by tap, with their values, per (col_idx,
    # values) tensor and version: values scaled in place, a pattern edited in place, a new values
    # tensor and new row pointers each give the convolution of what the tensors hold now.
    gen = torch.Generator().manual_seed(5)
    c, oc = 16, 12
    x = torch.randn(1, c, 4, 4, generator=gen)

    def check(row_ptr, col_idx, values):
        weight = csr_to_dense(row_ptr, col_idx, values, (oc, c, 3, 3))
        got = sparse_conv2d(x, row_ptr, col_idx, values, None, c, 3, 3, 1, 1, 1, 1, 0, None, algo=4)
        torch.testing.assert_close(got.double(), F.conv2d(x.double(), weight.double(), padding=1),
                                   atol=1e-5, rtol=1e-5)

    row_ptr, col_idx, values = dense_to_csr(sparse_weight((oc, c, 3, 3), 0.7, seed=3))
    check(row_ptr, col_idx, values)
    values.mul_(-2.5)  # in place: the same tensors, a new version
    check(row_ptr, col_idx, values)
    col_idx[: col_idx.numel() // 2] = (col_idx[: col_idx.numel() // 2] + 1) % (c * 9)  # taps and channels move
    check(row_ptr, col_idx, values)
    check(row_ptr, col_idx, torch.randn(values.shape, generator=gen))  # a new values tensor
    other_ptr, other_idx, other_vals = dense_to_csr(sparse_weight((oc, c, 3, 3), 0.4, seed=4))
    check(other_ptr, other_idx, other_vals)
    # The same col_idx and values under other row pointers (non-zeros moved between output channels).
    moved = row_ptr.clone()
    moved[1:-1] = torch.minimum(moved[1:-1] + 1, moved[-1])
    check(moved, col_idx, values)


def test_tiled_algorithm_follows_patterns_that_change_under_its_offset_cache():
    # The tiled algorithm caches each pattern's offsets per col_idx tensor and geometry: a pattern
    # edited in place, another batch size or map size, and a new col_idx tensor (perhaps at a freed
    # one's address) must each give the convolution of the pattern they hold.
    def check(x, row_ptr, col_idx, values, weight):
        got = sparse_conv2d(x, row_ptr, col_idx, values, None, 6, 3, 3, 1, 1, 1, 1, algo=4)
        torch.testing.assert_close(got.double(), F.conv2d(x.double(), weight.double(), padding=1), atol=1e-5,
                                   rtol=1e-5)

    gen = torch.Generator().manual_seed(11)
    weight = sparse_weight((5, 6, 3, 3), 0.6, seed=11)
    row_ptr, col_idx, values = dense_to_csr(weight)
    for n, size in ((1, 6), (1, 6), (17, 6), (1, 9)):
        check(torch.randn(n, 6, size, size, generator=gen), row_ptr, col_idx, values, weight)
    # the same tensor, its columns moved in place (each non-zero to the next tap, the rows stay sorted)
    moved = torch.zeros_like(weight).reshape(5, -1)
    rows = torch.repeat_interleave(torch.arange(5), (row_ptr[1:] - row_ptr[:-1]).long())
    with torch.no_grad():
        col_idx.copy_((col_idx + 1) % 54)
        order = torch.argsort(rows * 54 + col_idx.long())
        col_idx.copy_(col_idx[order])
        values = values[order]
    moved[rows, col_idx.long()] = values
    check(torch.randn(1, 6, 6, 6, generator=gen), row_ptr, col_idx, values, moved.reshape(5, 6, 3, 3))
    x = torch.randn(1, 6, 6, 6, generator=gen)
    for shift in range(1, 6):  # fresh patterns of as many non-zeros, each freed before the next is made
        rolled = torch.roll(weight, shift, dims=1)
        check(x, *dense_to_csr(rolled), rolled)


def test_tiled_algorithm_refuses_unequal_strides():
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((4, 3, 3, 3), 0.5, seed=1))
    with pytest.raises(RuntimeError, match="equal strides"):
        sparse_conv2d(torch.randn(2, 3, 8, 8), row_ptr, col_idx, values, None, 3, 3, 3, 1, 2, 1, 1, algo=4)


@pytest.mark.skipif(not fastprune.backends.extension_info()["cpp"], reason="needs the C++ extension")
def test_the_cpu_kernel_called_without_the_dispatcher_equals_the_op_and_checks_its_arguments():
    # fastprune._C.sparse_conv2d_cpu (SparseModel's inference path) runs the op's own CPU kernel:
    # the same output, strides included, for every algorithm and fused epilogue, with and without a
    # bias, the residual passed or left out; bad arguments raise, naming the argument.
    import fastprune._C as native
    direct = native.sparse_conv2d_cpu
    ext = torch.ops.fastprune.sparse_conv2d_ext
    gen = torch.Generator().manual_seed(11)
    weight = sparse_weight((10, 6, 3, 3), 0.7, seed=5)
    row_ptr, col_idx, values = dense_to_csr(weight)
    bias = torch.randn(10, generator=gen)
    for n, algo in [(1, 4), (3, 4), (2, 3), (2, 1), (2, 2), (1, 0)]:
        x = torch.randn(n, 6, 9, 9, generator=gen)
        x = to_batch_innermost(x) if algo in (3, 4) else x
        conv = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
        residual = torch.randn(conv.shape, generator=gen)
        for epilogue in ([0, 1, 3] if algo in (3, 4) else [0, 1]):
            res = residual if epilogue == 3 else None
            for b in (bias, None):
                args = (x, row_ptr, col_idx, values, b, 3, 3, 1, 1, 1, 1, algo, epilogue)
                got, want = (direct(*args, res), ext(*args, res)) if res is not None else (direct(*args), ext(*args))
                assert got.stride() == want.stride(), (n, algo, epilogue)
                torch.testing.assert_close(got, want, atol=0, rtol=0)
            ref = {0: conv, 1: F.relu(conv), 3: F.relu(conv + residual.double())}[epilogue]
            torch.testing.assert_close(direct(x, row_ptr, col_idx, values, bias, 3, 3, 1, 1, 1, 1, algo, epilogue, res)
                                       .double(), ref, atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 6, 9, 9)
    with pytest.raises(TypeError, match="values must be a Tensor"):
        direct(x, row_ptr, col_idx, values.tolist(), None, 3, 3, 1, 1, 1, 1, 4, 1)
    with pytest.raises(TypeError, match="argument 7 must be an int"):
        direct(x, row_ptr, col_idx, values, None, 3, 3, 1.0, 1, 1, 1, 4, 1)
    with pytest.raises(TypeError, match="13 or 14 arguments"):
        direct(x, row_ptr, col_idx, values)
    with pytest.raises(RuntimeError, match="algo must be"):
        direct(x, row_ptr, col_idx, values, None, 3, 3, 1, 1, 1, 1, 9, 1)
    with pytest.raises(RuntimeError, match="x must be float32"):
        direct(x.double(), row_ptr, col_idx, values, None, 3, 3, 1, 1, 1, 1, 4, 1)


@pytest.mark.skipif(not fastprune.backends.extension_info()["cpp"], reason="needs the C++ extension")
def test_pooled_linear_equals_pooling_flatten_and_linear_in_float64_and_checks_its_arguments():
    # fastprune._C.pooled_linear_cpu (a classifier head in the inference graph): global average pooling,
    # flatten and a CSR linear of x whose channel planes are (H, W, N) contiguous, planes any distance
    # apart; against the same maths in float64 on fresh inputs, for several batches, maps and biases.
    import fastprune._C as native

    gen = torch.Generator().manual_seed(17)
    for n, c, hw, out, pad in [(16, 40, 4, 10, 16), (1, 12, 3, 7, 0), (5, 9, 1, 3, 3), (32, 300, 2, 33, 16)]:
        x_nchw = torch.randn(n, c, hw, hw, generator=gen)
        planes = torch.zeros(c, hw * hw * n + pad)  # each channel one (H, W, N) plane, `pad` floats apart
        planes[:, :hw * hw * n] = x_nchw.permute(1, 2, 3, 0).reshape(c, -1)
        x = planes.as_strided((n, c, hw, hw), (1, hw * hw * n + pad, hw * n, n))
        assert torch.equal(x, x_nchw)
        weight = sparse_weight((out, c), 0.8, seed=n + c)
        row_ptr, col_idx, values = dense_to_csr(weight)
        for bias in (torch.randn(out, generator=gen), None):
            got = native.pooled_linear_cpu(x, row_ptr, col_idx, values, bias)
            want = F.linear(x_nchw.double().mean((2, 3)), weight.double(), None if bias is None else bias.double())
            assert got.shape == (n, out) and got.is_contiguous()
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    x = torch.randn(4, 6, 2, 2)
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((3, 6), 0.5, seed=1))
    with pytest.raises(RuntimeError, match="contiguous \\(H, W, N\\) plane"):
        native.pooled_linear_cpu(x, row_ptr, col_idx, values, None)  # NCHW: the batch is outermost
    xb = to_batch_innermost(x)
    with pytest.raises(RuntimeError, match="col_idx holds 6"):
        native.pooled_linear_cpu(xb, row_ptr, torch.full_like(col_idx, 6), values, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        native.pooled_linear_cpu(xb, row_ptr, col_idx, values, torch.zeros(4))
    with pytest.raises(RuntimeError, match="x must be float32"):
        native.pooled_linear_cpu(xb.double(), row_ptr, col_idx, values, None)
    with pytest.raises(TypeError, match="bias must be a Tensor"):
        native.pooled_linear_cpu(xb, row_ptr, col_idx, values, 1.0)
    with pytest.raises(TypeError, match="expected 5 arguments"):
        native.pooled_linear_cpu(xb, row_ptr, col_idx, values)


@pytest.mark.skipif(not fastprune.backends.extension_info()["cpp"], reason="needs the C++ extension")
@pytest.mark.parametrize("algo,layout", [(4, "batch_innermost"), (3, "batch_innermost"), (1, "contiguous"),
                                         (2, "contiguous"), (1, "channels_last")])
def test_large_outputs_reuse_memory_without_aliasing_live_ones(algo, layout):
    # Outputs of 512 KiB and more come from the kernels' memory pool: a dead output's block serves the
    # next one of its size, a live one is never handed out again, and the layout is the usual one.
    from fastprune.ops.sparse import release_cpu_memory
    n, c, hw, oc = 16, 4, 32, 24  # outputs 16 * 24 * 32 * 32 floats: 1.5 MiB
    weight = sparse_weight((oc, c, 3, 3), 0.5, seed=3)
    row_ptr, col_idx, values = dense_to_csr(weight)
    convert = {"batch_innermost": to_batch_innermost, "contiguous": lambda t: t.contiguous(),
               "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last)}[layout]

    def run(x):
        return sparse_conv2d(convert(x), row_ptr, col_idx, values, None, c, 3, 3, 1, 1, 1, 1, 0, algo=algo)

    xs = [torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    wants = [F.conv2d(x.double(), weight.double(), padding=1) for x in xs]
    first, second = run(xs[0]), run(xs[1])  # both alive: distinct memory
    assert first.data_ptr() != second.data_ptr()
    stride_of = {"batch_innermost": is_batch_innermost, "contiguous": lambda t: t.is_contiguous(),
                 "channels_last": lambda t: t.is_contiguous(memory_format=torch.channels_last)}[layout]
    for k, got in enumerate((first, second)):
        assert stride_of(got)
        torch.testing.assert_close(got.double(), wants[k], atol=1e-5, rtol=1e-5)
    del got
    reused = first.data_ptr()
    del first
    third = run(xs[2])  # the freed block, overwritten with the new output
    assert third.data_ptr() == reused
    torch.testing.assert_close(third.double(), wants[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.double(), wants[1], atol=1e-5, rtol=1e-5)  # untouched
    del second, third
    assert release_cpu_memory() >= 2 * n * oc * hw * hw * 4
    assert release_cpu_memory() == 0
    fresh = run(xs[0])  # after the release: new memory, still right
    torch.testing.assert_close(fresh.double(), wants[0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not fastprune.backends.extension_info()["cpp"], reason="needs the C++ extension")
def test_pooled_output_memory_goes_back_to_the_thread_that_freed_it():
    # Blocks of 512 KiB and more come from a pool (csrc/sparse/memory_pool.cpp): a thread is given a block
    # it gave back itself before a more recent one of the same size from another thread (whose lines
    # the other core may hold), and another thread's when it has none of its own.
    import threading

    from fastprune.ops.sparse import release_cpu_memory

    weight = sparse_weight((64, 8, 3, 3), 0.5, seed=1)
    row_ptr, col_idx, values = dense_to_csr(weight)
    x = torch.randn(1, 8, 64, 64)  # a 64 x 64 x 64 float output: 1 MiB

    def conv():
        return sparse_conv2d(x, row_ptr, col_idx, values, None, 8, 3, 3, 1, 1, 1, 1, algo=4)

    release_cpu_memory()
    try:
        mine = conv()
        mine_at = mine.data_ptr()
        made, freed_mine = threading.Event(), threading.Event()
        theirs_at = []

        def other_thread():
            theirs = conv()
            theirs_at.append(theirs.data_ptr())
            made.set()
            freed_mine.wait()
            del theirs  # given back after mine: the most recent block of that size

        t = threading.Thread(target=other_thread)
        t.start()
        made.wait()
        del mine  # given back by this thread
        freed_mine.set()
        t.join()
        assert theirs_at[0] != mine_at
        assert conv().data_ptr() == mine_at  # this thread's own block, not the more recent one
        # (that output died at once: its block is this thread's again) another thread with none of
        # its own takes one of this thread's
        got = []
        t = threading.Thread(target=lambda: got.append(conv().data_ptr()))
        t.start()
        t.join()
        assert got[0] in (mine_at, theirs_at[0])
    finally:
        release_cpu_memory()


@pytest.mark.skipif(not fastprune.backends.extension_info()["cpp"], reason="needs the C++ extension")
def test_pooled_output_takes_the_most_recently_freed_block_large_enough():
    # A pooled output takes the block given back last that holds it, up to 8 times its size (its
    # lines are the likeliest still in cache), not only one of its own size; a smaller request than
    # an eighth of every free block gets new memory. Values stay right in a larger block.
    from fastprune.ops.sparse import release_cpu_memory

    x = torch.randn(1, 8, 64, 64)
    convs = {}
    for oc in (32, 64, 128, 512):  # outputs of 0.5, 1, 2 and 8 MiB (oc x 64 x 64 floats)
        weight = sparse_weight((oc, 8, 3, 3), 0.5, seed=oc)
        convs[oc] = (weight, *dense_to_csr(weight))

    def conv(oc):
        _, row_ptr, col_idx, values = convs[oc]
        return sparse_conv2d(x, row_ptr, col_idx, values, None, 8, 3, 3, 1, 1, 1, 1, algo=4)

    def want(oc):
        return F.conv2d(x.double(), convs[oc][0].double(), padding=1)

    release_cpu_memory()
    try:
        small, large = conv(64), conv(128)
        small_at, large_at = small.data_ptr(), large.data_ptr()
        del small
        del large  # the most recent: 2 MiB
        got = conv(64)  # 1 MiB: into the 2 MiB block, not its own size's older one
        assert got.data_ptr() == large_at
        torch.testing.assert_close(got.double(), want(64), atol=1e-5, rtol=1e-5)
        other = conv(64)  # the 2 MiB block is taken: the 1 MiB one
        assert other.data_ptr() == small_at
        torch.testing.assert_close(other.double(), want(64), atol=1e-5, rtol=1e-5)
        del got, other
        release_cpu_memory()
        huge = conv(512)
        huge_at = huge.data_ptr()
        del huge  # 8 MiB free: sixteen times a 0.5 MiB output
        tiny = conv(32)
        assert tiny.data_ptr() != huge_at
        torch.testing.assert_close(tiny.double(), want(32), atol=1e-5, rtol=1e-5)
        assert conv(64).data_ptr() == huge_at  # eight times: taken
    finally:
        release_cpu_memory()
