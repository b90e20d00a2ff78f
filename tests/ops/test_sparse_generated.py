"""The CPU sparse conv's generated algorithm (algo 5: AVX-512 machine code written per layer for its
non-zero pattern, csrc/sparse/generated.cpp) against F.conv2d in float64: chunks of input channels,
groups of 24 output channels and a partial last group, strides, kernel sizes, paddings, epilogues,
thread counts; the cases it hands to the tiled algorithm; its code cache; patterns it refuses."""
import pytest
import torch
import torch.nn.functional as F

import fastprune
from fastprune.ops.sparse import (GENERATED_MAX_NONZEROS, generated_applicable, generated_supported, is_batch_innermost,
                                  sparse_conv2d, to_batch_innermost)
from fastprune.reference.sparse import dense_to_csr

from .test_sparse import sparse_weight

pytestmark = pytest.mark.skipif(not fastprune.backends.extension_info()["cpp"], reason="needs the C++ extension")

LAYOUTS = (lambda t: t, lambda t: t.contiguous(memory_format=torch.channels_last), to_batch_innermost)


def _expected(x, weight, bias, stride, pad, residual):
    conv = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=pad)
    wants = {0: conv, 1: F.relu(conv), 3: F.relu(conv + residual.double()) if residual is not None else None}
    if min(conv.shape[-2:]) >= 2:  # (a map of one row or column has no 2x2 window to pool)
        wants[2] = F.max_pool2d(F.relu(conv), 2)
    return wants


