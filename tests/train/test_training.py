"""Training: objectives, exact resume, scores-only phases, checkpoints."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastprune.models import get_model
from fastprune.nn import prune_model
from fastprune.train import TRADES, fit, make_objective


@pytest.fixture()
def small_train(digits):
    x, y = digits.train.tensors
    return torch.utils.data.TensorDataset(x[:256], y[:256])


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("objective", ["natural", "trades"])
def test_resume_gives_the_uninterrupted_result(tmp_path, small_train, objective):
    def run(run_dir, stop_after=None):
        torch.manual_seed(0)
        model = get_model("cnn-small", 10, 1)
        obj = make_objective(objective, eps=0.1, alpha=0.025, steps=2)

        def maybe_stop(epoch, row):
            if stop_after is not None and epoch == stop_after:
                raise Interrupt
        history = fit(model, small_train, objective=obj, epochs=3, lr=0.05, batch_size=64, run_dir=str(run_dir),
                      progress=False, on_epoch_end=maybe_stop)
        return model, history

    straight, history = run(tmp_path / "a")
    with pytest.raises(Interrupt):
        run(tmp_path / "b", stop_after=0)
    torch.manual_seed(123)  # whatever the caller's RNG does meanwhile, resume restores the run's own
    resumed, resumed_history = run(tmp_path / "b")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in history] == [h["loss"] for h in resumed_history]
    files = sorted(os.listdir(tmp_path / "b"))
    assert files == ["checkpoint.pt", "metrics.csv", "metrics.json"], "no temporary files left behind"
    assert len(open(tmp_path / "b" / "metrics.csv").read().strip().splitlines()) == 1 + 3


def test_scores_only_phase_leaves_weights_alone(small_train):
    torch.manual_seed(0)
    model = prune_model(get_model("cnn-small", 10, 1), 0.9)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("scores")}
    scores = [p for n, p in model.named_parameters() if n.endswith("scores")]
    before = [s.detach().clone() for s in scores]
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("scores"))
    fit(model, small_train, epochs=1, lr=0.1, batch_size=64, params=scores, progress=False)
    for n, p in model.named_parameters():
        if not n.endswith("scores"):
            assert torch.equal(p, weights[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(before, scores))


def test_trades_maximises_the_kl_within_the_ball(digits):
    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1)
    fit(model, digits.train, epochs=2, lr=0.05, batch_size=64, progress=False)
    x = digits.test.tensors[0][:64]
    trades = TRADES(eps=0.1, alpha=0.025, steps=5)
    x_adv = trades.adversarial(model, x)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        p = F.softmax(model(x), 1)

        def kl(z):
            return F.kl_div(F.log_softmax(model(z), 1), p, reduction="sum").item()

        noise = (x + (torch.rand_like(x) * 2 - 1) * 0.1).clamp(0, 1)
        assert kl(x_adv) > 2 * kl(noise)
    loss = trades(model.train(), x, digits.test.tensors[1][:64])
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epochs=0), "epochs"),
        (dict(epochs=1, lr=-1.0), "lr"),
        (dict(epochs=1, batch_size=0), "batch_size"),
        (dict(epochs=1, params=[]), "params"),
    ],
)
def test_bad_arguments(small_train, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(get_model("cnn-small", 10, 1), small_train, progress=False, **kwargs)


def test_unknown_objective():
    with pytest.raises(ValueError, match="objective"):
        make_objective("mma")
    with pytest.raises(ValueError, match="beta"):
        make_objective("trades", beta=-1.0)


def test_augmentation_amp_and_channels_last(digits, small_train):
    from fastprune.data.augment import random_crop_flip

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    same = random_crop_flip(x, padding=0, flip=False)
    assert torch.equal(same, x)
    # Every augmented image is a shifted (zero-filled), possibly mirrored copy of its source.
    for i in range(16):
        candidates = [torch.roll(F.pad(x[i], (2, 2, 2, 2)), (dy, dx), (1, 2))[:, 2:10, 2:10]
                      for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in candidates), i
    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1)
    history = fit(model, small_train, epochs=2, lr=0.05, batch_size=64, progress=False, amp=True,
                  channels_last=True, augment=lambda b: random_crop_flip(b, padding=1))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["loss"] < history[0]["loss"] * 1.5


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, small_train):
    from fastprune.train.objectives import natural_loss

    model = get_model("cnn-small", 10, 1)
    calls = {"n": 0}

    def blows_up_in_epoch_two(m, x, y):
        calls["n"] += 1
        loss = natural_loss(m, x, y)
        return loss * float("nan") if calls["n"] > 4 else loss  # 4 batches of 64 per epoch

    with pytest.raises(FloatingPointError, match="epoch 1.*lower lr"):
        fit(model, small_train, objective=blows_up_in_epoch_two, epochs=3, batch_size=64, run_dir=str(tmp_path),
            progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("bn_forwards", ["hydra", "once"])
def test_trades_batchnorm_statistics_follow_the_chosen_passes(bn_forwards):
    """HYDRA's trainer runs clean (its accuracy meter), then the attack in eval mode, then clean,
    adversarial and clean again in train mode; "once" runs the attack, clean and adversarial. The
    running statistics (which the eval-mode attack sees) follow exactly those passes."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    expected = copy.deepcopy(model).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    trades = TRADES(0.1, 0.025, 3, bn_forwards=bn_forwards)
    model.train()
    torch.manual_seed(1)
    trades(model, x, y)
    torch.manual_seed(1)
    with torch.no_grad():
        if bn_forwards == "hydra":
            expected(x)
        x_adv = trades.adversarial(expected, x)
        for batch in ((x, x_adv, x) if bn_forwards == "hydra" else (x, x_adv)):
            expected(batch)
    assert int(model[1].num_batches_tracked) == (4 if bn_forwards == "hydra" else 2)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model[1], name), getattr(expected[1], name), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="bn_forwards"):
        TRADES(0.1, 0.025, 3, bn_forwards="twice")


