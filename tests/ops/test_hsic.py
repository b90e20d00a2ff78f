"""HSIC: the Gaussian Gram op on every backend vs the reference vs float64, the estimators, the
bottleneck and its module."""
import pytest
import torch
from torch import nn

import fastprune
from fastprune.ops.hsic import _SPEC, _gaussian_gram_op
from fastprune.reference.hsic import (
    centre,
    gaussian_gram_backward_ref,
    gaussian_gram_ref,
    hsic_from_kernels,
    linear_gram_ref,
)

from ..conftest import backend_device_pairs

# Odd shapes: tiny, non powers of two, the CPU Triton tiles (16 rows, 32 features) plus one, and
# enough features for several d-splits.
GRAM_SHAPES = [(2, 1), (5, 3), (17, 33), (37, 129), (17, 300), (40, 70), (9, 4200)]  # 4200: CPU chunks of 2048
ESTIMATORS = ("biased", "unbiased", "cka", "nocco")


def offset_data(m, d, seed, device="cpu", dtype=torch.float32):
    """Random features far from the origin (mean 3): float32 distances computed from raw norms
    would cancel; the kernels must centre first."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=gen) * 0.5 + 3.0).to(device=device, dtype=dtype)


def median_scale(x):
    dist = torch.pdist(x.double())
    return 0.5 / dist.median().clamp_min(1e-3) ** 2


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC))
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=str)
def test_gram_forward_matches_reference_and_float64(backend, device, shape):
    x = offset_data(*shape, seed=shape[0] * 1000 + shape[1], device=device)
    scale = median_scale(x.cpu()).float().to(device)
    mean = x.mean(0)
    with fastprune.use_backend(backend):
        k = _gaussian_gram_op(x, mean, scale, True)
        dist = _gaussian_gram_op(x, mean, scale, False)
    exact = gaussian_gram_ref(x.double(), scale.double())
    torch.testing.assert_close(k.double(), exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(k, gaussian_gram_ref(x, scale), atol=1e-6, rtol=0)
    exact_dist = torch.cdist(x.double(), x.double()).square()
    torch.testing.assert_close(dist.double(), exact_dist, atol=1e-4 * exact_dist.max().item(), rtol=0)
    assert torch.equal(torch.diagonal(k), torch.ones(shape[0], device=device))
    assert torch.equal(k, k.T)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC))
def test_gram_half_precision_inputs(backend, device):
    x = offset_data(33, 65, seed=3, device=device, dtype=torch.float16)
    scale = median_scale(x.float().cpu()).float().to(device)
    with fastprune.use_backend(backend):
        k = _gaussian_gram_op(x, x.float().mean(0), scale, True)
    torch.testing.assert_close(k.double(), gaussian_gram_ref(x.double(), scale.double()), atol=1e-5, rtol=0)


def test_triton_gram_writes_every_element():
    pytest.importorskip("triton")
    from fastprune.kernels.hsic import gaussian_gram_fwd

    if not fastprune.backends.backend_runs_on("triton", torch.device("cpu")):
        pytest.skip("Triton interpreter not active")
    x = offset_data(19, 70, seed=5)
    out = torch.full((19, 19), float("nan"))
    gaussian_gram_fwd(x, x.mean(0), torch.tensor(0.01), out, True)
    assert not out.isnan().any()


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC))
@pytest.mark.parametrize("shape", [(5, 3), (17, 33), (37, 129), (40, 70), (9, 4200)], ids=str)
def test_gram_backward_matches_autograd_of_float64_reference(backend, device, shape):
    m, d = shape
    x = offset_data(m, d, seed=m + d, device=device)
    scale = median_scale(x.cpu()).float().to(device)
    grad = torch.randn(m, m, generator=torch.Generator().manual_seed(m)).to(device)  # not symmetric
    with fastprune.use_backend(backend):
        xx = x.clone().requires_grad_(True)
        k = _gaussian_gram_op(xx, xx.detach().mean(0), scale, True)
        (k * grad).sum().backward()
    x64 = x.double().requires_grad_(True)
    (gaussian_gram_ref(x64, scale.double()) * grad.double()).sum().backward()
    torch.testing.assert_close(xx.grad.double(), x64.grad, atol=2e-5 * x64.grad.abs().max().item(), rtol=0)
    # The written-out backward of the reference agrees with autograd too.
    with torch.no_grad():
        k64 = gaussian_gram_ref(x.double(), scale.double())
        torch.testing.assert_close(gaussian_gram_backward_ref(grad.double(), k64, x.double(), scale.double()),
                                   x64.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("m,d", [(128, 16384), (128, 65536), (256, 16384), (64, 3072), (512, 65536), (8, 100)])
def test_gram_split_fills_whole_waves(m, d):
    pytest.importorskip("triton")
    from fastprune.kernels.hsic import FWD_TILES, gram_split

    block_m, block_d, sms = FWD_TILES[True]["BLOCK_M"], FWD_TILES[True]["BLOCK_D"], 132
    tiles = -(-m // block_m)
    upper = tiles * (tiles + 1) // 2
    n_split, per = gram_split(upper, d, block_d, sms)
    assert per % block_d == 0 and (n_split - 1) * per < d <= n_split * per  # every split non-empty, d covered
    programs = upper * n_split
    max_split = min(64, -(-d // (4 * block_d)))
    if upper * max_split >= sms:  # enough work: at most 10% of the slots idle (the old rule: about 25%)
        assert programs / (-(-programs // sms) * sms) >= 0.9
    else:  # too little work for a wave: as many splits as allowed (each at least 4 slices of d)
        assert n_split == max_split


@pytest.mark.parametrize("m,d", [(128, 64 * 224 * 224), (4, 2**31 // 64), (70000, 8)])
def test_gram_backward_grid_within_cuda_limits(m, d):
    # The CUDA grid: axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65535. The old layout put
    # feature tiles on axis 1 and could not launch for d > 4.19M (Triton) or 2.1M (CUDA C++).
    pytest.importorskip("triton")
    from fastprune.kernels.hsic import gram_bwd_grid

    grid = gram_bwd_grid(m, d, on_gpu=True)
    assert grid[0] < 2**31 and grid[1] <= 65535


def test_gram_at_a_feature_dimension_past_the_old_grid_limit():
    # d = 2.2M (more than a 64x224x224 feature map / 3): forward and backward of the CPU kernels
    # against float64, where the old CUDA backward's grid could not launch.
    m, d = 3, 2_200_000
    x = offset_data(m, d, seed=8)
    scale = torch.tensor(0.5 / (2.0 * d), dtype=torch.float32)  # distances ~ 2 d (0.5^2 variance)
    grad = torch.randn(m, m, generator=torch.Generator().manual_seed(1))
    xx = x.clone().requires_grad_(True)
    k = _gaussian_gram_op(xx, x.mean(0), scale, True)
    (k * grad).sum().backward()
    x64 = x.double().requires_grad_(True)
    k64 = gaussian_gram_ref(x64, scale.double())
    (k64 * grad.double()).sum().backward()
    torch.testing.assert_close(k.double(), k64.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(xx.grad.double(), x64.grad, atol=2e-5 * x64.grad.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC))
def test_expanded_gradient_of_a_sum(backend, device):
    # .sum() hands back a stride-0 gradient: the kernels must not read it as dense memory.
    x = offset_data(9, 20, seed=1, device=device).requires_grad_(True)
    with fastprune.use_backend(backend):
        fastprune.gaussian_gram(x, 2.0).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    gaussian_gram_ref(x64, 1 / 8).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5 * x64.grad.abs().max().item(), rtol=0)


def test_gradcheck_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: gaussian_gram_ref(a, 0.3), (x,))
    for estimator in ESTIMATORS:
        assert torch.autograd.gradcheck(
            lambda a, b: hsic_from_kernels(gaussian_gram_ref(a, 0.3), linear_gram_ref(b), estimator), (x, y))


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC) + [pytest.param("reference", torch.device("cpu"))])
def test_precision_on_high_dimensional_data(backend, device):
    # Dimension 3072 (a CIFAR image): Gaussian Gram entries nearly constant, the hard case.
    m, d = 48, 3072
    x, y = offset_data(m, d, seed=11), offset_data(m, d, seed=12)
    y = y + 0.5 * x  # dependent, so that the value is not ~0
    sig = dict(sigma_x=float(torch.pdist(x).median()), sigma_y=float(torch.pdist(y).median()))
    for estimator in ESTIMATORS:
        with fastprune.use_backend(backend):
            got = fastprune.hsic(x.to(device), y.to(device), estimator=estimator, **sig).item()
        sx, sy = (0.5 / s ** 2 for s in sig.values())
        exact = hsic_from_kernels(gaussian_gram_ref(x.double(), sx), gaussian_gram_ref(y.double(), sy), estimator).item()
        eager32 = hsic_from_kernels(gaussian_gram_ref(x, sx), gaussian_gram_ref(y, sy), estimator).item()
        if estimator in ("biased", "cka"):
            assert abs(got - exact) <= 1e-4 * abs(exact), (estimator, got, exact)
        else:  # no worse than a float32 eager computation (with a floor for a lucky eager result)
            assert abs(got - exact) <= max(2 * abs(eager32 - exact), 1e-5 * abs(exact)), (estimator, got, exact, eager32)


def paper_style_nocco(x, y, sx, sy, eps=1e-5):
    """HBaR/PwoA's code path: kernels on the CPU, a dense centring matrix, explicit inverses."""
    def operator(k):
        m = k.shape[0]
        h = torch.eye(m, dtype=k.dtype) - torch.ones(m, m, dtype=k.dtype) / m
        kc = h @ k @ h
        return kc @ torch.inverse(kc + eps * m * torch.eye(m, dtype=k.dtype))

    kx = torch.exp(-torch.cdist(x, x).square() * sx)
    ky = torch.exp(-torch.cdist(y, y).square() * sy)
    return torch.trace(operator(kx) @ operator(ky))


