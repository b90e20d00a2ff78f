"""Input-gradient-only backward passes: the attacks' autograd.grad(loss, x) needs d/dx alone.

PyTorch's engine skips a built-in layer's weight gradient when autograd.grad does not ask for it,
but a custom op's backward cannot tell (the engine refuses to say whether a leaf parameter's
gradient will be used during autograd.grad), so it would compute its weight gradient at every
attack step. Inside ``input_gradients_only()`` fastprune's ops return none for their weights.
A counter, not a thread-local: CUDA backward passes run on the engine's device threads.
"""
from __future__ import annotations

import contextlib

_DEPTH = 0


@contextlib.contextmanager
def input_gradients_only():
    """Backward passes inside ask for input gradients only; parameters get no gradient."""
    global _DEPTH
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1


def parameter_gradients_wanted() -> bool:
    return _DEPTH == 0


_FROZEN: list[dict] = []


@contextlib.contextmanager
def frozen_parameters():
    """Inside, no parameter or buffer changes (an attack runs the model hundreds of times on fixed
    weights), so layers may cache what they derive from them (a masked layer's weight * mask).
    The cache lives as long as the context; nested contexts get their own."""
    _FROZEN.append({})
    try:
        yield
    finally:
        _FROZEN.pop()


def frozen_cache() -> dict | None:
    """The innermost frozen_parameters() context's cache, or None outside one."""
    return _FROZEN[-1] if _FROZEN else None