def test_trades_l2_follows_trades_code():
    """TRADES' L2 inner loop as its code writes it (an SGD step on delta with the gradient renormed,
    clip to the box, renorm_ to the ball), against fastprune's TRADES(norm="l2")."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(12, 1, 8, 8)
    eps, steps = 0.5, 5
    trades = TRADES(eps, 2 * eps / steps, steps, norm="l2")
    torch.manual_seed(1)
    ours = trades.adversarial(model, x)

    torch.manual_seed(1)
    delta = (0.001 * torch.randn_like(x)).requires_grad_(True)
    opt = torch.optim.SGD([delta], lr=eps / steps * 2)
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    for _ in range(steps):
        opt.zero_grad()
        loss = -F.kl_div(F.log_softmax(model(x + delta), dim=1), p_clean, reduction="sum")
        loss.backward()
        norms = delta.grad.view(12, -1).norm(p=2, dim=1)
        delta.grad.div_(norms.view(-1, 1, 1, 1))
        opt.step()
        delta.data.add_(x).clamp_(0, 1).sub_(x)
        delta.data.renorm_(p=2, dim=0, maxnorm=eps)
    torch.testing.assert_close(ours, x + delta.detach(), rtol=1e-5, atol=1e-6)
    assert ((ours - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
    with pytest.raises(ValueError, match="l2"):
        make_objective("pgd", eps=0.5, norm="l2")


def test_mart_loss_matches_its_definition_in_float64(monkeypatch):
    """MART's loss for given x and x_adv, against the formula (boosted CE on x_adv + beta * KL(f(x) ||
    f(x_adv)) weighted by 1 - p_y(x)); its attack stays in the ball and raises the cross-entropy."""
    import torch.nn.functional as F

    from fastprune.train import MART

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5)).double()
    x, y = torch.rand(6, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    x_adv = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)
    mart = MART(eps=0.05, alpha=0.01, steps=4, beta=3.0)
    monkeypatch.setattr(MART, "adversarial", lambda self, m, a, b: x_adv)
    p_nat, p_adv = F.softmax(model(x), 1), F.softmax(model(x_adv), 1)
    want = 0.0
    for i in range(6):
        others = p_adv[i].clone()
        others[y[i]] = -1
        k = int(others.argmax())
        boosted = -torch.log(p_adv[i, y[i]]) - torch.log(1.0001 - p_adv[i, k] + 1e-12)
        kl = (p_nat[i] * (torch.log(p_nat[i]) - torch.log(p_adv[i] + 1e-12))).sum()
        want = want + boosted + 3.0 * kl * (1.0000001 - p_nat[i, y[i]])
    torch.testing.assert_close(mart(model, x, y), want / 6, rtol=1e-9, atol=1e-12)
    monkeypatch.undo()
    adv = MART(eps=0.05, alpha=0.01, steps=4).adversarial(model, x, y)
    assert (adv - x).abs().max() <= 0.05 + 1e-9 and adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
