"""pgd_step: every backend vs the reference vs float64, on fresh random inputs of odd shapes."""
import zlib

import pytest
import torch

import fastprune
from fastprune.ops.pgd import _SPEC, _run_backend
from fastprune.reference import pgd_step_ref

from ..conftest import GPU, backend_device_pairs

# Odd sizes: a single element, non powers of two, the Triton linf tile (2048) plus one, and samples
# of many L2 blocks (1024 elements each; 3x64x64 is 12 blocks, cut into several chunks per sample).
SHAPES = [(1, 1), (3, 5, 7, 9), (4, 3, 1, 1), (2, 2049), (5, 3, 11, 13), (7, 1, 8, 8), (2, 3, 64, 64), (1, 3, 41, 43)]
EPS, CLIP = 0.05, (0.0, 1.0)


def make_inputs(shape, dtype, device, seed, *, per_sample=False):
    gen = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=gen)
    # Start inside and outside the ball, and partly outside the box, so that both clamps bite.
    x_adv = (x_nat + (torch.rand(shape, generator=gen) * 4 - 2) * EPS).clamp(-0.02, 1.02)
    grad = torch.randn(shape, generator=gen)
    grad[torch.rand(shape, generator=gen) < 0.1] = 0.0  # exact zeros: sign(0) takes no step
    n = shape[0]
    if per_sample:
        alpha = torch.rand(n, generator=gen) * 0.05 + 0.005
        eps = torch.rand(n, generator=gen) * 0.1 + 0.01
    else:
        alpha, eps = torch.full((n,), 0.02), torch.full((n,), EPS)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x_adv), cast(grad), cast(x_nat), alpha.to(device), eps.to(device)


def run(backend, x_adv, grad, x_nat, alpha, eps, norm):
    """The backend's output written into a NaN-poisoned buffer, so unwritten elements show."""
    out = torch.full_like(x_adv, float("nan"))
    with fastprune.use_backend(backend):
        _run_backend(x_adv, grad, x_nat, alpha, eps, norm, *CLIP, out)
    return out


def dtypes_for(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC))
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "per-sample"])
def test_backend_matches_reference(backend, device, norm, shape, per_sample):
    for i, dtype in enumerate(dtypes_for(device)):
        args = make_inputs(shape, dtype, device, seed=zlib.crc32(repr((shape, norm, per_sample, i)).encode()),
                           per_sample=per_sample)
        got = run(backend, *args, norm)
        want = pgd_step_ref(*args, norm, *CLIP)
        assert not got.isnan().any(), "the kernel left elements unwritten"
        if norm == "linf":
            # Same float32 operations in the same order: equal to the last bit, in every dtype.
            assert torch.equal(got, want), (got - want).abs().max()
        else:
            atol = 1e-5 if dtype == torch.float32 else 2e-2 if dtype == torch.bfloat16 else 2e-3
            torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_float32_close_to_float64(backend, device, norm):
    x_adv, grad, x_nat, alpha, eps = make_inputs((6, 3, 9, 7), torch.float32, device, seed=7, per_sample=True)
    got = run(backend, x_adv, grad, x_nat, alpha, eps, norm)
    exact = pgd_step_ref(x_adv.double(), grad.double(), x_nat.double(), alpha, eps, norm, *CLIP)
    # One float32 rounding of values <= ~1 is at most 6e-8; L2 adds reduction error.
    torch.testing.assert_close(got.double(), exact, atol=1e-7 if norm == "linf" else 1e-6, rtol=0)


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC))
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_output_inside_ball_and_box(backend, device, norm):
    x_adv, grad, x_nat, alpha, eps = make_inputs((8, 3, 6, 5), torch.float32, device, seed=3, per_sample=True)
    alpha = alpha * 10  # large steps: the projection must do all the work
    y = run(backend, x_adv, grad, x_nat, alpha, eps, norm)
    assert y.min() >= CLIP[0] and y.max() <= CLIP[1]
    d = (y - x_nat).flatten(1)
    dist = d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)
    assert (dist <= eps * (1 + 1e-5) + 1e-7).all(), (dist - eps).max()


