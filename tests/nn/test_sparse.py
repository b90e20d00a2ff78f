"""Sparse inference modules: SparseConv2d/SparseLinear, sparsify on whole models (graph passes,
layouts, micro-batches), save/load, gradients for attacks, torch.compile."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastprune.models import get_model
from fastprune.nn import SparseConv2d, SparseLinear, fold_masks, load_sparse, prune_model, save_sparse, sparsify

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
    from fastprune.nn.sparse import BatchInnermostInput, ChannelsLastInput, MicroBatched, fold_batchnorm
    from fastprune.nn.sparse.files import _plan_of
    from fastprune.nn.sparse.passes import _fast_pooling
    from fastprune.nn.sparse.tuner import _layout_candidates

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



def test_residual_add_and_relu_fuse_into_one_op():
    from fastprune.nn.sparse import add_relu
    from fastprune.nn.sparse.passes import _fuse_add_relu

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



def test_batch_innermost_resnet_fuses_every_residual_into_a_conv():
    from fastprune.nn import BatchInnermostInput
    from fastprune.nn.sparse import add_relu, fold_batchnorm, fuse_epilogues
    from fastprune.nn.sparse.tuner import _convert_layers

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
