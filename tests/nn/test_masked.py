"""Masked training layers: exact top-k, straight-through gradients, the mask cache, prune_model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastprune.nn.masked as masked
from fastprune.attacks import PGD
from fastprune.nn import MaskedConv2d, MaskedLinear, fold_masks, kept_count, prune_model, sparsity_report, topk_mask


def sort_based_topk(values, k):
    """Reference: a stable descending sort, first k indices (ties: lower index first)."""
    flat = values.reshape(-1)
    order = torch.sort(-flat, stable=True).indices[:k]
    mask = torch.zeros_like(flat)
    mask[order] = 1
    return mask.view_as(values)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 0), (10, 10), (97, 13), (1000, 1), (4096, 41)])
def test_topk_exact_with_ties(n, k):
    gen = torch.Generator().manual_seed(n + k)
    for values in (torch.randn(n, generator=gen),
                   torch.randint(0, 4, (n,), generator=gen).float(),  # heavy ties
                   torch.zeros(n)):
        mask = topk_mask(values, k)
        assert int(mask.sum()) == k
        assert torch.equal(mask, sort_based_topk(values, k))


def test_kept_count_follows_hydra():
    assert kept_count(27, 0.99) == 1 and kept_count(1000, 0.9) == 100 and kept_count(10, 0.0) == 10


def make_layers():
    torch.manual_seed(0)
    return nn.Conv2d(3, 8, 3, padding=1), nn.Linear(20, 7)


@pytest.mark.parametrize("source", ["scores", "magnitude"])
def test_from_dense_keeps_exactly_k_and_starts_at_the_magnitude_mask(source):
    conv, lin = make_layers()
    for dense, cls in ((conv, MaskedConv2d), (lin, MaskedLinear)):
        layer = cls.from_dense(dense, source=source, sparsity=0.9)
        mask = layer.refresh_mask()
        assert int(mask.sum()) == kept_count(dense.weight.numel(), 0.9)
        # scaled score init: the first score mask is the magnitude mask
        assert torch.equal(mask, topk_mask(dense.weight.detach().abs(), layer.k))
        assert torch.equal(layer.weight, dense.weight)


def test_outputs_equal_dense_layer_with_masked_weights(device):
    conv, lin = (m.to(device) for m in make_layers())
    x = torch.randn(2, 3, 9, 9, device=device)
    layer = MaskedConv2d.from_dense(conv, source="magnitude", sparsity=0.5)
    ref = nn.functional.conv2d(x, conv.weight * layer.refresh_mask(), conv.bias, padding=1)
    torch.testing.assert_close(layer(x), ref)
    fixed = torch.rand_like(lin.weight) > 0.7
    layer = MaskedLinear.from_dense(lin, source="fixed", mask=fixed)
    v = torch.randn(5, 20, device=device)
    torch.testing.assert_close(layer(v), nn.functional.linear(v, lin.weight * fixed, lin.bias))


def test_straight_through_gradient(device):
    _, lin = make_layers()
    layer = MaskedLinear.from_dense(lin.to(device), source="scores", sparsity=0.8)
    with torch.no_grad():
        layer.scores.mul_(torch.where(torch.rand_like(layer.scores) > 0.5, 1.0, -1.0))  # mixed signs
    x = torch.randn(6, 20, device=device)
    g_out = torch.randn(6, 7, device=device)
    layer(x).backward(g_out)
    g_weff = g_out.T @ x  # dL/dW_eff
    mask = layer.refresh_mask()
    torch.testing.assert_close(layer.weight.grad, g_weff * mask)
    torch.testing.assert_close(layer.scores.grad, g_weff * layer.weight.detach() * torch.sign(layer.scores.detach()))


def test_mask_recomputed_only_when_the_source_changes(monkeypatch):
    calls = []
    real = masked.topk_mask
    monkeypatch.setattr(masked, "topk_mask", lambda v, k: calls.append(1) or real(v, k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    prune_model(model, 0.7)
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,))
    model(x)
    model(x)
    PGD(model, eps=0.1, steps=5, seed=0)(x, y)  # five forward/backward passes, scores unchanged
    assert len(calls) == 1
    before = model[1].refresh_mask().clone()
    opt = torch.optim.SGD([model[1].scores], lr=10.0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # an in-place update: the version counter moves
    model(x)
    assert len(calls) == 2
    assert not torch.equal(model[1].mask, before), "a large step should move the mask"
    assert int(model[1].mask.sum()) == model[1].k


def test_freeze_and_set_sparsity():
    conv, _ = make_layers()
    layer = MaskedConv2d.from_dense(conv, sparsity=0.5)
    layer.set_sparsity(0.9)
    assert int(layer.refresh_mask().sum()) == kept_count(conv.weight.numel(), 0.9)
    layer.freeze_mask()
    assert layer.source == "fixed" and not hasattr(layer, "scores")
    before = layer.mask.clone()
    with torch.no_grad():
        layer.weight.mul_(-3)
    layer(torch.randn(1, 3, 5, 5))
    assert torch.equal(layer.mask, before)


def test_prune_model_and_report(device):
    from fastprune.models import get_model

    model = get_model("cnn-small", 10, 1).to(device)
    prune_model(model, 0.95, skip=("9",))
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert kinds == ["MaskedConv2d", "MaskedConv2d", "MaskedLinear", "Linear"]
    report = sparsity_report(model)
    for name in ("1", "3", "7"):
        layer = report["layers"][name]
        assert layer["params"] - layer["zeros"] == kept_count(layer["params"], 0.95)
    assert report["layers"]["9"]["zeros"] == 0
    assert report["zeros"] == sum(v["zeros"] for v in report["layers"].values())


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda c, l: MaskedConv2d.from_dense(c, sparsity=1.0), "sparsity"),
        (lambda c, l: MaskedConv2d.from_dense(c, sparsity=-0.1), "sparsity"),
        (lambda c, l: MaskedLinear.from_dense(l, source="fixed", mask=torch.ones(3, 3)), "mask has shape"),
        (lambda c, l: MaskedLinear.from_dense(l, source="fixed"), "mask must be given"),
        (lambda c, l: MaskedLinear.from_dense(l, source="random"), "source"),
        (lambda c, l: MaskedConv2d.from_dense(c, sparsity=0.5)(torch.randn(3, 9, 9)), "4D"),
        (lambda c, l: MaskedConv2d.from_dense(c, sparsity=0.5)(torch.randn(1, 3, 9, 9).double()), "float64"),
        (lambda c, l: prune_model(nn.Sequential(c), 0.5, skip=("nope",)), "skip"),
        (lambda c, l: prune_model(nn.Sequential(c), 0.5, method="random"), "method"),
    ],
)
def test_bad_arguments(make, match):
    conv, lin = make_layers()
    with pytest.raises(ValueError, match=match):
        make(conv, lin)


def _nm_reference(values, n, m):
    """Brute force: per row, per group of m along the flattened reduction dim, the n largest (ties to
    the lower index)."""
    rows = values.reshape(values.shape[0], -1)
    mask = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        for g in range(0, rows.shape[1], m):
            group = rows[r, g:g + m].tolist()
            order = sorted(range(m), key=lambda i: (-group[i], i))
            for i in order[:n]:
                mask[r, g + i] = 1
    return mask.view_as(values)


@pytest.mark.parametrize("shape,n,m", [((6, 16), 2, 4), ((5, 8, 3, 3), 2, 4), ((4, 24), 1, 4), ((3, 16), 4, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_m(shape, n, m):
    torch.manual_seed(0)
    values = torch.randn(shape).abs()
    values.view(-1)[:8] = 0.5  # some ties
    mask = masked.nm_mask(values, n, m)
    assert torch.equal(mask, _nm_reference(values, n, m))
    assert torch.equal(mask.reshape(shape[0], -1, m).sum(-1), torch.full(mask.reshape(shape[0], -1, m).shape[:2], n,
                                                                          dtype=mask.dtype))
    with pytest.raises(ValueError, match="multiple of"):
        masked.nm_mask(torch.rand(3, 6), 2, 4)


def test_prune_model_with_a_2_to_4_pattern():
    from fastprune.nn import is_2to4

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 12),
                          nn.Linear(12, 3))
    prune_model(model, 0.5, method="magnitude", pattern="2:4")
    # conv0 (reduction 9) and the last linear (12 = 3 groups) : 9 is not a multiple of 4 -> unstructured
    assert model[0].pattern is None and model[2].pattern == (2, 4) and model[4].pattern == (2, 4)
    model(torch.rand(2, 1, 8, 8))
    assert is_2to4(model[4].masked_weight().detach())
    assert is_2to4(model[2].masked_weight().detach().reshape(8, -1))
    assert sparsity_report(model)["sparsity"] == pytest.approx(0.5, abs=0.01)
    # the pattern follows the scores in HYDRA's prune phase too
    hydra = prune_model(nn.Sequential(nn.Linear(16, 4)), 0.5, method="scores", pattern="2:4")
    with torch.no_grad():
        hydra[0].scores.copy_(torch.randn(4, 16))
    assert torch.equal(hydra[0].refresh_mask(), masked.nm_mask(hydra[0].scores.abs(), 2, 4))
    with pytest.raises(ValueError, match="fixed sparsity"):
        hydra[0].set_sparsity(0.9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0.9, pattern="2:4"), "prunes 0.5"),
    (dict(sparsity=0.5, pattern="4:2"), "0 < N < M"),
    (dict(sparsity=0.5, pattern="two:four"), "N:M"),
])
def test_bad_patterns(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_model(nn.Sequential(nn.Linear(16, 4)), method="magnitude", **kwargs)
    with pytest.raises(ValueError, match="pattern"):
        MaskedLinear.from_dense(nn.Linear(6, 4), source="magnitude", sparsity=0.5, pattern="2:4")


def test_masked_layers_under_autocast():
    """Under autocast a bf16 activation meets fp32 weights: the op casts them (amp attacks on pruned
    models); outside autocast a dtype mismatch is still refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    prune_model(model, 0.5, method="magnitude")
    x = torch.rand(5, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), model(x), atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="bfloat16"):
        model(x.bfloat16())


