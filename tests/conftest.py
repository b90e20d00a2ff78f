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


def backend_device_pairs(spec=None):
    """(backend, device) pairs this machine can run, for one op family (its OpSpec) or any op:
    every non-reference backend on every device it supports."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if GPU else [])
    runs = spec.runs if spec is not None else backends.backend_runs_on
    return [
        pytest.param(b, d, id=f"{b}-{d.type}")
        for d in devices
        for b in backends.BACKENDS
        if b != "reference" and runs(b, d)
    ]


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