@pytest.mark.parametrize("backend,device", backend_device_pairs(_SPEC))
def test_l2_zero_gradient_takes_no_step(backend, device):
    x_adv, grad, x_nat, alpha, eps = make_inputs((3, 2, 4, 4), torch.float32, device, seed=5)
    grad[1] = 0.0
    y = run(backend, x_adv, grad, x_nat, alpha, eps, "l2")
    # Sample 1 only gets projected: the same as a step of size 0.
    projected = pgd_step_ref(x_adv, grad, x_nat, torch.zeros_like(alpha), eps, "l2", *CLIP)
    torch.testing.assert_close(y[1], projected[1], atol=1e-6, rtol=0)
    assert not torch.allclose(y[0], projected[0])


@pytest.mark.parametrize("n,per_sample,targets", [(1, 1, 4), (2, 12288, 4), (32, 3 * 32 * 32, 528),
                                                  (3, 3 * 224 * 224, 528), (1024, 3 * 224 * 224, 528)])
def test_l2_chunks_cover_each_sample_exactly(n, per_sample, targets):
    from fastprune.kernels.pgd import L2_BLOCK, L2_MAX_CHUNKS, l2_chunks

    n_chunks, chunk_len = l2_chunks(n, per_sample, L2_BLOCK, targets)
    assert 1 <= n_chunks <= L2_MAX_CHUNKS and chunk_len % L2_BLOCK == 0
    assert (n_chunks - 1) * chunk_len < per_sample <= n_chunks * chunk_len  # no empty chunk, nothing left out
    # Small batches of large samples are spread over the GPU (32 CIFAR samples on 132 SMs fill it),
    # within the factor 2 lost to rounding chunks to whole blocks.
    assert 2 * n * n_chunks >= min(targets, n * -(-per_sample // L2_BLOCK), n * L2_MAX_CHUNKS)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_public_api_in_place_and_layouts(norm):
    x_adv, grad, x_nat, _, _ = make_inputs((4, 3, 5, 6), torch.float32, "cpu", seed=11)
    expected = fastprune.pgd_step(x_adv, grad, x_nat, alpha=0.02, eps=EPS, norm=norm)
    torch.testing.assert_close(expected, pgd_step_ref(x_adv, grad, x_nat, torch.full((4,), 0.02),
                                                      torch.full((4,), EPS), norm, *CLIP), atol=1e-6, rtol=0)
    # channels_last in, channels_last out, same values.
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x_nat)]
    y_cl = fastprune.pgd_step(*cl, alpha=0.02, eps=EPS, norm=norm)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, expected, atol=1e-6, rtol=0)
    # A non-dense view, and a grad of another dtype and layout, are handled.
    wide = torch.zeros(4, 3, 5, 12)
    wide[..., ::2] = x_adv
    y = fastprune.pgd_step(wide[..., ::2], grad.double(), x_nat, alpha=0.02, eps=EPS, norm=norm)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    # In place: same object, same values.
    buf = x_adv.clone()
    assert fastprune.pgd_step_(buf, grad, x_nat, alpha=0.02, eps=EPS, norm=norm) is buf
    torch.testing.assert_close(buf, expected, atol=1e-6, rtol=0)
    wide = torch.zeros(4, 3, 5, 12)
    wide[..., ::2] = x_adv
    assert fastprune.pgd_step_(wide[..., ::2], grad, x_nat, alpha=0.02, eps=EPS, norm=norm).shape == x_adv.shape
    torch.testing.assert_close(wide[..., ::2], expected, atol=1e-6, rtol=0)
    assert (wide[..., 1::2] == 0).all(), "the in-place step wrote outside its view"


