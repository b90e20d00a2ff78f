"""Host-side helpers of the launchers: they run on every call, so they must cost next to nothing.

``triton.cdiv`` is a constexpr function object that costs about 1.7 us a call on the host (a
launcher's loop of them took 0.4 ms per HSIC call, more than its kernels' GPU time on an H200), and
``torch.cuda.get_device_properties`` builds an object per call; these are plain integer division
and a per-device cache.
"""
from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The CUDA device's multiprocessor count (asked once per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