def test_masked_weight_is_cached_only_inside_an_attack():
    """Inside frozen_parameters (every attack call) the masked weight is computed once and reused,
    recomputed when the weight or the mask changes; outside, weight gradients flow as usual."""
    from fastprune.utils.autograd import frozen_parameters, input_gradients_only

    torch.manual_seed(0)
    layer = MaskedLinear.from_dense(nn.Linear(6, 4), source="scores", sparsity=0.5)
    x = torch.rand(3, 6, requires_grad=True)
    with frozen_parameters():
        with torch.no_grad():
            first = layer.masked_weight()
            assert layer.masked_weight() is first  # reused
            layer.weight.mul_(2)  # a changed weight is seen
            assert torch.equal(layer.masked_weight(), layer.weight * layer.mask)
            layer.scores.neg_()  # a changed mask too
            assert torch.equal(layer.masked_weight(), layer.weight * layer.refresh_mask())
        with torch.enable_grad(), input_gradients_only():
            (gx,) = torch.autograd.grad(layer(x).sum(), x)
    (gx_ref,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(gx, gx_ref)
    layer(x).sum().backward()
    assert layer.scores.grad is not None and layer.weight.grad is not None  # outside: trained as usual


def test_score_initialisations():
    """scaled: the first mask is the magnitude mask (HYDRA's scripts); kaiming_*: HYDRA's layers' own
    random draws, whose first mask is not."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3)
    scaled = MaskedConv2d.from_dense(conv, source="scores", sparsity=0.9)
    magnitude = MaskedConv2d.from_dense(conv, source="magnitude", sparsity=0.9)
    assert torch.equal(scaled.refresh_mask(), magnitude.refresh_mask())
    bound = 1 / (8 * 9) ** 0.5  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for init in ("kaiming_uniform", "kaiming_normal"):
        layer = MaskedConv2d.from_dense(conv, source="scores", sparsity=0.9, score_init=init)
        assert not torch.equal(layer.refresh_mask(), magnitude.refresh_mask())
        assert torch.equal(layer.weight, conv.weight)
        if init == "kaiming_uniform":
            assert layer.scores.abs().max() <= bound and layer.scores.abs().max() > 0.9 * bound
    model = prune_model(nn.Sequential(nn.Linear(4, 4)), 0.5, score_init="kaiming_normal")
    assert model[0].scores.std() > 0
    with pytest.raises(ValueError, match="score_init"):
        prune_model(nn.Sequential(nn.Linear(4, 4)), 0.5, score_init="snip")


def test_conv1d_and_transposed_conv_are_masked_and_fold_back():
    """Conv1d and ConvTranspose2d layers get masks as Conv2d and Linear do; folded, the model computes
    the same function with plain layers; float64 check of the masked forward."""
    from fastprune.nn import MaskedConv1d, MaskedConvTranspose2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Unflatten(1, (8, 4, 4)),
                          nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)).double()
    x = torch.rand(5, 3, 16, dtype=torch.float64)
    prune_model(model, 0.75, method="magnitude")
    assert isinstance(model[0], MaskedConv1d) and isinstance(model[4], MaskedConvTranspose2d)
    for layer in (model[0], model[4]):
        layer.refresh_mask()  # masks follow their source on the next forward; made now to inspect them
        assert int(layer.mask.sum()) == kept_count(layer.weight.numel(), 0.75)
        kept = layer.weight.detach().abs()[layer.mask.bool()]
        dropped = layer.weight.detach().abs()[~layer.mask.bool()]
        assert kept.min() >= dropped.max()  # the magnitude mask
    w0, w4 = (model[i].weight * model[i].mask for i in (0, 4))
    h = torch.relu(F.conv1d(x, w0, model[0].bias, padding=1)).flatten(1).unflatten(1, (8, 4, 4))
    want = F.conv_transpose2d(h, w4, model[4].bias, stride=2, padding=1, output_padding=1)
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    report = sparsity_report(model)
    assert set(report["layers"]) == {"0", "4"} and abs(report["sparsity"] - 0.75) < 0.01
    folded = fold_masks(model)
    assert type(folded[0]) is nn.Conv1d and type(folded[4]) is nn.ConvTranspose2d
    torch.testing.assert_close(folded(x), want, rtol=1e-12, atol=1e-12)
    assert MaskedConvTranspose2d.from_dense(folded[4], source="magnitude", sparsity=0.5)(
        h, output_size=(7, 7)).shape == (5, 4, 7, 7)


class _AttentionNet(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.head(out.mean(dim=1 if self.attn.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_prunable_attention_computes_what_multihead_attention_computes(batch_first):
    from fastprune.nn.attention import PrunableMultiheadAttention

    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    ours = PrunableMultiheadAttention(mha)
    q, k = torch.rand(3, 5, 16, dtype=torch.float64), torch.rand(3, 7, 16, dtype=torch.float64)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    for kwargs in (dict(), dict(key_padding_mask=padding), dict(need_weights=False)):
        want, want_w = mha(q, k, k, **kwargs)
        got, got_w = ours(q, k, k, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert (got_w is None) == (want_w is None)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)


def test_attention_projections_are_pruned_reported_folded_and_skippable():
    from fastprune.nn.attention import PrunableMultiheadAttention

    torch.manual_seed(3)
    model = _AttentionNet().eval()
    x = torch.rand(4, 5, 6)
    prune_model(model, 0.75, method="magnitude")
    assert isinstance(model.attn, PrunableMultiheadAttention)
    assert isinstance(model.attn.in_proj, MaskedLinear) and isinstance(model.attn.out_proj, MaskedLinear)
    with torch.no_grad():
        got = model(x)  # masks follow their source on the forward
    report = sparsity_report(model)
    assert {"attn.in_proj", "attn.out_proj"} <= set(report["layers"])
    assert abs(report["layers"]["attn.in_proj"]["sparsity"] - 0.75) < 0.01 and abs(report["sparsity"] - 0.75) < 0.01
    # the masked attention equals nn.MultiheadAttention with the masked weights
    folded = fold_masks(model)
    assert type(folded.attn) is nn.MultiheadAttention
    assert (folded.attn.in_proj_weight == 0).float().mean() > 0.74
    with torch.no_grad():
        torch.testing.assert_close(folded(x), got)
    skipped = prune_model(_AttentionNet(), 0.5, method="magnitude", skip=["attn"])
    assert type(skipped.attn) is nn.MultiheadAttention
    one = prune_model(_AttentionNet(), 0.5, method="magnitude", skip=["attn.out_proj"])
    assert isinstance(one.attn.in_proj, MaskedLinear) and type(one.attn.out_proj) is nn.Linear
    untouched = _AttentionNet()
    with pytest.raises(ValueError, match="not modules of the model"):
        prune_model(untouched, 0.5, method="magnitude", skip=["attn.q_proj"])
    assert type(untouched.attn) is nn.MultiheadAttention  # refused before anything changed


def test_hydra_scores_train_through_the_attention_projections():
    torch.manual_seed(4)
    model = prune_model(_AttentionNet(), 0.5, method="scores")
    model(torch.rand(2, 5, 6)).sum().backward()
    assert model.attn.in_proj.scores.grad is not None and model.attn.in_proj.scores.grad.abs().sum() > 0
    assert model.attn.out_proj.scores.grad.abs().sum() > 0


def test_a_pruned_attention_model_round_trips_through_a_checkpoint(tmp_path):
    from fastprune.nn.masked import MASKED_TYPES
    from fastprune.train import load_model, save_model

    from fastprune.models import get_model

    pytest.importorskip("torchvision")
    torch.manual_seed(5)
    net = get_model("torchvision:vit_b_16", 10, 3).eval()
    prune_model(net, 0.5, method="magnitude", skip=["encoder.layers.encoder_layer_0.self_attention",
                                                    "encoder.layers.encoder_layer_1.self_attention.out_proj"])
    for module in net.modules():
        if isinstance(module, MASKED_TYPES):
            module.freeze_mask()
    nn.init.normal_(net.heads.head.weight)
    path = str(tmp_path / "vit.pt")
    save_model(path, net, "torchvision:vit_b_16", 10, 3)
    loaded, _ = load_model(path)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert abs(sparsity_report(loaded)["sparsity"] - sparsity_report(net)["sparsity"]) < 1e-9
