"""Finetuning on the sparse kernels (trainable CSR values): the same run as the masked dense model,
step for step, and back to masked layers for export."""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fastprune.models import get_model
from fastprune.nn import MaskedConv2d, SparseConv2d, SparseLinear, prune_model
from fastprune.nn.masked import MASKED_TYPES, effective_weight
from fastprune.nn.sparse.training import sparse_training, to_masked, to_sparse_training
from fastprune.prune import finetune_phase
from fastprune.train.objectives import PGDTraining


def _pruned(name="resnet18", sparsity=0.9, seed=0):
    torch.manual_seed(seed)
    channels = 1 if name == "cnn-small" else 3
    model = prune_model(get_model(name, 10, channels), sparsity, method="magnitude")
    for m in model.modules():
        if isinstance(m, MASKED_TYPES):
            m.freeze_mask()
    return model


def _effective(model):
    return {n: effective_weight(m).detach().clone() for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)}


def test_round_trip_keeps_the_pattern_weights_and_outputs():
    model = _pruned("cnn-small").eval()
    conv = next(m for m in model.modules() if isinstance(m, MaskedConv2d))
    with torch.no_grad():  # a kept weight that is exactly zero must stay in the pattern
        kept = conv.mask.nonzero()[0]
        conv.weight[tuple(kept)] = 0.0
    masks = {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)}
    before = _effective(model)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
    to_sparse_training(model)
    layers = [m for m in model.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    assert layers and all(isinstance(m.values, nn.Parameter) for m in layers)
    assert not any(isinstance(m, MASKED_TYPES) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    to_masked(model)
    assert {n: m.mask for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)}.keys() == masks.keys()
    for name, m in model.named_modules():
        if isinstance(m, MASKED_TYPES):
            assert torch.equal(m.mask, masks[name]), name
            assert torch.equal(effective_weight(m), before[name]), name


def test_adversarial_finetune_steps_match_the_masked_dense_model():
    # PGD training (input gradients through every sparse layer) with SGD momentum and weight decay:
    # losses and weights follow the masked dense run step for step.
    masked = _pruned("resnet18", 0.9).train()
    sparse = to_sparse_training(copy.deepcopy(masked)).train()
    assert sum(isinstance(m, SparseConv2d) for m in sparse.modules()) == 20  # every conv on the sparse kernels
    objective = PGDTraining(8 / 255, 2 / 255, 2)
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in (masked, sparse)]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x, y = torch.rand(5, 3, 32, 32, generator=gen), torch.randint(0, 10, (5,), generator=gen)
        losses = []
        for model, opt in zip((masked, sparse), optimisers):
            torch.manual_seed(step)  # the same random start for both
            opt.zero_grad()
            loss = objective(model, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[0]) + 1e-5, (step, losses)
    to_masked(sparse)
    want, got = _effective(masked), _effective(sparse)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
    for (name, a), (_, b) in zip(masked.named_buffers(), sparse.named_buffers()):
        if "running" in name:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_finetune_phase_with_sparse_kernels_is_the_same_run():
    torch.manual_seed(1)
    data = TensorDataset(torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    runs = []
    for sparse_kernels in (False, True):
        model = _pruned("cnn-small", 0.8, seed=2)
        history = finetune_phase(model, data, objective=lambda m, x, y: F.cross_entropy(m(x), y), epochs=2, lr=0.05,
                                 batch_size=16, progress=False, sparse_kernels=sparse_kernels)
        assert any(isinstance(m, MASKED_TYPES) for m in model.modules())  # masked again afterwards
        assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())
        runs.append((history, _effective(model)))
    (h0, w0), (h1, w1) = runs
    for a, b in zip(h0, h1):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]) + 1e-6, (a, b)
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=2e-5, rtol=1e-4, msg=name)


def test_sparse_training_restores_masked_layers_when_the_block_raises():
    model = _pruned("cnn-small")
    try:
        with sparse_training(model):
            assert any(isinstance(m, SparseConv2d) for m in model.modules())
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert any(isinstance(m, MaskedConv2d) for m in model.modules())
    assert not any(isinstance(m, SparseConv2d) for m in model.modules())


def _outputs_and_input_grads(model, x):
    xg = x.clone().requires_grad_()
    out = model(xg)
    (grad,) = torch.autograd.grad(out.square().sum(), xg)
    return out.detach(), grad


def _assert_same_function(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5 * (w.abs().max().item() + 1e-12), rtol=1e-4)


def test_attack_view_folds_batchnorm_and_follows_every_update():
    # TRADES' and MART's inner attacks run on attack_view(model): BatchNorm folded into the sparse
    # convs, ReLU and residual sums fused. It must be the eval model's function, before and after the
    # values, biases and BatchNorm parameters and statistics change (one training step's worth).
    from fastprune.nn.sparse.training import attack_view

    model = to_sparse_training(_pruned("resnet18", 0.9))
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        model.train()(x)  # BatchNorm statistics away from their initial values
    assert attack_view(model) is model  # train mode: nothing to fold
    model.eval()
    view = attack_view(model)
    assert view is not model
    _assert_same_function(_outputs_and_input_grads(view, x), _outputs_and_input_grads(model, x))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.train()(x * 0.5)  # new running statistics
    model.eval()
    assert attack_view(model) is view  # the same view, refreshed
    _assert_same_function(_outputs_and_input_grads(view, x), _outputs_and_input_grads(model, x))
    to_masked(model)  # no trainable sparse layer left: the model itself
    assert attack_view(model) is model


def test_attack_view_copies_the_numbers_it_does_not_fold():
    # A PReLU's weight is neither a sparse layer's nor a folded BatchNorm's: the view copies it on
    # every refresh. A BatchNorm without running statistics normalises by the batch even in eval
    # mode: then there is no view.
    from fastprune.nn.sparse.training import attack_view

    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 5))
    model = to_sparse_training(prune_model(net, 0.7, method="magnitude")).eval()
    x = torch.rand(3, 3, 6, 6)
    view = attack_view(model)
    assert view is not model
    with torch.no_grad():
        model[2].weight.mul_(-3.0)
    _assert_same_function(_outputs_and_input_grads(attack_view(model), x), _outputs_and_input_grads(model, x))
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    model = to_sparse_training(prune_model(plain, 0.7, method="magnitude")).eval()
    assert attack_view(model) is model