def test_per_sample_tensors_match_floats():
    x_adv, grad, x_nat, _, _ = make_inputs((5, 17), torch.float32, "cpu", seed=2)
    a = fastprune.pgd_step(x_adv, grad, x_nat, alpha=0.03, eps=0.04)
    b = fastprune.pgd_step(x_adv, grad, x_nat, alpha=torch.full((5,), 0.03), eps=torch.tensor(0.04))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha=-0.1), "alpha"),
        (dict(eps=float("nan")), "eps"),
        (dict(alpha=torch.ones(3)), r"alpha must be a float or a tensor of shape \(4,\)"),
        (dict(norm="l1"), "norm"),
        (dict(clip=(1.0, 0.0)), "clip"),
        (dict(clip=0.5), "clip"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    x = torch.rand(4, 3)
    args = dict(alpha=0.1, eps=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fastprune.pgd_step(x, torch.randn_like(x), x, **args)


def test_per_sample_values_are_checked_again_after_an_in_place_change():
    """alpha/eps tensors are checked once per version (the check's host sync made a 3 MB step 30x
    slower on an H200): a tensor changed in place after a passing call must be checked again."""
    x = torch.rand(4, 3)
    alpha, eps = torch.full((4,), 0.1), torch.full((4,), 0.1)
    fastprune.pgd_step(x, torch.randn_like(x), x, alpha=alpha, eps=eps)
    fastprune.pgd_step(x, torch.randn_like(x), x, alpha=alpha, eps=eps)  # cached: passes again
    alpha[2] = -1.0
    with pytest.raises(ValueError, match="alpha must hold finite values >= 0"):
        fastprune.pgd_step(x, torch.randn_like(x), x, alpha=alpha, eps=eps)
    eps[0] = float("nan")
    with pytest.raises(ValueError, match="eps"):
        fastprune.pgd_step(x, torch.randn_like(x), x, alpha=0.1, eps=eps)
    fresh = torch.full((4,), -0.5)  # a new tensor is checked whatever was cached before
    with pytest.raises(ValueError, match="alpha"):
        fastprune.pgd_step(x, torch.randn_like(x), x, alpha=fresh, eps=0.1)


def test_shape_mismatch_names_the_argument():
    x = torch.rand(4, 3)
    with pytest.raises(ValueError, match="grad"):
        fastprune.pgd_step(x, torch.randn(4, 2), x, alpha=0.1, eps=0.1)
    with pytest.raises(ValueError, match="x_nat"):
        fastprune.pgd_step(x, x, torch.rand(3, 3), alpha=0.1, eps=0.1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck(norm):
    x_adv, grad, x_nat, alpha, eps = make_inputs((3, 2, 5, 5), torch.float32, "cpu", seed=1)
    args = (x_adv, grad, x_nat, alpha, eps, norm, *CLIP)
    torch.library.opcheck(torch.ops.fastprune.pgd_step.default, args)
    torch.library.opcheck(torch.ops.fastprune.pgd_step_.default, (x_adv.clone(),) + args[1:])


def test_torch_compile():
    x_adv, grad, x_nat, _, _ = make_inputs((3, 2, 5, 5), torch.float32, "cpu", seed=4)

    def step(x, g, xn):
        return fastprune.pgd_step(x * 1.0, g, xn, alpha=0.01, eps=EPS) + 0.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x_adv, grad, x_nat), step(x_adv, grad, x_nat))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_cuda_vectorised_and_scalar_paths_agree():
    # per_sample % 4 == 0 takes the float4 path; an offset view forces the scalar path.
    base = make_inputs((4, 3, 8, 8), torch.float32, "cuda", seed=9)
    vec = run("cuda", *base, "linf")
    shifted = [torch.cat([t.flatten()[:1], t.flatten()])[1:].view_as(t) for t in base[:3]]
    scalar = run("cuda", *shifted, *base[3:], "linf")
    assert torch.equal(vec, scalar)
