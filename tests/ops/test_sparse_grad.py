"""Gradients of the sparse ops: w.r.t. the input (a sparse transposed convolution on the forward's
kernels) and w.r.t. the CSR values (the dense weight gradient at the non-zeros only), against
float64 dense references on every layout, algorithm, stride and padding; opcheck of the weight-
gradient op; no host synchronisation on CUDA."""
import pytest
import torch
import torch.nn.functional as F

import fastprune
from fastprune.ops.sparse import (_CONV_SPEC, _LINEAR_SPEC, sparse_conv2d, sparse_conv2d_weight_grad, sparse_linear,
                                  to_batch_innermost)
from fastprune.reference.sparse import dense_to_csr

from ..conftest import GPU, backend_device_pairs
from .test_sparse import CONV_CASES, sparse_weight

LAYOUTS = {"contiguous": lambda t: t, "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
           "batch_innermost": to_batch_innermost}

# Beyond the forward's cases: unequal strides, stride 3, padding wider than half the kernel, a 1x1
# kernel with padding (its input gradient falls back to the dense transposed convolution), and
# batches of 8 and more (the input gradient runs on the tiled algorithm there; 17: a partial block).
GRAD_CASES = CONV_CASES + [(2, 3, 9, 10, 4, 3, (1, 2), 1, 0.6), (3, 2, 11, 11, 3, 3, 3, 2, 0.5),
                           (2, 3, 7, 7, 4, 1, 1, 1, 0.5), (5, 4, 9, 9, 5, 5, 2, 2, 0.8),
                           (9, 4, 8, 8, 6, 3, 1, 1, 0.7), (17, 3, 9, 9, 5, 3, 2, 1, 0.6), (8, 5, 6, 6, 4, 1, 2, 0, 0.5)]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _reference(x, weight, bias, stride, pad, grad):
    """(dL/dx, dL/dW, dL/db) of the dense convolution in float64."""
    xd = x.detach().double().requires_grad_()
    wd = weight.double().requires_grad_()
    bd = bias.double().requires_grad_()
    y = F.conv2d(xd, wd, bd, stride=stride, padding=pad)
    return torch.autograd.grad(y, (xd, wd, bd), grad.double())


def _case_inputs(case, device):
    """x, the sparse weight (dense), bias, its CSR arrays, stride and padding of a case, seeded by it;
    and the generator, for the gradient drawn next."""
    n, c, h, w, oc, k, stride, pad, sparsity = case
    gen = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    weight = sparse_weight((oc, c, k, k), sparsity, seed=n * 5 + c).to(device)
    bias = torch.randn(oc, generator=gen).to(device)
    return x, weight, bias, dense_to_csr(weight), _pair(stride), _pair(pad), gen


@pytest.mark.parametrize("backend,device", backend_device_pairs(_CONV_SPEC))
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_input_and_value_gradients_match_the_dense_convolution(backend, device, case):
    n, c, h, w, oc, k = case[:6]
    x, weight, bias, (row_ptr, col_idx, values), stride, pad, gen = _case_inputs(case, device)
    ho, wo = ((h + 2 * pad[0] - k) // stride[0] + 1), ((w + 2 * pad[1] - k) // stride[1] + 1)
    grad = torch.randn(n, oc, ho, wo, generator=gen).to(device)
    want_x, want_w, want_b = _reference(x, weight, bias, stride, pad, grad)
    rows = torch.repeat_interleave(torch.arange(oc, device=device), (row_ptr[1:] - row_ptr[:-1]).long())
    want_values = want_w.reshape(oc, -1)[rows, col_idx.long()]
    algos = [0] if device.type == "cuda" else [0, 1, 3] + ([2] if stride in ((1, 1), (2, 2)) else [])
    with fastprune.use_backend(backend):
        for algo in algos:
            for layout, to_layout in LAYOUTS.items():
                if algo == 2 and layout != "contiguous":
                    continue
                xin = to_layout(x).requires_grad_()
                v = values.clone().requires_grad_()
                b = bias.clone().requires_grad_()
                y = sparse_conv2d(xin, row_ptr, col_idx, v, b, c, k, k, *stride, *pad, algo=algo)
                got_x, got_v, got_b = torch.autograd.grad(y, (xin, v, b), to_layout(grad) if layout != "contiguous"
                                                          else grad)
                scale = want_x.abs().max().item() + 1
                where = f"algo {algo}, {layout}"
                torch.testing.assert_close(got_x.double(), want_x, atol=1e-5 * scale, rtol=1e-5, msg=where)
                value_scale = want_values.abs().max().item() if want_values.numel() else 0.0
                torch.testing.assert_close(got_v.double(), want_values, atol=1e-4 * (value_scale + 1), rtol=1e-5,
                                           msg=where)
                torch.testing.assert_close(got_b.double(), want_b, atol=1e-4, rtol=1e-5, msg=where)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_LINEAR_SPEC))
