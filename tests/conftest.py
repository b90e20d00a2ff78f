"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET=1 must be set
before triton is first imported, which is why it happens here, at collection time.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastprune import backends  # noqa: E402

GPU = torch.cuda.is_available()
if GPU:
    # PyTorch runs cuDNN convolutions in TF32 by default (about 1e-3 relative): the dense models the
    # tests take as references must be float32-accurate, as fastprune's kernels are (tf32x3 dots).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # Seeded attacks are checked to repeat bit for bit; cuDNN's default input-gradient algorithms
    # may add with atomics (L2 attacks and FAB repeated only to the last bits on an H200).
    torch.backends.cudnn.deterministic = True


NEEDS_GPU = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA device")]

# Every device-dependent test runs on each device: the CPU always, CUDA where there is one (the
# cuda variants are collected everywhere and skip without a GPU, so the GPU machine runs the same
# assertions as CI).
DEVICES = [pytest.param(torch.device("cpu"), id="cpu"), pytest.param(torch.device("cuda"), id="cuda", marks=NEEDS_GPU)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def backend_device_pairs(spec=None):
    """(backend, device) pairs for one op family (its OpSpec) or any op: on the CPU every
    non-reference backend this machine can run; on CUDA every GPU backend (triton, cuda), skipped
    without a GPU and failing, not skipped, on a GPU machine where one cannot run."""
    runs = spec.runs if spec is not None else backends.backend_runs_on
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pairs = [pytest.param(b, cpu, id=f"{b}-cpu") for b in backends.BACKENDS if b != "reference" and runs(b, cpu)]
    gpu_backends = spec.preference.get("cuda", ()) if spec is not None else ("triton", "cuda")
    pairs += [pytest.param(b, cuda, id=f"{b}-cuda", marks=NEEDS_GPU) for b in gpu_backends]
    return pairs


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def model_on(digits_model, device):
    """A copy of ``digits_model`` on the test's device."""
    import copy

    return copy.deepcopy(digits_model).to(device).eval()


@pytest.fixture(scope="session")
def digits():
    from fastprune.data import get_dataset

    return get_dataset("digits")


@pytest.fixture(scope="session")
def digits_model(digits):
    """cnn-small naturally trained on digits (about 98% clean accuracy, a few seconds on CPU).
    Treat as read-only: tests that change modes or grads work on a copy."""
    from fastprune.models import get_model
    from fastprune.train import train_classifier

    torch.manual_seed(0)
    model = get_model("cnn-small", digits.num_classes, digits.in_channels)
    train_classifier(model, digits.train, epochs=15, seed=0, progress=False)
    return model.eval()
