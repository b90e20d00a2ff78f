"""Sparse inference modules: SparseConv2d/SparseLinear, sparsify on whole models (graph passes,
layouts, micro-batches), save/load, gradients for attacks, torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastprune.models import get_model
from fastprune.nn import SparseConv2d, SparseLinear, fold_masks, prune_model, sparsify

from ..conftest import GPU
from ..ops.test_sparse import LAYOUT_INPUTS


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
    # on the CPU the tuner never offers it, and a layer refuses it
    from fastprune.nn.sparse.tuner import _options

    model = prune_model(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), 0.5, "magnitude", pattern="2:4")
    sparse = sparsify(model, benchmark=False, min_sparsity=0.4)
    layer = sparse.sparse_layers()["0"]
    assert not layer.semi_structured_usable(torch.rand(2, 64)) and "2:4" not in _options(layer, torch.rand(2, 64), "")



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



def test_fast_adaptive_avg_pooling_equals_pytorch():
    from fastprune.nn.sparse import FastAdaptiveAvgPool2d
    from fastprune.ops.sparse import to_batch_innermost

    def padded_planes(x):  # batch innermost, channel planes 16 floats further apart (the generated convs' output)
        n, c, h, w = x.shape
        buf = torch.full((c, h * w * n + 16), float("nan"))
        view = buf[:, :h * w * n].view(c, h, w, n)
        view.copy_(x.permute(1, 2, 3, 0))
        return view.permute(3, 0, 1, 2)

    for size in (2, (2, 3), 1):
        pool = FastAdaptiveAvgPool2d.from_module(nn.AdaptiveAvgPool2d(size))
        # broadcast, multiples, other, global pooling of 16 images and of one
        for shape in [(2, 3, 1, 1), (2, 3, 8, 6), (1, 4, 7, 9), (2, 2, 4, 12), (16, 5, 4, 4), (1, 6, 4, 4)]:
            x = torch.randn(shape)
            for xin in (x, x.contiguous(memory_format=torch.channels_last), to_batch_innermost(x), padded_planes(x)):
                torch.testing.assert_close(pool(xin), F.adaptive_avg_pool2d(x, size), atol=1e-6, rtol=1e-6)
    # a 1 x 1 batch-innermost input broadcast stays batch innermost: flattened, its transpose is
    # contiguous (what the CPU sparse linear reads without a copy)
    out = FastAdaptiveAvgPool2d.from_module(nn.AdaptiveAvgPool2d(2))(padded_planes(torch.randn(16, 5, 1, 1)))
    assert out.stride() == (1, 4 * 16, 2 * 16, 16) and torch.flatten(out, 1).t().is_contiguous()
    assert FastAdaptiveAvgPool2d.replaces(nn.AdaptiveAvgPool2d(2))
    assert not FastAdaptiveAvgPool2d.replaces(nn.AdaptiveAvgPool2d((None, 2)))
    assert not FastAdaptiveAvgPool2d.replaces(nn.AdaptiveMaxPool2d(2))



@pytest.mark.parametrize("choice", ["auto", "batch_innermost", "dense"])
@pytest.mark.parametrize("epilogue", [0, 1, 2, 3])
def test_sparse_layers_give_input_gradients_for_attacks(epilogue, choice, device):
    # attacks on a sparse model need dL/dx: checked against the dense layers in float64
    torch.manual_seed(epilogue)
    dense = nn.Conv2d(4, 6, 3, stride=1, padding=1).double().to(device)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) > 0.6)
    layer = SparseConv2d.from_dense(copy.deepcopy(dense).float())
    layer.epilogue, layer.choice = epilogue, "auto" if choice == "batch_innermost" and device.type != "cpu" else choice
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    residual = (torch.randn(3, 6, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
                if epilogue == 3 else None)
    want = dense(x)
    want = {0: want, 1: F.relu(want), 2: F.max_pool2d(F.relu(want), 2)}.get(epilogue, F.relu(want + residual)
                                                                          if residual is not None else want)
    g = torch.randn_like(want)
    inputs = (x,) if residual is None else (x, residual)
    want_grads = torch.autograd.grad(want, inputs, g)
    xf = x.detach().float().requires_grad_()
    rf = None if residual is None else residual.detach().float().requires_grad_()
    got = layer(xf, rf)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    got_grads = torch.autograd.grad(got, (xf,) if rf is None else (xf, rf), g.float())
    for got_grad, want_grad in zip(got_grads, want_grads):  # the input's, and the residual's
        torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-5, rtol=1e-5)
    lin = nn.Linear(7, 5).double().to(device)
    sparse_lin = SparseLinear.from_dense(copy.deepcopy(lin).float())
    sparse_lin.choice = "dense" if choice == "dense" else "csr"
    v = torch.randn(4, 7, dtype=torch.float64, device=device, requires_grad=True)
    want_grad = torch.autograd.grad(lin(v), v, torch.ones(4, 5, dtype=torch.float64, device=device))[0]
    vf = v.detach().float().requires_grad_()
    got_grad = torch.autograd.grad(sparse_lin(vf), vf, torch.ones(4, 5, device=device))[0]
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-5, rtol=1e-5)



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


def test_sparse_linear_takes_any_leading_dimensions():
    """As nn.Linear: (..., in) -> (..., out), a transformer's (batch, tokens, features) included, on
    the sparse kernel and on the dense choice; and sparsify runs a model that applies it to tokens."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    with torch.no_grad():
        lin.weight.mul_((torch.rand_like(lin.weight) > 0.7).float())
    sparse = SparseLinear.from_dense(copy.deepcopy(lin))
    for shape in ((2, 5, 12), (3, 2, 4, 12), (12,), (6, 12)):
        x = torch.randn(*shape)
        for choice in ("csr", "dense"):
            sparse.choice = choice
            out = sparse(x)
            assert out.shape == shape[:-1] + (7,)
            torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)
    tokens = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 7))
    prune_model(tokens, 0.8, method="magnitude")
    x = torch.rand(4, 9, 12)
    model = sparsify(tokens, x, batch_sizes=(4,), repeats=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tokens(x), rtol=1e-5, atol=1e-5)