@pytest.mark.parametrize("n,fin,fout,sparsity", [(1, 7, 5, 0.5), (9, 33, 17, 0.9), (4, 10, 3, 1.0), (3, 8, 6, 0.0)])
def test_sparse_linear_gradients_match_the_dense_layer(backend, device, n, fin, fout, sparsity):
    gen = torch.Generator().manual_seed(n + fin)
    x = torch.randn(n, fin, generator=gen).to(device)
    weight = sparse_weight((fout, fin), sparsity, seed=fin).to(device)
    bias = torch.randn(fout, generator=gen).to(device)
    grad = torch.randn(n, fout, generator=gen).to(device)
    row_ptr, col_idx, values = dense_to_csr(weight)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, weight, bias))
    want_x, want_w, want_b = torch.autograd.grad(F.linear(xd, wd, bd), (xd, wd, bd), grad.double())
    rows = torch.repeat_interleave(torch.arange(fout, device=device), (row_ptr[1:] - row_ptr[:-1]).long())
    with fastprune.use_backend(backend):
        xs, v, b = x.clone().requires_grad_(), values.clone().requires_grad_(), bias.clone().requires_grad_()
        got_x, got_v, got_b = torch.autograd.grad(sparse_linear(xs, row_ptr, col_idx, v, b, fin), (xs, v, b), grad)
    torch.testing.assert_close(got_x.double(), want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v.double(), want_w[rows, col_idx.long()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_b.double(), want_b, atol=1e-5, rtol=1e-5)


def test_the_weight_gradient_op_passes_opcheck_and_matches_its_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 9, 8, generator=gen)
    weight = sparse_weight((5, 4, 3, 3), 0.7, seed=3)
    row_ptr, col_idx, _ = dense_to_csr(weight)
    for stride, pad in (((1, 1), (1, 1)), ((2, 1), (0, 2))):
        ho, wo = (9 + 2 * pad[0] - 3) // stride[0] + 1, (8 + 2 * pad[1] - 3) // stride[1] + 1
        grad = torch.randn(3, 5, ho, wo, generator=gen)
        args = (x, grad, row_ptr, col_idx, 4, 3, 3, *stride, *pad)
        torch.library.opcheck(sparse_conv2d_weight_grad, args)
        with fastprune.use_backend("reference"):
            want = sparse_conv2d_weight_grad(*args)
        torch.testing.assert_close(sparse_conv2d_weight_grad(*args), want, atol=1e-4, rtol=1e-5)
        # channels_last inputs are read as well
        torch.testing.assert_close(sparse_conv2d_weight_grad(x.contiguous(memory_format=torch.channels_last),
                                                             *args[1:]), want, atol=1e-4, rtol=1e-5)


