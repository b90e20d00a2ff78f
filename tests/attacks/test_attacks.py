"""Attacks on a small CNN trained on digits inside the test session (tests/conftest.py), on every
device (the ``device`` fixture: the CPU, and CUDA where there is one)."""
import copy

import pytest
import torch
from torch import nn

from fastprune.attacks import APGD, APGDT, CW, FGSM, PGD, evaluate, make_attack
from fastprune.attacks.base import select_strongest

from ..conftest import GPU

EPS = 0.1  # digits pixels are in [0, 1]; at 0.1 the natural model is about half robust


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def test_set(digits):
    return digits.test.tensors


def test_pgd_matches_torchattacks(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    torchattacks = pytest.importorskip("torchattacks")
    x, y = on_device
    settings = dict(eps=EPS, alpha=EPS / 4, steps=10)
    ours = accuracy(model, PGD(model, random_start=False, **settings)(x, y), y)
    theirs = accuracy(model, torchattacks.PGD(model, random_start=False, **settings)(x, y), y)
    assert abs(ours - theirs) <= 0.005, (ours, theirs)  # deterministic: the same algorithm
    torch.manual_seed(0)
    ours = accuracy(model, PGD(model, random_start=True, seed=1, **settings)(x, y), y)
    theirs = accuracy(model, torchattacks.PGD(model, random_start=True, **settings)(x, y), y)
    assert abs(ours - theirs) <= 0.02, (ours, theirs)
    assert 0.1 < ours < 0.9, "the test needs a model that is partly robust at this eps"


def test_fgsm_matches_torchattacks(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    torchattacks = pytest.importorskip("torchattacks")
    x, y = on_device
    ours = FGSM(model, eps=EPS)(x, y)
    theirs = torchattacks.FGSM(model, eps=EPS)(x, y)
    assert (ours - theirs).abs().max() <= 1e-6


def test_apgd_at_least_as_strong_as_pgd20(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = on_device
    pgd20 = accuracy(model, PGD(model, eps=EPS, alpha=EPS / 4, steps=20, seed=0)(x, y), y)
    apgd = accuracy(model, APGD(model, eps=EPS, steps=100, seed=0)(x, y), y)
    assert apgd <= pgd20 + 0.01, (apgd, pgd20)
    apgd_t = accuracy(model, APGDT(model, eps=EPS, steps=50, n_target_classes=3, seed=0)(x, y), y)
    assert apgd_t <= pgd20 + 0.01, (apgd_t, pgd20)


ALL_ATTACKS = [
    lambda m, eps, norm: FGSM(m, eps=eps, norm=norm),
    lambda m, eps, norm: PGD(m, eps=eps, alpha=eps / 4, steps=5, norm=norm, restarts=2, seed=0),
    lambda m, eps, norm: CW(m, eps=eps, alpha=eps / 4, steps=5, norm=norm, seed=0),
    lambda m, eps, norm: APGD(m, eps=eps, steps=10, norm=norm, seed=0),
    lambda m, eps, norm: APGD(m, eps=eps, steps=10, norm=norm, loss="dlr", restarts=2, seed=0),
    lambda m, eps, norm: APGDT(m, eps=eps, steps=10, norm=norm, n_target_classes=2, seed=0),
]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("make", ALL_ATTACKS, ids=["fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr", "apgd-t"])
def test_examples_inside_ball_and_box_and_reproducible(model_on, device, test_set, make, norm):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = (t[:64] for t in on_device)
    eps = EPS if norm == "linf" else 0.5
    atk = make(model, eps, norm)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (dist <= eps * (1 + 1e-5)).all()
    assert dist.max() > eps / 4, "the attack did not move"
    assert torch.equal(atk(x, y), x_adv), "a seeded attack must be reproducible"


def test_global_seed_reproducible_without_attack_seed(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = (t[:32] for t in on_device)
    atk = PGD(model, eps=EPS, steps=3)
    torch.manual_seed(5)
    a = atk(x, y)
    torch.manual_seed(5)
    assert torch.equal(atk(x, y), a)
    assert not torch.equal(atk(x, y), a)


class TupleModel(nn.Module):
    """Returns (logits, features), as models with feature taps do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x.flatten(1)


def test_grads_modes_and_tuple_outputs(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = (t[:32] for t in on_device)
    model = copy.deepcopy(model)
    model.train()
    model[1].eval()  # a mixed state that must survive exactly
    for p in model.parameters():
        p.grad = None
    sentinel = torch.full_like(model[-1].weight, 3.0)
    model[-1].weight.grad = sentinel.clone()
    wrapped = TupleModel(model)
    for atk in (PGD(wrapped, eps=EPS, steps=3, seed=0), APGD(wrapped, eps=EPS, steps=5, seed=0)):
        x_adv = atk(x, y)
        plain = type(atk)(model, eps=EPS, steps=atk.steps, seed=0)(x, y)
        assert torch.equal(x_adv, plain), "tuple outputs must give the same attack"
    assert model.training and not model[1].training and model[2].training
    assert torch.equal(model[-1].weight.grad, sentinel)
    assert all(p.grad is None for p in model.parameters() if p is not model[-1].weight)


def test_attack_under_no_grad(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = (t[:16] for t in on_device)
    with torch.no_grad():
        x_adv = PGD(model, eps=EPS, steps=2, seed=0)(x, y)
    assert (x_adv - x).abs().max() > 0


def test_restarts_select_a_fooling_candidate():
    cands = torch.arange(3 * 4, dtype=torch.float32).view(3, 4, 1)
    success = torch.tensor([[False, True, False, False], [False, True, True, False], [False, False, False, False]])
    score = torch.tensor([[5.0, 1.0, 9.0, 0.0], [1.0, 2.0, -1.0, 3.0], [0.0, 0.0, 0.0, 7.0]])
    best = select_strongest(cands, success, score).view(-1)
    # sample 0: no success, best score in restart 0; 1: both succeed, restart 1 scores higher;
    # 2: only restart 1 succeeds (restart 0's higher score does not count); 3: restart 2's score.
    assert best.tolist() == [cands[0, 0, 0], cands[1, 1, 0], cands[1, 2, 0], cands[2, 3, 0]]


def test_restarts_not_weaker(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = on_device
    one = accuracy(model, PGD(model, eps=EPS, steps=5, seed=0)(x, y), y)
    three = accuracy(model, PGD(model, eps=EPS, steps=5, restarts=3, seed=0)(x, y), y)
    assert three <= one + 0.01


def test_amp_and_channels_last(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = on_device
    ref = accuracy(model, PGD(model, eps=EPS, steps=10, seed=0)(x, y), y)
    amp = accuracy(model, PGD(model, eps=EPS, steps=10, seed=0, amp=True)(x, y), y)
    assert abs(amp - ref) <= 0.03
    model = copy.deepcopy(model)
    cl = accuracy(model, PGD(model, eps=EPS, steps=10, seed=0, channels_last=True)(x, y), y)
    assert abs(cl - ref) <= 0.01


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda m: PGD(m, eps=-0.1), "eps"),
        (lambda m: PGD(m, alpha=-1.0), "alpha"),
        (lambda m: PGD(m, steps=0), "steps"),
        (lambda m: PGD(m, restarts=0), "restarts"),
        (lambda m: PGD(m, norm="l1"), "norm"),
        (lambda m: PGD(m, loss="mse"), "loss"),
        (lambda m: APGD(m, rho=1.5), "rho"),
        (lambda m: APGD(m, targeted=True, loss="ce"), "loss"),
        (lambda m: make_attack("pgd-ish", m, eps=0.1), "unknown attack"),
    ],
)
def test_bad_hyper_parameters(digits_model, make, match):
    with pytest.raises(ValueError, match=match):
        make(digits_model)


def test_bad_inputs(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = (t[:8] for t in on_device)
    atk = PGD(model, eps=EPS, steps=1)
    with pytest.raises(ValueError, match="clip"):
        atk(x * 2, y)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        atk(bad, y)
    with pytest.raises(ValueError, match="labels has length 7"):
        atk(x, y[:7])
    with pytest.raises(ValueError, match="labels"):
        atk(x, y.float())
    if device.type == "cpu":
        with pytest.raises(ValueError, match="cuda_graph"):
            PGD(model, eps=EPS, cuda_graph=True)(x, y)


def test_evaluate_counts_correctly(model_on, device, test_set):
    model, on_device = model_on, tuple(t.to(device) for t in test_set)
    x, y = (t[:100] for t in on_device)
    names = ("clean", "fgsm", "pgd5", "cw5")
    result = evaluate(model, (x, y), names, eps=EPS, batch_size=40, seed=0, progress=False)
    right = {}
    for name in names:
        parts = []
        for start in range(0, 100, 40):  # the same batches, so the same seeded random starts
            xb, yb = x[start:start + 40], y[start:start + 40]
            xa = xb if name == "clean" else make_attack(name, model, eps=EPS, seed=0)(xb, yb)
            # robust only where the clean image is right too (RobustBench's convention)
            parts.append((model(xa).argmax(1) == yb) & (model(xb).argmax(1) == yb))
        right[name] = torch.cat(parts)
        assert result[name] == pytest.approx(right[name].float().mean().item())
    worst = torch.stack(list(right.values())).all(0).float().mean().item()
    assert result["worst"] == pytest.approx(worst)
    assert result["worst"] <= min(result[n] for n in names)
    assert all(result[n] <= result["clean"] for n in names)
    assert result["n"] == 100
    # A Dataset and a DataLoader give the same numbers.
    ds = torch.utils.data.TensorDataset(x, y)
    assert evaluate(model, ds, names, eps=EPS, batch_size=40, seed=0, progress=False) == result


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_cuda_graph_matches_eager_and_never_syncs(digits_model, test_set):
    model = copy.deepcopy(digits_model).cuda()
    x, y = (t.cuda() for t in test_set)
    for cls, kw in ((PGD, dict(steps=10)), (APGD, dict(steps=20)), (APGDT, dict(steps=10, n_target_classes=3, batch_targets=True))):
        eager = cls(model, eps=EPS, seed=0, **kw)(x, y)
        graphed_atk = cls(model, eps=EPS, seed=0, cuda_graph=True, **kw)
        graphed = graphed_atk(x, y)
        torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=0)
        torch.testing.assert_close(graphed_atk(x, y), graphed, atol=0, rtol=0)  # replayed graph
    # The loop itself (perturb, after the one-off input checks) must not synchronise.
    atk = PGD(model, eps=EPS, steps=5, seed=0)
    atk(x, y)  # warm up allocations
    torch.cuda.set_sync_debug_mode("error")
    try:
        atk.perturb(x, y)
        APGD(model, eps=EPS, steps=10, seed=0).perturb(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
