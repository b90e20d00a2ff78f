"""FAB, Square and the composed AutoAttack: their defining properties, the hyperplane projections
against independent float64 solutions, agreement with torchattacks, and AutoAttack = its parts."""
import copy

import pytest
import torch
from torch import nn

from fastprune.attacks import APGD, APGDT, FAB, AutoAttack, Square, evaluate, make_attack
from fastprune.attacks.fab import project_l2, project_linf
from fastprune.attacks.square import eta_pattern, p_schedule

from ..conftest import GPU

EPS = 0.1


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def distance(a, b, norm):
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


@pytest.fixture(scope="module")
def test_set(digits):
    return digits.test.tensors


# --- projections onto a hyperplane inside the box ------------------------------------------------
def reference_projection(t, w, b, norm):
    """The smallest step d (float64) with w.(t + d) = b and t + d in [0, 1], by bisection on an
    independent characterisation: Linf, the smallest radius r whose box [max(-r, -t), min(r, 1 - t)]
    reaches b; L2, the KKT solution d = clip(lambda w, -t, 1 - t) with lambda found by bisection."""
    c = b - (w * t).sum(1)  # the change of w.x needed
    out = torch.empty_like(t)
    for i in range(t.shape[0]):
        ti, wi, ci = t[i], w[i], c[i]
        if norm == "linf":
            def reach(r):
                lo, hi = torch.clamp(-ti, min=-r), torch.clamp(1 - ti, max=r)
                return torch.where(wi * torch.sign(ci) > 0, hi, lo)  # the move that helps most
            lo_r, hi_r = 0.0, 1.0
            for _ in range(200):
                mid = (lo_r + hi_r) / 2
                if (wi * reach(mid)).sum() * torch.sign(ci) >= ci.abs():
                    hi_r = mid
                else:
                    lo_r = mid
            d = reach(hi_r)
            # Coordinates beyond what is needed are free up to r: report the radius only.
            out[i] = d
        else:
            def step(lam):
                return torch.minimum(torch.maximum(lam * wi, -ti), 1 - ti)
            lo_l, hi_l = -1e6, 1e6
            for _ in range(300):
                mid = (lo_l + hi_l) / 2
                if (wi * step(mid)).sum() < ci:
                    lo_l = mid
                else:
                    hi_l = mid
            out[i] = step((lo_l + hi_l) / 2)
    return out


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dim", [1, 2, 7, 64, 300])
def test_projection_is_the_smallest_step(norm, dim):
    gen = torch.Generator().manual_seed(dim)
    rows = 24
    t = torch.rand(rows, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    w[:, : dim // 3] *= (torch.rand(rows, dim // 3, generator=gen) < 0.5).double()  # zero weights too
    # Targets reachable inside the box: a random point of the box on the hyperplane.
    goal = torch.rand(rows, dim, generator=gen, dtype=torch.float64)
    b = (w * goal).sum(1)
    d = (project_linf if norm == "linf" else project_l2)(t, w, b)
    assert torch.allclose((w * (t + d)).sum(1), b, atol=1e-9 * dim), "the step must reach the hyperplane"
    assert (t + d >= -1e-12).all() and (t + d <= 1 + 1e-12).all(), "the step must stay inside the box"
    ref = reference_projection(t, w, b, norm)
    size = distance(d, torch.zeros_like(d), norm)
    ref_size = distance(ref, torch.zeros_like(ref), norm)
    assert torch.allclose(size, ref_size, rtol=1e-6, atol=1e-9), (size - ref_size).abs().max()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_torchattacks(norm):
    torchattacks_fab = pytest.importorskip("torchattacks.attacks.fab")
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(40, 50, generator=gen)
    w = torch.randn(40, 50, generator=gen)
    w[:5, :20] = 0
    b = torch.randn(40, generator=gen) * 4  # reachable and unreachable rows
    ours = (project_linf if norm == "linf" else project_l2)(t, w, b)
    theirs = getattr(torchattacks_fab, f"projection_{norm}")(t, w, b)
    assert torch.allclose(ours, theirs, atol=1e-6)


# --- FAB ----------------------------------------------------------------------------------------
class Linear2(nn.Module):
    """Two-class linear model: the smallest adversarial perturbation is known in closed form."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        f = x.flatten(1) @ self.w + self.b
        return torch.stack([f, -f], dim=1) / 2  # class 0 iff f > 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_fab_finds_the_minimal_perturbation_of_a_linear_model(norm, targeted, device):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, generator=gen) * 0.5
    model = Linear2(w, torch.tensor(0.0)).to(device)
    x = (0.5 + 0.02 * torch.randn(32, 3, 4, 4, generator=gen)).to(device)  # far from the box's faces
    with torch.no_grad():
        f = model(x)[:, 0] * 2
    y = (f < 0).long()
    dual = w.abs().sum() if norm == "linf" else w.norm()
    minimal = f.abs() / dual.to(device)
    eps = 0.45 if norm == "linf" else 3.0
    x_adv = FAB(model, eps=eps, norm=norm, steps=20, targeted=targeted, n_target_classes=1)(x, y)
    found = distance(x_adv, x, norm)
    fooled = model(x_adv).argmax(1) != y
    assert fooled.all(), "every point is within reach"
    assert (found >= minimal * (1 - 1e-4)).all(), "nothing is smaller than the minimal perturbation"
    assert (found <= minimal * 1.06).all(), (found / minimal).max()  # eta = 1.05 overshoot at most


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
@pytest.mark.parametrize("targeted", [False, True])
def test_fab_matches_torchattacks(model_on, device, test_set, norm, eps, targeted):
    torchattacks = pytest.importorskip("torchattacks")
    model = model_on
    x, y = (t[:96].to(device) for t in test_set)
    ours = FAB(model, eps=eps, norm=norm, steps=10, targeted=targeted, n_target_classes=3)(x, y)
    theirs = torchattacks.FAB(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=10,
                              multi_targeted=targeted, n_classes=4)(x, y)  # n_classes - 1 targets
    # Deterministic (one run from the image itself): the same algorithm gives the same points.
    assert abs(accuracy(model, ours, y) - accuracy(model, theirs, y)) <= 1 / 96 + 1e-6
    assert 0.1 < accuracy(model, ours, y) < 0.9


# --- Square -------------------------------------------------------------------------------------
def test_square_schedule_and_pattern():
    assert p_schedule(0, 5000, 0.8, False) == 0.8 and p_schedule(11, 5000, 0.8, False) == 0.4
    assert p_schedule(9000, 10000, 0.8, False) == 0.8 / 512
    assert p_schedule(2500, 5000, 0.8, True) == p_schedule(5000, 10000, 0.8, False)
    for s in (1, 3, 5, 8):
        eta = eta_pattern(s, "cpu")
        assert eta.shape == (s, s) and abs(eta.pow(2).sum().item() - 1) < 1e-6
        if s > 1:
            assert (eta[: s // 2] > 0).all() and (eta[s // 2:] < 0).all()


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_square_does_not_depend_on_compaction(model_on, device, test_set, norm, eps):
    x, y = (t[:48].to(device) for t in test_set)
    a = Square(model_on, eps=eps, norm=norm, n_queries=60, seed=3, compact_every=1)(x, y)
    b = Square(model_on, eps=eps, norm=norm, n_queries=60, seed=3, compact_every=7)(x, y)
    assert torch.equal(a, b), "every random draw has the batch's shape: compaction must not change a result"


def test_square_matches_torchattacks(model_on, device, test_set):
    torchattacks = pytest.importorskip("torchattacks")
    model = model_on
    x, y = (t[:128].to(device) for t in test_set)
    for norm, eps in (("linf", EPS), ("l2", 0.5)):
        ours = accuracy(model, Square(model, eps=eps, norm=norm, n_queries=300, seed=0)(x, y), y)
        torch.manual_seed(0)
        theirs = accuracy(model, torchattacks.Square(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                                                     n_queries=300, seed=0)(x, y), y)
        assert abs(ours - theirs) <= 0.03, (norm, ours, theirs)


# --- every new attack: ball, box, clean prediction, seeds ------------------------------------------
NEW_ATTACKS = {
    "fab": lambda m, eps, norm: FAB(m, eps=eps, norm=norm, steps=5, restarts=2, seed=0),
    "fab-t": lambda m, eps, norm: FAB(m, eps=eps, norm=norm, steps=5, targeted=True, n_target_classes=2, seed=0),
    "square": lambda m, eps, norm: Square(m, eps=eps, norm=norm, n_queries=40, seed=0),
    "autoattack": lambda m, eps, norm: AutoAttack(m, eps=eps, norm=norm, steps=5, n_queries=40, n_target_classes=2,
                                                  seed=0),
}


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", list(NEW_ATTACKS))
def test_inside_ball_and_box_never_helps_and_reproducible(model_on, device, test_set, name, norm):
    model = model_on
    x, y = (t[:64].to(device) for t in test_set)
    y = y.clone()
    y[:4] = (y[:4] + 1) % 10  # misclassified from the start: must stay misclassified
    eps = EPS if norm == "linf" else 0.5
    attack = NEW_ATTACKS[name](model, eps, norm)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (distance(x_adv, x, norm) <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        clean_right = model(x).argmax(1) == y
        adv_right = model(x_adv).argmax(1) == y
    assert not (adv_right & ~clean_right).any(), "an attack must never fix a wrong prediction"
    assert adv_right.float().mean() < clean_right.float().mean(), "the attack fooled nothing"
    assert torch.equal(NEW_ATTACKS[name](model, eps, norm)(x, y), x_adv), "a seeded attack must be reproducible"


def test_autoattack_is_its_components_in_sequence(model_on, device, test_set):
    model = model_on
    x, y = (t[:80].to(device) for t in test_set)
    settings = dict(eps=EPS, seed=0)
    auto = AutoAttack(model, steps=8, n_queries=50, n_target_classes=3, **settings)
    x_auto, report = auto.run(x, y)

    by_hand = [APGD(model, steps=8, loss="ce", **settings), APGDT(model, steps=8, n_target_classes=3, **settings),
               FAB(model, steps=8, targeted=True, n_target_classes=3, **settings),
               Square(model, n_queries=50, p_init=0.8, rescale_schedule=False, **settings)]
    x_adv = x.clone()
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    expected = {"clean": robust.float().mean().item()}
    for name, attack in zip(("apgd-ce", "apgd-t", "fab-t", "square"), by_hand):
        index = robust.nonzero().squeeze(1)
        if index.numel():
            candidate = attack(x[index], y[index])
            with torch.no_grad():
                fooled = model(candidate).argmax(1) != y[index]
            x_adv[index[fooled]] = candidate[fooled]
            robust[index[fooled]] = False
        expected[name] = robust.float().mean().item()
    assert torch.equal(x_auto, x_adv)
    assert report == {**expected, "autoattack": expected["square"]}
    values = list(expected.values())
    assert all(a >= b for a, b in zip(values, values[1:])), "robust accuracy can only fall"


def test_evaluate_reports_autoattack_components(model_on, device, test_set):
    x, y = (t[:50].to(device) for t in test_set)
    result = evaluate(model_on, (x, y), ("clean", "pgd5", "autoattack"), eps=EPS, batch_size=32, progress=False,
                      seed=0, settings={"autoattack": {"steps": 5, "n_queries": 30, "n_target_classes": 2}})
    keys = [k for k in result if k.startswith("autoattack")]
    assert keys == ["autoattack/apgd-ce", "autoattack/apgd-t", "autoattack/fab-t", "autoattack/square", "autoattack"]
    chain = [result["clean"]] + [result[k] for k in keys]
    assert all(a >= b for a, b in zip(chain, chain[1:]))
    assert result["worst"] <= min(result["pgd5"], result["autoattack"])
    with pytest.raises(ValueError, match="settings"):
        evaluate(model_on, (x, y), ("clean", "pgd5"), eps=EPS, settings={"square": {}}, progress=False)


def test_apgd_t_targets_in_turn_not_weaker_than_batched(model_on, device, test_set):
    model = model_on
    x, y = (t[:96].to(device) for t in test_set)
    in_turn = accuracy(model, APGDT(model, eps=EPS, steps=20, n_target_classes=3, seed=0)(x, y), y)
    batched = accuracy(model, APGDT(model, eps=EPS, steps=20, n_target_classes=3, seed=0, batch_targets=True)(x, y), y)
    assert abs(in_turn - batched) <= 0.03, (in_turn, batched)


def test_amp_and_channels_last_agree(model_on, device, test_set):
    x, y = (t[:64].to(device) for t in test_set)
    settings = dict(eps=EPS, steps=10, n_queries=100, n_target_classes=3, seed=0)
    ref = accuracy(model_on, AutoAttack(model_on, **settings)(x, y), y)
    amp = accuracy(model_on, AutoAttack(model_on, amp=True, **settings)(x, y), y)
    model = copy.deepcopy(model_on)
    cl = accuracy(model, AutoAttack(model, channels_last=True, **settings)(x, y), y)
    assert abs(amp - ref) <= 0.05 and abs(cl - ref) <= 0.02, (ref, amp, cl)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda m: FAB(m, alpha_max=2.0), "alpha_max"),
        (lambda m: FAB(m, beta=-0.1), "beta"),
        (lambda m: FAB(m, eta=0), "eta"),
        (lambda m: FAB(m, steps=0), "steps"),
        (lambda m: FAB(m, n_target_classes=0), "n_target_classes"),
        (lambda m: Square(m, n_queries=0), "n_queries"),
        (lambda m: Square(m, p_init=1.5), "p_init"),
        (lambda m: Square(m, loss="dlr"), "loss"),
        (lambda m: Square(m, compact_every=0), "compact_every"),
        (lambda m: AutoAttack(m, version="fast"), "version"),
        (lambda m: AutoAttack(m, version=[]), "version"),
        (lambda m: AutoAttack(m, version=["apgd-ce", "apgd-ce"]), "twice"),
        (lambda m: AutoAttack(m, version=["pgd"]), "component"),
        (lambda m: AutoAttack(m, eps=8), "eps"),
        (lambda m: make_attack("square-ish", m, eps=0.1), "unknown attack"),
    ],
)
def test_bad_arguments(digits_model, make, match):
    with pytest.raises(ValueError, match=match):
        make(digits_model)


def test_square_needs_images(device):
    model = nn.Sequential(nn.Linear(6, 3)).to(device)
    x, y = torch.rand(4, 6, device=device), torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="N, C, H, W"):
        Square(model, eps=0.1, n_queries=5)(x, y)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(device)
    with pytest.raises(ValueError, match="5 pixels"):
        Square(model, eps=0.5, norm="l2", n_queries=5)(torch.rand(4, 3, 4, 4, device=device), y)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_fab_and_square_steps_never_sync(digits_model, test_set):
    """A FAB run and Square's iterations between compactions run without host synchronisation."""
    model = copy.deepcopy(digits_model).cuda()
    x, y = (t[:64].cuda() for t in test_set)
    fab = FAB(model, eps=EPS, steps=3, targeted=True, seed=0)
    square = Square(model, eps=EPS, n_queries=5, seed=0)
    for norm in ("linf", "l2"):
        fab.norm = square.norm = norm
        target = (y + 1) % 10
        best_norm = torch.full((64,), 1e10, device="cuda")
        rows = torch.arange(64, device="cuda")
        fab._run(x, y, target, True, x.clone(), best_norm, fab.generator(x.device))  # warm up
        torch.cuda.set_sync_debug_mode("error")
        try:
            fab._run(x, y, target, True, x.clone(), best_norm, fab.generator(x.device))
            gen = square.generator(x.device)
            x_best = square._init(x, gen)
            for i in range(3):
                x_new = square._proposal(x, x_best, p_schedule(i, 5, 0.8, False), gen, rows, 64)
                square._margin_and_loss(x_new, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
