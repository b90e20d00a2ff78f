"""What every attack shares: argument checks, model-mode handling, the loss gradient w.r.t. the
input, random starts, projection, per-sample selection of the strongest restart, CUDA graphs.

Conventions (docs/ARCHITECTURE.md): images are in the clip box (default [0, 1]) and eps is in pixel
units; models may return logits or a tuple whose first element is the logits; attacks never touch
parameters' .grad, restore every module's train/eval mode, and do not synchronise with the host
inside their loops (argument checks at the start of a call do, once).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..utils.checks import (check_count, check_eps, check_images_labels, check_positive,  # noqa: F401 - re-exported
                            eval_mode)
from ..utils.autograd import frozen_parameters, input_gradient, input_gradients_only
from .losses import LOSSES, logits_of

NORMS = ("linf", "l2")


def project(x: torch.Tensor, x_nat: torch.Tensor, eps: torch.Tensor, norm: str, clip: tuple[float, float]):
    """Project x (N, ...) onto the eps (N,) ball around x_nat, then clamp to the clip box."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    e = eps.view(shape)
    if norm == "linf":
        y = torch.minimum(torch.maximum(x, x_nat - e), x_nat + e)
    else:
        d = x - x_nat
        dnorm = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        y = x_nat + d * (e / dnorm).clamp_max(1.0)
    return y.clamp(*clip)


