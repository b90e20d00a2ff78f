"""Input gradients under float16 autocast: a confidently classified image's loss gradient underflows in
float16 and the attack stalls (found on an H200: PGD-10 with amp left 42% robust accuracy where
float32 left 24%). fastprune rescales each image's logit gradient before the float16 backward
(utils.autograd.per_sample_scaled_grad). These run on the CPU, whose autocast also has float16."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastprune.attacks import PGD
from fastprune.train.objectives import TRADES
from fastprune.utils.autograd import float16_autocast, per_sample_scaled_grad


def confident_model(margin: float = 30.0) -> nn.Module:
    """A linear classifier whose class 0 wins by about ``margin`` logits: 1 - p_0 ~ exp(-margin)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        model[1].bias.zero_()
        model[1].bias[0] = margin
    return model.eval()


def input_grad(model, x, y, scaled: bool, fp16: bool):
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        logits = model(xg)
    logits = logits.float() if fp16 else logits
    loss = F.cross_entropy(logits, y, reduction="none")
    if scaled:
        return per_sample_scaled_grad(loss, logits, xg)
    return torch.autograd.grad(loss.sum(), xg)[0]


def test_the_unscaled_float16_gradient_underflows_and_the_scaled_one_matches_float32():
    model = confident_model()
    x, y = torch.rand(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    reference = input_grad(model, x, y, scaled=False, fp16=False)
    assert reference.abs().max() > 0
    assert input_grad(model, x, y, scaled=False, fp16=True).abs().max() == 0  # the failure being fixed
    scaled = input_grad(model, x, y, scaled=True, fp16=True)
    assert ((scaled - reference).norm() / reference.norm()) < 2e-2
    assert bool((scaled.sign() == reference.sign()).all())


def test_scaling_is_exact_without_autocast():
    """The rescaling is linear algebra only: in float64 it gives autograd's gradient to rounding."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    x, y = torch.rand(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 10, (5,))
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    loss = F.cross_entropy(logits, y, reduction="none")
    scaled = per_sample_scaled_grad(loss, logits, xg)
    torch.testing.assert_close(scaled, input_grad(model, x, y, scaled=False, fp16=False), rtol=1e-12, atol=1e-15)


def test_float16_autocast_is_detected_only_inside_it():
    cpu = torch.device("cpu")
    assert not float16_autocast(cpu)
    with torch.autocast("cpu", dtype=torch.float16):
        assert float16_autocast(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not float16_autocast(cpu)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_inside_a_float16_autocast_moves_the_images_as_in_float32(norm):
    """A training loop's amp (fit(amp=True) on CUDA) runs the attack under float16 autocast."""
    model = confident_model()
    x, y = torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)
    eps = 0.1 if norm == "linf" else 0.5
    fp32 = PGD(model, eps=eps, alpha=eps / 4, steps=5, norm=norm, seed=0)(x, y)
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = PGD(model, eps=eps, alpha=eps / 4, steps=5, norm=norm, seed=0)(x, y)
    assert (fp16 - x).abs().max() > 0
    moved = (fp32 - x).flatten(1).norm(dim=1)
    assert bool(((fp16 - fp32).flatten(1).norm(dim=1) <= 0.05 * moved + 1e-6).all())


def test_trades_inside_a_float16_autocast_climbs_the_kl_as_in_float32():
    """On a confident model the unscaled float16 KL gradient underflows and TRADES' attack stays at its
    start (0.1% of float32's KL, measured before the fix); scaled, it climbs about as far."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(3)
        model[1].bias.zero_()
        model[1].bias[0] = 12
    x = torch.rand(8, 1, 4, 4)
    trades = TRADES(eps=0.1, alpha=0.025, steps=5)
    torch.manual_seed(3)
    fp32 = trades.adversarial(model, x)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = trades.adversarial(model, x)

    def kl(x_adv):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="none").sum(1)

    # The float16 steps differ from float32's (float16 logits resolve less), so compare how far each
    # climbed, not the points.
    assert bool((kl(fp32) > 1e-6).all())
    assert bool((kl(fp16) >= 0.3 * kl(fp32)).all()), (kl(fp16), kl(fp32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pgd_amp_on_cuda_moves_the_images_as_in_float32():
    """amp=True on CUDA is float16 autocast: the attack must not stall on confident images."""
    model = confident_model().cuda()
    x, y = torch.rand(8, 1, 4, 4, device="cuda"), torch.zeros(8, dtype=torch.long, device="cuda")
    fp32 = PGD(model, eps=0.1, alpha=0.025, steps=5, seed=0)(x, y)
    amp = PGD(model, eps=0.1, alpha=0.025, steps=5, seed=0, amp=True)(x, y)
    moved = (fp32 - x).flatten(1).norm(dim=1)
    assert bool(((amp - fp32).flatten(1).norm(dim=1) <= 0.05 * moved + 1e-6).all())
