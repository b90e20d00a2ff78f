"""DeepSparse (Neural Magic's sparse CPU inference engine) as a baseline of `fastprune bench sparse`.

Optional: used when some Python can import ``deepsparse`` (this one, ``--deepsparse-python PATH``
or the ``FASTPRUNE_DEEPSPARSE_PYTHON`` environment variable), skipped with a message otherwise.
DeepSparse 1.8 needs numpy < 2 and onnx < 1.15, so it usually lives in a virtual environment of
its own (``python3.11 -m venv ds && ds/bin/pip install deepsparse==1.8.0 "numpy<2"``); the engine
runs there in a worker process (deepsparse_worker.py) that times each run itself, so the pipe costs
nothing in the figures and the runs still interleave with fastprune's. The model goes over as an
ONNX export (needs the ``onnx`` package here), the input and output as .npy files.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

# (Not named deepsparse.py: the worker runs from this folder, where that name would hide the package.)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepsparse_worker.py")


def find_python(explicit: str | None = None) -> str | None:
    """A Python that can import deepsparse: ``explicit`` (an error if it cannot), else this one,
    else $FASTPRUNE_DEEPSPARSE_PYTHON; None when there is none."""
    if explicit:
        candidates = [explicit]
    else:
        candidates = [sys.executable] if importlib.util.find_spec("deepsparse") is not None else []
        if os.environ.get("FASTPRUNE_DEEPSPARSE_PYTHON"):
            candidates.append(os.environ["FASTPRUNE_DEEPSPARSE_PYTHON"])
    for python in candidates:
        try:
            found = subprocess.run([python, "-c", "import deepsparse"], capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if found.returncode == 0:
            return python
    if explicit:
        raise ValueError(f"--deepsparse-python {explicit!r}: that Python cannot import deepsparse")
    return None


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that torch.onnx exports: adaptive average pooling that ONNX cannot express
    (VGG16's 1x1 -> 2x2) replaced by the same function in plain ops."""
    from ..nn.sparse.passes import FastAdaptiveAvgPool2d
    from ..nn.masked import _replace

    out = copy.deepcopy(model).eval()
    for name, module in list(out.named_modules()):
        if FastAdaptiveAvgPool2d.replaces(module):
            _replace(out, name, FastAdaptiveAvgPool2d.from_module(module))
    return out


class DeepSparseEngine:
    """``model`` compiled by DeepSparse for one batch size, in a worker process. Calling it runs the
    engine on the input given to :meth:`set_input` and returns the seconds a run took, timed in the
    worker (``reports_seconds``: fastprune.utils.timing takes that instead of the wall time);
    ``burst`` > 1: an untimed run, then burst - 1 timed back to back in the worker, their median."""

    reports_seconds = True

    def __init__(self, python: str, model: nn.Module, example: torch.Tensor, threads: int):
        try:
            import onnx  # noqa: F401 - torch.onnx.export needs it
        except ImportError as exc:
            raise RuntimeError("the DeepSparse baseline exports ONNX: pip install onnx") from exc
        self._dir = tempfile.TemporaryDirectory(prefix="fastprune-deepsparse-")
        path = os.path.join(self._dir.name, "model.onnx")
        with torch.no_grad():
            torch.onnx.export(exportable(model).cpu(), (example.cpu(),), path, dynamo=False, opset_version=13,
                              input_names=["input"], output_names=["output"])
        self._proc = subprocess.Popen([python, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.version = self._ask(cmd="compile", onnx=path, batch=example.shape[0], cores=threads)["version"]
        self.set_input(example)

    def _ask(self, **msg) -> dict:
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the DeepSparse worker exited")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"DeepSparse: {answer['error']}")
        return answer

    def set_input(self, x: torch.Tensor) -> None:
        import numpy as np

        path = os.path.join(self._dir.name, "input.npy")
        np.save(path, x.detach().cpu().float().numpy(), allow_pickle=False)
        self._ask(cmd="input", path=path)

    def __call__(self, burst: int = 1) -> float:
        return float(self._ask(cmd="run", out=None, burst=int(burst))["seconds"])

    def output(self) -> torch.Tensor:
        """The engine's output on the current input."""
        import numpy as np

        path = os.path.join(self._dir.name, "output.npy")
        self._ask(cmd="run", out=path)
        return torch.from_numpy(np.load(path, allow_pickle=False))

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._ask(cmd="quit")
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._dir.cleanup()

    def __enter__(self) -> "DeepSparseEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