def select_strongest(candidates: torch.Tensor, success: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Per sample, the strongest of R candidates, without a host sync.

    candidates (R, N, ...); success (R, N) bool (the candidate fools the model); score (R, N), higher
    is stronger. A successful candidate wins, the highest score among them; else the highest score.
    """
    if candidates.shape[0] == 1:
        return candidates[0]
    best_success = torch.where(success, score, torch.full_like(score, float("-inf"))).argmax(dim=0)
    best = torch.where(success.any(dim=0), best_success, score.argmax(dim=0))
    index = best.view((1, -1) + (1,) * (candidates.dim() - 2)).expand((1,) + candidates.shape[1:])
    return candidates.gather(0, index).squeeze(0)


class Attack:
    """Base class. Subclasses implement ``perturb(x, y) -> x_adv`` on checked, detached inputs.

    Args:
        model: maps images (N, ...) in the clip box to logits (N, C) (or a tuple, logits first).
        eps: radius of the threat model, in pixel units.
        norm: "linf" or "l2".
        clip: the valid image box.
        amp: run the model under autocast (float16 on CUDA, bfloat16 on CPU). Under float16 each
            image's logit gradient is rescaled before the backward pass, so that confidently
            classified images' gradients do not underflow (utils.autograd.per_sample_scaled_grad).
        channels_last: feed channels_last images; converts the model's parameters to channels_last
            memory format once (values unchanged).
        cuda_graph: capture the attack step once per input shape and replay it (CUDA only).
        seed: seeds the attack's own random generator, making each call reproducible; None uses
            torch's global generator. On CUDA, bit-for-bit repeats also need
            ``torch.backends.cudnn.deterministic = True``: some of cuDNN's input-gradient algorithms
            add with atomics, and L2 steps and FAB carry such last-bit differences forward.
    """

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "linf", clip=(0.0, 1.0), amp: bool = False,
                 channels_last: bool = False, cuda_graph: bool = False, seed: int | None = None):
        if not isinstance(model, nn.Module) and not callable(model):
            raise ValueError("model must be an nn.Module or a callable")
        self.model = model
        self.eps = check_positive("eps", eps)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        if not (isinstance(clip, (tuple, list)) and len(clip) == 2 and float(clip[0]) < float(clip[1])):
            raise ValueError(f"clip must be a pair (min, max) with min < max, got {clip!r}")
        self.clip = (float(clip[0]), float(clip[1]))
        check_eps(self.eps, self.clip, norm)
        self.amp, self.channels_last, self.cuda_graph = bool(amp), bool(channels_last), bool(cuda_graph)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._graphs: dict = {}
        self._num_classes: int | None = None  # the model's outputs, read at the first call
        if self.channels_last and isinstance(model, nn.Module):
            model.to(memory_format=torch.channels_last)

    # --- entry point -------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for images (N, ...) with labels (N,); returns (N, ...) like images."""
        self._check_inputs(images, labels)
        x = images.detach()
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = labels.to(x.device)
        model = self.model if isinstance(self.model, nn.Module) else None
        # frozen_parameters: layers may cache weight-derived values for the call (not with CUDA
        # graphs: a captured graph would keep reading a cache freed at the end of the call).
        frozen = frozen_parameters() if not self.cuda_graph else contextlib.nullcontext()
        with eval_mode(model) if model is not None else contextlib.nullcontext(), frozen:
            x_adv = self.perturb(x, labels)
        return x_adv.to(images.dtype)

    forward = __call__  # torchattacks spells it both ways

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_inputs(self, images, labels) -> None:
        if self.cuda_graph and isinstance(images, torch.Tensor) and images.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors; images are on {images.device}")
        # The model's class count is read once (one forward of one image) and kept: attacks inside
        # training objectives are called every batch.
        self._num_classes = check_images_labels(images, labels, clip=self.clip, model=self.model,
                                                num_classes=self._num_classes)

    # --- pieces the attacks are made of -------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Model logits (N, C) in float32, under autocast when amp is on."""
        if self.amp:
            dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
            # No autocast weight cache: cached casts would outlive a CUDA graph's capture.
            with torch.autocast(x.device.type, dtype=dtype, cache_enabled=False):
                out = logits_of(self.model(x))
        else:
            out = logits_of(self.model(x))
        return out.float()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's predicted classes (N,) for x, without autograd (under autocast when amp is on)."""
        with torch.no_grad():
            return self.logits(x).argmax(dim=1)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, target=None):
        """Per-sample loss (N,), its gradient w.r.t. x (N, ...) and the logits (N, C).

        autograd.grad w.r.t. the input only: parameters' .grad stay untouched and their gradients
        are not even computed (fastprune's sparse ops included: input_gradients_only).
        """
        with torch.enable_grad(), input_gradients_only():
            xg = x.detach().requires_grad_(True)
            logits = self.logits(xg)
            loss = loss_fn(logits, y, target)
            grad = input_gradient(loss, logits, xg, float16=self.amp and x.device.type == "cuda" or None)
        return loss.detach(), grad, logits.detach()

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def random_init(self, x_nat: torch.Tensor, eps: torch.Tensor, gen) -> torch.Tensor:
        """A uniform point of the Linf ball, or a random direction at a uniform radius for L2."""
        shape = (-1,) + (1,) * (x_nat.dim() - 1)
        if self.norm == "linf":
            noise = torch.rand(x_nat.shape, generator=gen, device=x_nat.device, dtype=x_nat.dtype) * 2 - 1
            delta = noise * eps.view(shape)
        else:
            direction = torch.randn(x_nat.shape, generator=gen, device=x_nat.device, dtype=x_nat.dtype)
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            radius = torch.rand(x_nat.shape[0], generator=gen, device=x_nat.device, dtype=x_nat.dtype)
            delta = direction * (radius * eps).view(shape)
        return (x_nat + delta).clamp(*self.clip).contiguous(memory_format=_memory_format(x_nat))

    def loss_fn(self, name: str) -> Callable:
        if name not in LOSSES:
            raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
        return LOSSES[name]

    def graphed(self, key, build: Callable[[], tuple[dict, Callable[[], object]]]):
        """A CUDA-graphed attack step, captured once per ``key`` (shapes, dtype, device).

        ``build()`` returns (buffers, step): ``step`` reads and writes only the tensors in
        ``buffers``. Returns (buffers, replay); the caller copies each call's data into the buffers,
        then replays. Warm-up runs on a side stream first, as capture requires; it scribbles on the
        buffers, which the caller overwrites anyway.
        """
        if key not in self._graphs:
            buffers, step = build()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = step()
            self._graphs[key] = (graph, buffers, outputs)
        graph, buffers, outputs = self._graphs[key]

        def replay():
            graph.replay()
            return outputs

        return buffers, replay


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