def test_opcheck_of_the_sparse_conv_with_trainable_values():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, 6, generator=gen, requires_grad=True)
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((4, 3, 3, 3), 0.6, seed=4))
    values.requires_grad_()
    bias = torch.randn(4, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.fastprune.sparse_conv2d.default,
                          (x, row_ptr, col_idx, values, bias, 3, 3, 3, 2, 2, 1, 1, 0, None))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_sparse_backward_does_not_synchronise_with_the_host():
    # A finetune step on the GPU: forward (ReLU and pooling fused), input and weight gradients, and
    # the values updated in place, after which the next step refreshes the weight's tiled form.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 16, 16, 16, generator=gen).cuda().requires_grad_()
    row_ptr, col_idx, values = (t.cuda() for t in dense_to_csr(sparse_weight((32, 16, 3, 3), 0.9, seed=5)))
    values.requires_grad_()

    def step():
        for stride, epilogue in ((2, 0), (1, 2)):
            y = sparse_conv2d(x, row_ptr, col_idx, values, None, 16, 3, 3, stride, stride, 1, 1, epilogue)
            grad_x, grad_values = torch.autograd.grad(y.square().sum(), (x, values))
            with torch.no_grad():
                values.sub_(1e-3 * grad_values)

    step()  # builds the cached weight patterns (one sync per pattern, before any capture)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_an_input_gradient_alone_skips_the_weight_gradient(monkeypatch):
    # An attack on a model being finetuned asks for d/dx only: the values' gradient (the forward's
    # cost again) must not be computed; a training step's backward computes it. The attack loop
    # is what the test mirrors: fastprune.attacks' loss_and_grad.
    import fastprune.ops.sparse as ops

    calls = []
    real = ops.sparse_conv2d_weight_grad
    monkeypatch.setattr(ops, "sparse_conv2d_weight_grad", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 6, 6, generator=gen, requires_grad=True)
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((4, 3, 3, 3), 0.6, seed=6))
    values = torch.nn.Parameter(values)
    from fastprune.utils.autograd import input_gradients_only

    y = sparse_conv2d(x, row_ptr, col_idx, values, None, 3, 3, 3, 1, 1, 1, 1)
    with input_gradients_only():  # what fastprune's attacks (and TRADES' inner maximisation) say
        (gx,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
    assert gx.shape == x.shape and not calls and values.grad is None
    y.square().sum().backward()
    assert len(calls) == 1 and values.grad is not None


def test_attacks_on_a_model_being_finetuned_compute_no_weight_gradient(monkeypatch):
    import fastprune.ops.sparse as ops
    from fastprune.attacks import PGD
    from fastprune.models import get_model
    from fastprune.nn import SparseConv2d, prune_model
    from fastprune.nn.sparse.training import to_sparse_training
    from fastprune.train.objectives import TRADES

    calls = []
    real = ops.sparse_conv2d_weight_grad
    monkeypatch.setattr(ops, "sparse_conv2d_weight_grad", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = to_sparse_training(prune_model(get_model("cnn-small", 10, 1), 0.8, method="magnitude")).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    PGD(model, eps=0.1, alpha=0.02, steps=3)(x, y)
    TRADES(0.1, 0.02, 3).adversarial(model, x)
    assert not calls
    TRADES(0.1, 0.02, 3)(model.train(), x, y).backward()  # the training step's own backward: computed
    convs = sum(isinstance(m, SparseConv2d) for m in model.modules())
    assert convs > 0 and len(calls) == 2 * convs  # TRADES' loss runs each conv on x and on x_adv


@pytest.mark.parametrize("backend,device", [p for p in backend_device_pairs(_CONV_SPEC) if p.values[0] != "cpp"])
@pytest.mark.parametrize("case", [
    # (n, c, h, w, oc, k, stride, pad, sparsity): several tiles (oc 37), several column blocks per
    # tile, positions split over programs (n*h'*w' > 256) with a partial last block, strides 2 and 3
    (3, 4, 16, 15, 37, 3, 1, 1, 0.5), (2, 6, 13, 13, 20, 3, 2, 1, 0.8), (1, 3, 9, 11, 5, 5, (3, 2), 2, 0.3),
    (5, 2, 7, 7, 17, 1, 1, 0, 0.0), (2, 3, 6, 6, 16, 3, 1, 1, 1.0)], ids=str)
def test_gpu_weight_gradient_samples_the_dense_gradient_at_the_non_zeros(backend, device, case, monkeypatch):
    # The GPU weight gradient (Triton, on the tiled form): the float64 dense weight gradient at the
    # CSR entries, in CSR order, for contiguous and channels_last inputs.
    import fastprune.kernels.sparse as kernels

    calls = []
    real = kernels.sparse_conv2d_weight_grad
    monkeypatch.setattr(kernels, "sparse_conv2d_weight_grad", lambda *a: calls.append(1) or real(*a))
    n, c, h, w, oc, k, stride, pad, sparsity = case
    stride, pad = _pair(stride), _pair(pad)
    gen = torch.Generator().manual_seed(n * 100 + oc)
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    weight = sparse_weight((oc, c, k, k), sparsity, seed=oc + c).to(device)
    row_ptr, col_idx, _ = dense_to_csr(weight)
    ho, wo = (h + 2 * pad[0] - k) // stride[0] + 1, (w + 2 * pad[1] - k) // stride[1] + 1
    grad = torch.randn(n, oc, ho, wo, generator=gen).to(device)
    _, want_w, _ = _reference(x, weight, torch.zeros(oc, device=device), stride, pad, grad)
    rows = torch.repeat_interleave(torch.arange(oc, device=device), (row_ptr[1:] - row_ptr[:-1]).long())
    want = want_w.reshape(oc, -1)[rows, col_idx.long()]
    with fastprune.use_backend(backend):
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            got = sparse_conv2d_weight_grad(xin, grad, row_ptr, col_idx, c, k, k, *stride, *pad)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, atol=1e-4 * (want.abs().max().item() + 1) if want.numel()
                                       else 0, rtol=1e-5)
    assert len(calls) == 2


def test_the_gpu_weight_form_follows_value_updates_on_its_cached_pattern():
    # A finetune step updates the values in place: the tiled form must follow them, rebuilt from the
    # cached pattern (the part that syncs with the host), with an explicit zero kept in its slot.
    from fastprune.ops.sparse import tiled_pattern, tiled_weight

    weight = sparse_weight((21, 3, 3, 3), 0.7, seed=9)
    row_ptr, col_idx, values = dense_to_csr(weight)
    bias = torch.randn(21)
    first = tiled_weight(row_ptr, col_idx, values, bias, 27)
    assert torch.equal(first.to_dense(), weight.reshape(21, -1))
    with torch.no_grad():
        values.mul_(-2.0)
        values[0] = 0.0
        bias.add_(1.0)
    second = tiled_weight(row_ptr, col_idx, values, bias, 27)
    want = weight.reshape(21, -1) * -2.0
    want[0, col_idx[0]] = 0.0
    assert second is not first and second.pattern is first.pattern is tiled_pattern(row_ptr, col_idx, 27)
    assert torch.equal(second.to_dense(), want) and torch.equal(second.bias[:21], bias)
    assert torch.equal(second.tile_cols, first.tile_cols)  # the zero keeps its column: the pattern is frozen
    assert tiled_weight(row_ptr, col_idx, values, bias, 27) is second  # unchanged values: the cached form


# ReLU then 2x2 max pooling fused (epilogue 2): odd edges, stride 2, the direct algorithm's width,
# batches on the tiled algorithm (9, 17), batches the generated one runs (16, 32: it pools after its
# conv, the window positions included), unequal strides (pooled after the kernel there).
POOL_CASES = [(2, 5, 9, 7, 6, 3, 1, 1, 0.5), (3, 4, 8, 8, 6, 3, 2, 1, 0.7), (2, 3, 17, 20, 5, 3, 1, 1, 0.8),
              (9, 4, 8, 8, 6, 3, 1, 1, 0.7), (17, 3, 9, 9, 5, 3, 2, 1, 0.6), (16, 4, 8, 7, 26, 3, 1, 1, 0.7),
              (32, 3, 9, 9, 5, 3, 2, 1, 0.6), (2, 3, 6, 9, 4, 3, (1, 2), 1, 0.5)]


def _window_positions(y: torch.Tensor) -> torch.Tensor:
    """2 dy + dx of each 2x2 window's maximum, from PyTorch's own max pooling indices."""
    _, flat = F.max_pool2d(y, 2, return_indices=True)
    py = torch.arange(flat.shape[2], device=y.device)[:, None]
    px = torch.arange(flat.shape[3], device=y.device)[None, :]
    return 2 * (flat // y.shape[3] - 2 * py) + (flat % y.shape[3] - 2 * px)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_CONV_SPEC))
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_the_fused_pooling_is_differentiated_through_its_window_positions(backend, device, case):
    from fastprune.ops.sparse import sparse_conv2d_relu_pool

    c, oc, k = case[1], case[4], case[5]
    x, weight, bias, (row_ptr, col_idx, values), stride, pad, gen = _case_inputs(case, device)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, weight, bias))
    conv = F.relu(F.conv2d(xd, wd, bd, stride=stride, padding=pad))
    want_y = F.max_pool2d(conv, 2)
    grad = torch.randn(want_y.shape, generator=gen, dtype=torch.float64).to(device)
    want_x, want_w, want_b = torch.autograd.grad(want_y, (xd, wd, bd), grad)
    rows = torch.repeat_interleave(torch.arange(oc, device=device), (row_ptr[1:] - row_ptr[:-1]).long())
    want_values = want_w.reshape(oc, -1)[rows, col_idx.long()]
    positions = _window_positions(conv.detach())
    algos = [0] if device.type == "cuda" else [0, 1, 3] + ([2] if stride in ((1, 1), (2, 2)) else []) + (
        [4, 5] if stride[0] == stride[1] else [])
    with fastprune.use_backend(backend):
        for algo in algos:
            for layout, to_layout in LAYOUTS.items():
                if algo == 2 and layout != "contiguous":
                    continue
                where = f"algo {algo}, {layout}"
                xin = to_layout(x).requires_grad_()
                v, b = values.clone().requires_grad_(), bias.clone().requires_grad_()
                y = sparse_conv2d(xin, row_ptr, col_idx, v, b, c, k, k, *stride, *pad, 2, algo=algo)
                torch.testing.assert_close(y.double(), want_y.detach(), atol=1e-5, rtol=1e-5, msg=where)
                got_x, got_v, got_b = torch.autograd.grad(y, (xin, v, b), grad.float())
                torch.testing.assert_close(got_x.double(), want_x, atol=1e-5 * (want_x.abs().max().item() + 1),
                                           rtol=1e-5, msg=where)
                torch.testing.assert_close(got_v.double(), want_values, rtol=1e-5,
                                           atol=1e-4 * (want_values.abs().max().item() + 1), msg=where)
                torch.testing.assert_close(got_b.double(), want_b, atol=1e-4, rtol=1e-5, msg=where)
                # the window positions the backward pass uses: PyTorch's wherever the output is positive
                pooled, index = sparse_conv2d_relu_pool(to_layout(x), row_ptr, col_idx, values, bias, c, k, k,
                                                        *stride, *pad, algo)
                assert index.dtype == torch.uint8 and index.shape == pooled.shape
                assert index.stride() == pooled.stride(), where
                live = pooled > 0
                assert torch.equal(index[live].long(), positions[live]), where


def test_opcheck_of_the_fused_pooling_op():
    from fastprune.ops.sparse import sparse_conv2d_relu_pool

    gen = torch.Generator().manual_seed(7)
    row_ptr, col_idx, values = dense_to_csr(sparse_weight((4, 3, 3, 3), 0.5, seed=7))
    values.requires_grad_()
    bias = torch.randn(4, generator=gen, requires_grad=True)
    for algo, x in ((0, torch.randn(2, 3, 8, 8, generator=gen)), (4, to_batch_innermost(torch.randn(3, 3, 7, 9))),
                    (5, to_batch_innermost(torch.randn(16, 3, 7, 9)))):
        torch.library.opcheck(sparse_conv2d_relu_pool,
                              (x.requires_grad_(), row_ptr, col_idx, values, bias, 3, 3, 3, 1, 1, 1, 1, algo))
