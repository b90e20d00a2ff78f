"""HYDRA's phases on digits: the prune phase changes only scores, finetuning keeps the mask."""
import pytest
import torch
from torch import nn

from fastprune.models import get_model
from fastprune.nn import MaskedConv2d, prune_model, sparsity_report
from fastprune.prune import finetune_phase, hydra, lwm, prune_phase
from fastprune.train import fit, make_objective


def pretrained(digits):
    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1)
    fit(model, digits.train, epochs=3, lr=0.05, batch_size=64, progress=False)
    return model


def test_prune_phase_changes_only_scores_and_finetune_keeps_the_mask(digits, tmp_path):
    model = prune_model(pretrained(digits), 0.9, method="scores")
    objective = make_objective("trades", eps=0.1, alpha=0.025, steps=2)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if not n.endswith(("scores", "mask"))}
    masks_before = [m.refresh_mask().clone() for m in model.modules() if isinstance(m, MaskedConv2d)]
    prune_phase(model, digits.train, objective=objective, epochs=2, lr=0.1, batch_size=64, progress=False,
                run_dir=str(tmp_path))
    for name, tensor in model.state_dict().items():
        if name in frozen and "running" not in name and "num_batches" not in name:
            assert torch.equal(tensor, frozen[name]), f"{name} changed in the prune phase"
    masks_after = [m.refresh_mask().clone() for m in model.modules() if isinstance(m, MaskedConv2d)]
    assert any(not torch.equal(a, b) for a, b in zip(masks_before, masks_after)), "the scores should move the mask"
    finetune_phase(model, digits.train, objective=objective, epochs=1, lr=0.01, batch_size=64, progress=False,
                   run_dir=str(tmp_path))
    masks_final = [m.mask.clone() for m in model.modules() if isinstance(m, MaskedConv2d)]
    assert all(torch.equal(a, b) for a, b in zip(masks_after, masks_final)), "finetuning must keep the mask"
    assert abs(sparsity_report(model)["sparsity"] - 0.9) < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune", "prune"]


def test_prune_phase_trains_batchnorm_unless_frozen(digits):
    """HYDRA's scripts train BatchNorm's scale and shift with the scores; --freeze-bn keeps them.
    Conv and linear weights and biases stay fixed either way."""
    from torch import nn

    for freeze_bn in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 64, 10))
        prune_model(model, 0.5, method="scores")
        before = {n: t.clone() for n, t in model.named_parameters()}
        prune_phase(model, digits.train, objective=make_objective("natural"), epochs=1, lr=0.1, batch_size=256,
                    freeze_bn=freeze_bn, progress=False)
        changed = {n for n, t in model.named_parameters() if not torch.equal(t, before[n])}
        expected = {"0.scores", "4.scores"} | (set() if freeze_bn else {"1.weight", "1.bias"})
        assert changed == expected, (freeze_bn, changed)


def test_hydra_and_lwm_end_to_end(digits):
    objective = make_objective("natural")
    for method in (hydra, lwm):
        model = pretrained(digits)
        kwargs = dict(prune_epochs=1) if method is hydra else {}
        method(model, digits.train, sparsity=0.8, objective=objective, finetune_epochs=2, batch_size=64,
               progress=False, **kwargs)
        x, y = digits.test.tensors
        with torch.no_grad():
            accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
        assert accuracy > 0.8, (method.__name__, accuracy)
        assert abs(sparsity_report(model)["sparsity"] - 0.8) < 0.01


def test_snip_scores_are_the_straight_through_score_gradient_with_every_weight_kept():
    """HYDRA's snip_init: with k = 1 the scores' gradient is dL/dW * W; its absolute value becomes
    the scores. fastprune computes |dL/dW * W| on a dense copy: the same numbers (float64)."""
    import copy

    import torch.nn.functional as F

    from fastprune.nn import prune_model
    from fastprune.prune.hydra import snip_sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)).double()
    x, y = torch.rand(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    ours = snip_sensitivity(model, (x, y), batch_size=16, seed=0)
    reference = prune_model(copy.deepcopy(model).train(), 0.0, method="scores")
    F.cross_entropy(reference(x), y).backward()
    for name in ("0", "4"):
        torch.testing.assert_close(ours[name], reference.get_submodule(name).scores.grad.abs(), rtol=1e-10, atol=1e-14)
    assert model[1].num_batches_tracked.item() == 0  # the model itself did not run


def test_hydra_with_snip_starts_from_the_snip_mask(digits, monkeypatch):
    import sys

    from fastprune.models import get_model
    from fastprune.prune import hydra
    from fastprune.prune.hydra import snip_sensitivity
    from fastprune.nn.masked import MASKED_TYPES, topk_mask

    hydra_module = sys.modules["fastprune.prune.hydra"]
    started = {}

    def stop(model, *args, **kwargs):
        started["masks"] = {n: m.refresh_mask().clone() for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)}
        raise KeyboardInterrupt

    monkeypatch.setattr(hydra_module, "prune_phase", stop)
    model = get_model("cnn-small", 10, 1)
    want = snip_sensitivity(model, digits.train, batch_size=32, seed=3)
    with pytest.raises(KeyboardInterrupt):
        hydra(model, digits.train, sparsity=0.9, objective=None, score_init="snip", batch_size=32, seed=3)
    for name, mask in started["masks"].items():
        assert torch.equal(mask, topk_mask(want[name], int(mask.sum())))
    with pytest.raises(ValueError, match="score_init"):
        hydra(get_model("cnn-small", 10, 1), digits.train, sparsity=0.9, objective=None, score_init="grasp")
