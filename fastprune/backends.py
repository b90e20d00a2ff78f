"""Backend selection: which implementation of an op runs.

Backends:
  ``reference``  the pure-PyTorch twin in fastprune.reference (always available);
  ``triton``     Triton kernels in fastprune.kernels (CUDA tensors; CPU tensors only under the Triton
                 interpreter, ``TRITON_INTERPRET=1`` set before triton is imported);
  ``cuda``       CUDA C++ kernels in fastprune._C (when it was built with CUDA and a GPU is present);
  ``cpp``        C++ CPU kernels in fastprune._C.

The default, ``auto``, takes the first available backend in the op's preference list for the
tensor's device. ``FASTPRUNE_BACKEND=<name>`` or ``with fastprune.use_backend(name):`` forces one;
forcing a backend that cannot run the op raises, while ``auto`` falls back and logs it once.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import logging
import os
from typing import Iterator

import torch

BACKENDS = ("reference", "triton", "cuda", "cpp")

log = logging.getLogger("fastprune")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastprune_backend", default=None)
_logged: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def _load_extension() -> bool:
    """Import fastprune._C, whose static initialisers register the native kernels."""
    try:
        import fastprune._C  # noqa: F401
    except ImportError as exc:  # not built (FASTPRUNE_BUILD_EXT=0) or built for another torch
        log.info("fastprune._C is not available (%s); native backends disabled", exc)
        return False
    return True


@functools.lru_cache(maxsize=None)
def _has_native_kernel(op: str, dispatch_key: str) -> bool:
    if not _load_extension():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastprune::{op}", dispatch_key)
    except RuntimeError:  # the op is not registered at all
        return False


def extension_info() -> dict[str, bool]:
    """Whether fastprune._C holds CPU and CUDA kernels: ``{"cpp": bool, "cuda": bool}``."""
    return {"cpp": _has_native_kernel("pgd_step_ext", "CPU"), "cuda": _has_native_kernel("pgd_step_ext", "CUDA")}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run ops on tensors of ``device`` in this process."""
    cuda = device.type == "cuda"
    if backend == "reference":
        return True
    if backend == "triton":
        return triton_importable() and (cuda or (device.type == "cpu" and triton_interpreted()))
    if backend == "cuda":
        return cuda and extension_info()["cuda"]
    if backend == "cpp":
        return device.type == "cpu" and extension_info()["cpp"]
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


def available_backends() -> list[str]:
    """Backends usable in this process on any device (the CPU, and the GPU if there is one)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(backend_runs_on(b, d) for d in devices)]


def requested_backend() -> str:
    """The backend asked for: ``use_backend``'s, else ``FASTPRUNE_BACKEND``, else ``auto``."""
    name = _forced.get() or os.environ.get("FASTPRUNE_BACKEND", "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"FASTPRUNE_BACKEND must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (or ``"auto"``)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Which backends implement an op family and which ``auto`` prefers.

    name: for messages; preference: device type -> backends, fastest first; implemented: every
    backend with an implementation; native: the fastprune._C op whose CPU/CUDA kernel must be
    registered for the cpp/cuda backends to count as available (one name, or a dict from
    "cpp"/"cuda" to the name where the two devices' kernels are different ops).
    """

    name: str
    preference: dict
    implemented: tuple = BACKENDS
    native: str | dict | None = None

    def runs(self, backend: str, device: torch.device) -> bool:
        if backend not in self.implemented or not backend_runs_on(backend, device):
            return False
        if backend in ("cpp", "cuda") and self.native is not None:
            op = self.native.get(backend) if isinstance(self.native, dict) else self.native
            return op is not None and _has_native_kernel(op, "CPU" if backend == "cpp" else "CUDA")
        return True


def choose(spec: OpSpec, device: torch.device) -> str:
    """The backend that runs ``spec``'s op on ``device``: the forced one (which must be able to),
    else the first available in the op's preference for the device, the reference last."""
    name = requested_backend()
    if name != "auto":
        if not spec.runs(name, device):
            raise RuntimeError(
                f"fastprune: backend {name!r} cannot run {spec.name} on {device.type} tensors here "
                f"(implemented: {list(spec.implemented)}; available in this process: {available_backends()})"
            )
        return name
    candidates = list(spec.preference.get(device.type, ())) + ["reference"]
    for backend in candidates:
        if spec.runs(backend, device):
            if backend != candidates[0] and (spec.name, device.type) not in _logged:
                _logged.add((spec.name, device.type))
                log.warning("fastprune: %s on %s uses the %s backend (%s unavailable)",
                            spec.name, device.type, backend, candidates[0])
            return backend
    raise AssertionError("unreachable: the reference backend always runs")
