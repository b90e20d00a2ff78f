"""Backend selection, the extension's presence, and the `fastprune info` contract."""
import json
import os

import pytest
import torch

import fastprune
from fastprune import backends
from fastprune.cli import main


def test_use_backend_and_environment(monkeypatch):
    monkeypatch.delenv("FASTPRUNE_BACKEND", raising=False)
    assert backends.requested_backend() == "auto"
    with fastprune.use_backend("reference"):
        assert backends.requested_backend() == "reference"
        assert backends.choose("pgd_step", torch.device("cpu"), {"cpu": ("cpp",)}) == "reference"
    monkeypatch.setenv("FASTPRUNE_BACKEND", "reference")
    assert backends.requested_backend() == "reference"
    monkeypatch.setenv("FASTPRUNE_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTPRUNE_BACKEND"):
        backends.requested_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastprune.use_backend("fortran"):
            pass


def test_explicit_unavailable_backend_raises_but_auto_falls_back(monkeypatch):
    monkeypatch.delenv("FASTPRUNE_BACKEND", raising=False)
    x = torch.rand(2, 3)
    with fastprune.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run pgd_step on cpu"):
        fastprune.pgd_step(x, x, x, alpha=0.1, eps=0.1)
    # auto: an op whose preferred backend is missing falls back to the reference.
    assert backends.choose("no_such_op", torch.device("cpu"), {"cpu": ("cuda",)}) == "reference"


def test_auto_prefers_native_cpu_kernels():
    if backends.extension_info()["cpp"]:
        assert backends.choose("pgd_step", torch.device("cpu"), {"cpu": ("cpp",)}) == "cpp"


@pytest.mark.skipif("FASTPRUNE_EXPECT_EXTENSION" not in os.environ, reason="scripts/test.sh sets it")
def test_extension_was_built_with_the_expected_kernels():
    # With nvcc present the CUDA kernels must be in fastprune._C: a CUDA compile or link error, or
    # a build that silently skipped CUDA, must not pass.
    expected = set(os.environ["FASTPRUNE_EXPECT_EXTENSION"].split(","))
    info = backends.extension_info()
    assert {k for k, built in info.items() if built} == expected


def test_info_command(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("version", "torch", "triton", "backends", "extension"):
        assert key in info
    assert info["version"] == fastprune.__version__
    assert "reference" in info["backends"]
    assert set(info["extension"]) == {"cpp", "cuda"}


def test_missing_extension_falls_back_and_logs_once(tmp_path):
    # A fresh interpreter in which `import fastprune._C` fails, as after FASTPRUNE_BUILD_EXT=0.
    import subprocess
    import sys

    code = (
        "import sys, logging; sys.modules['fastprune._C'] = None\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "import torch, fastprune\n"
        "assert fastprune.extension_info() == {'cpp': False, 'cuda': False}\n"
        "assert 'cpp' not in fastprune.available_backends()\n"
        "x = torch.rand(3, 4)\n"
        "for _ in range(3):\n"
        "    y = fastprune.pgd_step(x, torch.randn_like(x), x, alpha=0.1, eps=0.05)\n"
        "assert ((y - x).abs() <= 0.05 + 1e-7).all()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTPRUNE_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("uses the reference backend") == 1, proc.stderr