def test_nocco_matches_the_papers_formula():
    x, y = offset_data(32, 200, seed=1).double(), offset_data(32, 50, seed=2).double()
    got = fastprune.hsic(x.float(), y.float(), sigma_x=8.0, sigma_y=5.0, estimator="nocco")
    want = paper_style_nocco(x, y, 0.5 / 64, 0.5 / 25)
    assert abs(got.item() - want.item()) <= 1e-4 * abs(want.item())


def test_properties():
    x, y = offset_data(30, 40, seed=3), offset_data(30, 25, seed=4)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    for estimator in ESTIMATORS:
        v = fastprune.hsic(x, y, sigma_x=4.0, sigma_y=3.0, estimator=estimator)
        swapped = fastprune.hsic(y, x, sigma_x=3.0, sigma_y=4.0, estimator=estimator)
        permuted = fastprune.hsic(x[perm], y[perm], sigma_x=4.0, sigma_y=3.0, estimator=estimator)
        torch.testing.assert_close(swapped, v, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(permuted, v, atol=1e-7, rtol=1e-4)
    assert fastprune.hsic(x, y, sigma_x=4.0, sigma_y=3.0) >= 0
    torch.testing.assert_close(fastprune.hsic(x, x, estimator="cka"), torch.tensor(1.0), atol=1e-5, rtol=0)
    # Centring both matrices: the value equals the explicit H K H L H form.
    k, l = gaussian_gram_ref(x.double(), 1 / 32), gaussian_gram_ref(y.double(), 1 / 18)
    h = torch.eye(30, dtype=torch.float64) - 1 / 30
    torch.testing.assert_close(centre(k), h @ k @ h)
    assert fastprune.hsic(x, y, sigma_x=4.0, sigma_y=3.0).item() == pytest.approx(
        torch.trace(h @ k @ h @ l).item() / 29 ** 2, rel=1e-4)


def test_labels_and_kernels():
    x = offset_data(24, 10, seed=6)
    labels = torch.arange(24) % 5
    onehot = torch.nn.functional.one_hot(labels, 5).float()
    a = fastprune.hsic(x, labels, sigma_x=2.0)
    b = fastprune.hsic(x, onehot, sigma_x=2.0, kernel_y="linear")
    torch.testing.assert_close(a, b)
    c = fastprune.hsic(x, labels, sigma_x=2.0, num_classes=7)  # unused classes change nothing
    torch.testing.assert_close(a, c)
    lin = fastprune.hsic(x, onehot, kernel_x="linear", kernel_y="linear")
    want = hsic_from_kernels(linear_gram_ref(x.double()), linear_gram_ref(onehot.double())).item()
    assert lin.item() == pytest.approx(want, rel=1e-4)


def test_median_heuristic_and_zero_median_guard():
    x, y = offset_data(21, 30, seed=7), offset_data(21, 12, seed=8)
    med_x, med_y = torch.pdist(x).median().item(), torch.pdist(y).median().item()
    torch.testing.assert_close(fastprune.hsic(x, y), fastprune.hsic(x, y, sigma_x=med_x, sigma_y=med_y),
                               atol=1e-6, rtol=1e-4)
    dup = x[:1].repeat(21, 1)
    dup[:3] += 1.0  # most pairs identical: median distance 0
    value = fastprune.hsic(dup, y)
    assert torch.isfinite(value)


def test_gradients_of_every_floating_input():
    x = offset_data(12, 9, seed=9).requires_grad_(True)
    y = offset_data(12, 7, seed=10).requires_grad_(True)
    for estimator in ESTIMATORS:
        x.grad = y.grad = None
        fastprune.hsic(x, y, sigma_x=2.0, sigma_y=2.0, estimator=estimator).backward()
        assert x.grad is not None and y.grad is not None and x.grad.abs().sum() > 0
        grads = {}
        for dtype in (torch.float64, torch.float32):  # exact, and what eager float32 achieves
            xr = x.detach().to(dtype).requires_grad_(True)
            yr = y.detach().to(dtype).requires_grad_(True)
            hsic_from_kernels(gaussian_gram_ref(xr, 1 / 8), gaussian_gram_ref(yr, 1 / 8), estimator).backward()
            grads[dtype] = xr.grad.double()
        exact = grads[torch.float64]
        ours_err = (x.grad.double() - exact).abs().max().item()
        eager_err = (grads[torch.float32] - exact).abs().max().item()
        # NOCCO's (Kc + eps m I)^-1 amplifies float32 rounding: hold the kernels to eager's accuracy.
        assert ours_err <= max(2 * eager_err, 1e-5 * exact.abs().max().item()), (estimator, ours_err, eager_err)


def test_double_backward_raises_clearly():
    x = offset_data(6, 5, seed=1).requires_grad_(True)
    (g,) = torch.autograd.grad(fastprune.hsic(x, x.detach() * 2, sigma_x=2.0, sigma_y=2.0), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_opcheck_and_compile():
    x = offset_data(7, 11, seed=2)
    mean, scale = x.mean(0), torch.tensor(0.02)
    torch.library.opcheck(torch.ops.fastprune.gaussian_gram.default, (x, mean, scale, True))
    torch.library.opcheck(torch.ops.fastprune.gaussian_gram.default, (x.clone().requires_grad_(True), mean, scale, True))
    grad = torch.randn(7, 7)
    torch.library.opcheck(torch.ops.fastprune.gaussian_gram_backward.default,
                          (grad, gaussian_gram_ref(x, 0.02), x, mean, scale))

    def loss(a, b):
        return fastprune.hsic(a, b, sigma_x=3.0, sigma_y=3.0, estimator="nocco", check_inputs=False) * 2

    y = offset_data(7, 4, seed=3)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y), loss(x, y))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, y: fastprune.hsic(x, y[:5]), "batch size"),
        (lambda x, y: fastprune.hsic(x[:1], y[:1]), "m >= 2"),
        (lambda x, y: fastprune.hsic(x[:3], y[:3], estimator="unbiased"), "m >= 4"),
        (lambda x, y: fastprune.hsic(x, y, sigma_x=0.0), "sigma_x"),
        (lambda x, y: fastprune.hsic(x, y, sigma_y=-1.0), "sigma_y"),
        (lambda x, y: fastprune.hsic(x, y, estimator="rbf"), "estimator"),
        (lambda x, y: fastprune.hsic(x, y, kernel_x="poly"), "kernel_x"),
        (lambda x, y: fastprune.hsic(x * float("nan"), y), "NaN"),
        (lambda x, y: fastprune.hsic(x, y.masked_fill(y > 3, float("inf"))), "NaN or Inf"),
        (lambda x, y: fastprune.hsic(x, torch.arange(8) - 1), r"labels must lie in \[0"),
        (lambda x, y: fastprune.hsic(x, torch.arange(8), num_classes=4), r"\[0, 4\)"),
        (lambda x, y: fastprune.hsic(x, y, scale_sigma_by_dim=True), "explicit sigma"),
        (lambda x, y: fastprune.hsic_bottleneck(x, torch.arange(8), [], lambda_x=1, lambda_y=1), "features"),
        (lambda x, y: fastprune.hsic_bottleneck(x, torch.arange(8), [y], lambda_x=float("nan"), lambda_y=1), "lambda_x"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    x, y = offset_data(8, 5, seed=1), offset_data(8, 3, seed=2)
    with pytest.raises(ValueError, match=match):
        call(x, y)


def nocco_formula(a, b, *, label_b=False, num_classes=10, dtype=torch.float64):
    """NOCCO as the papers write it, from first principles in ``dtype``: Gaussian kernels with the
    bandwidth 5 sqrt(d), an explicit centring matrix, explicit inverses (the papers' code's form)."""
    def gauss(t):
        t = t.reshape(t.shape[0], -1).to(dtype)
        d2 = (t[:, None, :] - t[None, :, :]).square().sum(-1)
        return torch.exp(-d2 / (2 * 25.0 * t.shape[1]))

    def operator(k):
        m = k.shape[0]
        h = torch.eye(m, dtype=dtype) - 1.0 / m
        kc = h @ k @ h
        return kc @ torch.linalg.inv(kc + 1e-5 * m * torch.eye(m, dtype=dtype))

    if label_b:
        one_hot = torch.nn.functional.one_hot(b, num_classes).to(dtype)
        kb = one_hot @ one_hot.T
    else:
        kb = gauss(b)
    return torch.trace(operator(gauss(a)) @ operator(kb))


def test_bottleneck_against_the_papers_formula_in_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    labels = torch.arange(16) % 10
    feats = [torch.randn(16, 8, 4, 4, generator=gen, requires_grad=True),
             torch.randn(16, 32, generator=gen, requires_grad=True)]
    value = fastprune.hsic_bottleneck(x, labels, feats, lambda_x=2e-3, lambda_y=1e-2, num_classes=10)
    value.backward()
    grads = {}
    for dtype in (torch.float64, torch.float32):  # the formula exactly, and eagerly in float32
        zs = [z.detach().to(dtype).requires_grad_(True) for z in feats]
        total = sum(2e-3 * nocco_formula(x, z, dtype=dtype) - 1e-2 * nocco_formula(z, labels, label_b=True, dtype=dtype)
                    for z in zs)
        total.backward()
        grads[dtype] = (total.detach().double(), [z.grad.double() for z in zs])
    exact, eager = grads[torch.float64], grads[torch.float32]
    torch.testing.assert_close(value.double(), exact[0], atol=1e-6, rtol=1e-4)
    # NOCCO's inverses amplify rounding: fastprune's float32 gradient may be off float64 by no more
    # than twice what the eager float32 formula is (a wrong index would be off by the gradient's size).
    for z, want, plain in zip(feats, exact[1], eager[1]):
        ours_err = (z.grad.double() - want).abs().max().item()
        eager_err = (plain - want).abs().max().item()
        print(f"gradient error vs float64: fastprune {ours_err:.2e}, eager float32 {eager_err:.2e}")
        assert ours_err <= 2 * eager_err + 1e-7 * want.abs().max().item(), (ours_err, eager_err)
        assert ours_err < 0.05 * want.abs().max().item()


def test_bottleneck_module_with_feature_taps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(12, 1, 4, 4)
    labels = torch.arange(12) % 10
    module = fastprune.nn.HSICBottleneck(model, ["1", "3"], lambda_x=1e-3, lambda_y=1e-2, num_classes=10)
    with pytest.raises(RuntimeError, match="forward pass first"):
        module(x, labels)
    logits = model(x)
    value = module(x, labels)
    hidden = torch.relu(model[0](x))
    want = fastprune.hsic_bottleneck(x, labels, [hidden, logits], lambda_x=1e-3, lambda_y=1e-2, num_classes=10)
    torch.testing.assert_close(value, want)
    value.backward()
    assert model[0].weight.grad is not None
    module.remove()
    model(x)
    assert module.taps.features == {}
    with pytest.raises(ValueError, match="not submodules"):
        fastprune.nn.HSICBottleneck(model, ["nope"], lambda_x=1.0, lambda_y=1.0)