# (N, C, H, W, OC, k, stride, padding, sparsity): batches of 16-64 (the generated code) and others
# (the tiled algorithm runs them: 1, 17, 20); one chunk of input channels (C = 3) and several (C = 40
# at 50%: chunks of 8, more than 128 weights a chunk); 7, 24, 25 and 50 output channels (one partial
# group, one whole, a group and one channel, two and a partial); 1x1, 3x3, 5x5, 7x7 (taps past the
# 31st: another skip instruction) and 9x9 (taps past the 64th: never skipped); strides 1 and 2; maps
# of 1x1 (only the centre tap inside), 2x2, 1 row, 1 column (the border taps skipped); an all-zero layer.
CASES = [
    (16, 3, 8, 8, 7, 3, 1, 1, 0.5),
    (32, 40, 6, 5, 30, 3, 1, 1, 0.5),
    (16, 40, 9, 9, 25, 3, 2, 1, 0.6),
    (48, 24, 4, 4, 50, 1, 1, 0, 0.7),
    (16, 17, 7, 7, 24, 1, 2, 0, 0.5),
    (16, 12, 9, 8, 10, 5, 1, 2, 0.8),
    (64, 20, 2, 2, 26, 3, 1, 1, 0.9),
    (16, 6, 5, 5, 9, 3, 1, 1, 1.0),
    (16, 10, 1, 1, 30, 3, 1, 1, 0.5),
    (32, 9, 1, 6, 26, 3, 1, 1, 0.5),
    (16, 9, 7, 1, 20, 3, 2, 1, 0.5),
    (16, 5, 9, 8, 10, 7, 1, 3, 0.5),
    (16, 3, 10, 11, 6, 9, 2, 4, 0.5),
    (1, 8, 6, 6, 5, 3, 1, 1, 0.5),
    (17, 8, 6, 6, 5, 3, 2, 1, 0.5),
    (20, 8, 6, 6, 30, 3, 1, 1, 0.5),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_generated_algorithm_matches_conv2d(case):
    n, c, h, w, oc, k, stride, pad, sparsity = case
    gen = torch.Generator().manual_seed(n * 31 + c)
    weight = sparse_weight((oc, c, k, k), sparsity, seed=n + oc, empty_row=True)
    bias = torch.randn(oc, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    x = torch.randn(n, c, h, w, generator=gen)
    residual = torch.randn(n, oc, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, generator=gen)
    # each layout its own input values (x scaled): a result left from the previous call cannot pass
    for scale, to_layout in enumerate(LAYOUTS, start=1):
        wants = _expected(x * scale, weight, bias, stride, pad, residual)
        for epilogue, want in wants.items():
            got = sparse_conv2d(to_layout(x * scale), row_ptr, col_idx, values, bias, c, k, k, stride, stride, pad,
                                pad, epilogue, residual if epilogue == 3 else None, algo=5)
            assert got.shape == want.shape and is_batch_innermost(got)
            torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-5)


def test_generated_algorithm_on_a_layer_of_a_quarter_million_non_zeros():
    # ResNet-18's 512->512 conv at 90%: hundreds of chunks of code, 22 groups of output channels,
    # weight displacements far past one byte's reach; the generated code must run it (not the tiled
    # fallback) and match float64.
    gen = torch.Generator().manual_seed(5)
    weight = sparse_weight((512, 512, 3, 3), 0.9, seed=5)
    bias = torch.randn(512, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    x = torch.randn(16, 512, 4, 4, generator=gen)
    assert 200_000 < values.numel() <= GENERATED_MAX_NONZEROS
    assert generated_applicable(x, (1, 1), values.numel()) == generated_supported()
    want = _expected(x, weight, bias, 1, 1, None)[1]
    got = sparse_conv2d(to_batch_innermost(x), row_ptr, col_idx, values, bias, 512, 3, 3, 1, 1, 1, 1, 1, algo=5)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_generated_algorithm_over_any_thread_count(threads):
    # Items (batch block, band of rows, group of 24 output channels) split over the threads: more
    # threads than items too (one block, one band, two groups).
    gen = torch.Generator().manual_seed(threads)
    weight = sparse_weight((40, 16, 3, 3), 0.7, seed=threads)
    bias = torch.randn(40, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, hw in ((32, 8), (16, 2)):
            x = torch.randn(n, 16, hw, hw, generator=gen)
            residual = torch.randn(n, 40, hw, hw, generator=gen)
            want = _expected(x, weight, bias, 1, 1, residual)[3]
            got = sparse_conv2d(to_batch_innermost(x), row_ptr, col_idx, values, bias, 16, 3, 3, 1, 1, 1, 1, 3,
                                residual, algo=5)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("n,stride", [(32, 1), (48, 2), (64, 1), (80, 2)], ids=str)
def test_generated_algorithm_stages_each_threads_blocks(n, stride, threads):
    # Several batch blocks over several threads: each thread stages the blocks its items read into its
    # own memory (a block cut between threads staged by both: 3 and 5 threads), from every input layout
    # (a block of a batch-innermost input is a strided view). The staging memory is first filled from an
    # input of NaN: a block staged from the wrong images, or not at all, shows.
    gen = torch.Generator().manual_seed(n * 7 + threads)
    weight = sparse_weight((30, 12, 3, 3), 0.6, seed=n + threads)
    bias = torch.randn(30, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    x = torch.randn(n, 12, 7, 6, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for scale, to_layout in enumerate(LAYOUTS, start=1):
            want = _expected(x * scale, weight, bias, stride, 1, None)[1]
            sparse_conv2d(to_layout(torch.full_like(x, float("nan"))), row_ptr, col_idx, values, bias, 12, 3, 3,
                          stride, stride, 1, 1, 1, algo=5)
            got = sparse_conv2d(to_layout(x * scale), row_ptr, col_idx, values, bias, 12, 3, 3, stride, stride, 1, 1,
                                1, algo=5)
            torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_generated_code_follows_values_and_patterns_changed_under_its_cache():
    # The code is cached per (col_idx, values) tensors and their versions and the geometry: values
    # changed in place (a training step), a pattern moved in place, new tensors, another batch or map
    # size must each give the convolution of what they hold.
    gen = torch.Generator().manual_seed(5)
    weight = sparse_weight((30, 12, 3, 3), 0.6, seed=5)
    row_ptr, col_idx, values = dense_to_csr(weight)

    def check(x, col_idx, values, weight):
        got = sparse_conv2d(x, row_ptr, col_idx, values, None, 12, 3, 3, 1, 1, 1, 1, algo=5)
        torch.testing.assert_close(got.double(), F.conv2d(x.double(), weight.double(), padding=1), atol=1e-5,
                                   rtol=1e-5)

    x = torch.randn(16, 12, 6, 6, generator=gen)
    check(x, col_idx, values, weight)
    with torch.no_grad():
        values.mul_(-2.0)  # in place: the version counter moves
    check(x, col_idx, values, weight * -2.0)
    check(torch.randn(32, 12, 6, 6, generator=gen), col_idx, values, weight * -2.0)
    check(torch.randn(16, 12, 7, 5, generator=gen), col_idx, values, weight * -2.0)
    rows = torch.repeat_interleave(torch.arange(30), (row_ptr[1:] - row_ptr[:-1]).long())
    with torch.no_grad():  # every non-zero to the next tap of its row, in place
        col_idx.copy_((col_idx + 1) % 108)
        order = torch.argsort(rows * 108 + col_idx.long())
        col_idx.copy_(col_idx[order])
        values = values[order].clone()
    moved = torch.zeros(30, 108)
    moved[rows, col_idx.long()] = values
    check(x, col_idx, values, moved.reshape(30, 12, 3, 3))
    for shift in range(1, 4):  # fresh tensors, each freed before the next is made
        rolled = torch.roll(weight, shift, dims=1)
        _, c2, v2 = dense_to_csr(rolled)
        check(x, c2, v2, rolled)


@pytest.mark.skipif(not generated_supported(), reason="no AVX-512 here: the tiled algorithm runs algo 5")
def test_generated_algorithm_refuses_columns_out_of_range():
    # The pattern becomes addresses in the code: a column past the layer's input is an error, not a read
    # somewhere else.
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((5, 4, 3, 3), 0.5, seed=3))
    bad = col_idx.clone()
    bad[-1] = 4 * 9
    with pytest.raises(RuntimeError, match="col_idx"):
        sparse_conv2d(torch.randn(16, 4, 6, 6), row_ptr, bad, values, None, 4, 3, 3, 1, 1, 1, 1, algo=5)


def test_generated_applicable_says_where_the_code_runs():
    x = torch.randn(32, 4, 6, 6)
    supported = generated_supported()
    assert generated_applicable(x, (1, 1), 100) == supported
    assert generated_applicable(x, (2, 2), GENERATED_MAX_NONZEROS) == supported
    assert not generated_applicable(x, (1, 2), 100)  # unequal strides
    assert generated_applicable(x, (1, 1), 100, pool=True) == supported  # pooling after the conv
    assert not generated_applicable(torch.randn(20, 4, 6, 6), (1, 1), 100)  # not whole vectors of images
    assert not generated_applicable(x, (1, 1), GENERATED_MAX_NONZEROS + 1)  # code past its size bound


def _in_nan_frame(x: torch.Tensor, plane_stride: int, sw_factor: int = 1) -> torch.Tensor:
    """x (N, C, H, W) batch innermost inside a buffer of NaN: each channel plane ``plane_stride`` floats
    from the last (at least its size), the batch ``sw_factor`` times wider than x (x one slice of it),
    and NaN before the first plane and after the last: a tap read outside the image shows in the output."""
    n, c, h, w = x.shape
    wide = n * sw_factor
    buf = torch.full((64 + c * plane_stride + 64,), float("nan"))
    view = buf[64:64 + c * plane_stride].view(c, plane_stride)[:, :h * w * wide].view(c, h, w, wide)
    view[..., :n] = x.permute(1, 2, 3, 0)
    return view[..., :n].permute(3, 0, 1, 2)


# (N, C, H, W, OC, k, stride, padding): maps whose planes are 4 KiB multiples at batch 16 (8x8, 16x16:
# read from a staged copy) and others (read in place), 1x1 to 7x7 kernels, strides 1-3; outputs at most
# 4 wide over several batch blocks read in place (a call runs a position over all the blocks: 4x4 and
# 2x2 maps, 3 rows of 4 whose pooling drops the last, a stride-2 layer down to 4x4).
PADDED_CASES = [
    (16, 12, 8, 8, 30, 3, 1, 1),
    (16, 9, 16, 16, 26, 3, 2, 1),
    (32, 10, 5, 7, 25, 3, 1, 1),
    (16, 8, 9, 9, 24, 1, 2, 0),
    (16, 6, 11, 10, 10, 5, 3, 2),
    (48, 7, 6, 6, 20, 7, 1, 3),
    (16, 20, 4, 4, 50, 3, 1, 1),
    (48, 20, 4, 4, 50, 3, 1, 1),
    (64, 24, 2, 2, 30, 3, 1, 1),
    (32, 9, 3, 4, 26, 3, 1, 1),
    (32, 10, 8, 8, 25, 3, 2, 1),
]


@pytest.mark.skipif(not generated_supported(), reason="no AVX-512 here: the tiled algorithm runs algo 5")
@pytest.mark.parametrize("case", PADDED_CASES, ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_generated_inference_path_pads_output_planes_and_reads_inputs_in_place(case, threads):
    # SparseModel's inference path (sparse_conv2d_cpu_inference) asks the generated algorithm for output
    # planes one vector apart more than their size (algo 6), which the next generated layer reads in
    # place: every epilogue's values against float64, the strides, and inputs in a frame of NaN (padded
    # planes, a slice of a wider batch, strides 1-3), which any read past the image would carry out.
    from fastprune.ops.sparse import EPILOGUES, sparse_conv2d_cpu_inference

    n, c, h, w, oc, k, stride, pad = case
    gen = torch.Generator().manual_seed(n + c * 7 + threads)
    weight = sparse_weight((oc, c, k, k), 0.6, seed=c + oc, empty_row=True)
    bias = torch.randn(oc, generator=gen)
    row_ptr, col_idx, values = dense_to_csr(weight)
    x = torch.randn(n, c, h, w, generator=gen)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    residual = torch.randn(n, oc, ho, wo, generator=gen)
    wants = _expected(x, weight, bias, stride, pad, residual)
    inputs = {"contiguous planes": to_batch_innermost(x), "padded planes": _in_nan_frame(x, h * w * n + 16),
              "slice of a wider batch": _in_nan_frame(x, h * w * n * 2 + 48, sw_factor=2)}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for what, xin in inputs.items():
                for epilogue, want in wants.items():
                    res = residual if epilogue == 3 else None
                    got = sparse_conv2d_cpu_inference(xin, row_ptr, col_idx, values, bias, (k, k, stride, stride, pad, pad),
                                                      5, epilogue, res)
                    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=f"{what}, epilogue {epilogue}")
                    oh, ow = want.shape[-2:]
                    assert got.stride() == (1, oh * ow * n + 16, ow * n, n), (what, epilogue)
                # a residual in the output's own padded layout (the usual case in a ResNet block) is read in place
                padded_res = _in_nan_frame(residual, ho * wo * n + 16)
                got = sparse_conv2d_cpu_inference(xin, row_ptr, col_idx, values, bias, (k, k, stride, stride, pad, pad),
                                                  5, EPILOGUES["add_relu"], padded_res)
                torch.testing.assert_close(got.double(), wants[3], atol=1e-5, rtol=1e-5, msg=what)
    finally:
        torch.set_num_threads(before)
