"""Reference HSIC: kernel matrices and estimators in plain PyTorch, differentiated by autograd.

Notation: x is (m, d); K the m x m kernel matrix; Kc = H K H its doubly centred form, computed
as K minus row and column means plus the grand mean (no m x m centring matrix H is built).
"""
from __future__ import annotations

import torch


def _centred_rows(x: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """x minus the batch mean (or the given ``mean``), in float32 at least."""
    x = x if x.dtype == torch.float64 else x.float()
    return x - (x.mean(dim=0, keepdim=True) if mean is None else mean.to(x.dtype))


def squared_distances_ref(x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """(m, d) -> (m, m) squared Euclidean distances, zero diagonal.

    Computed on batch-centred x: distances do not change under translation, and centring keeps
    |a|^2 + |b|^2 - 2 a.b from cancelling catastrophically when the data sit far from the origin.
    """
    xc = _centred_rows(x, mean)
    sq = (xc * xc).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * (xc @ xc.T)).clamp_min(0)
    return d * (1 - torch.eye(x.shape[0], dtype=d.dtype, device=d.device))


def gaussian_gram_ref(x: torch.Tensor, scale: torch.Tensor | float, mean: torch.Tensor | None = None) -> torch.Tensor:
    """(m, d) -> K (m, m) with K_ij = exp(-scale * |x_i - x_j|^2); scale = 1 / (2 sigma^2)."""
    return torch.exp(-scale * squared_distances_ref(x, mean))


def gaussian_gram_backward_ref(grad: torch.Tensor, k: torch.Tensor, x: torch.Tensor,
                               scale: torch.Tensor | float, mean: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dx (m, d) from grad = dL/dK (m, m), written out: with S = (G + G^T) * K,
    since dK_ij/dx_i = -2 scale K_ij (x_i - x_j): dL/dx = 2 scale (S x - diag(S 1) x) (translation invariant,
    so x is centred first for accuracy)."""
    xc = _centred_rows(x, mean)
    s = (grad + grad.T) * k
    return 2 * scale * (s @ xc - s.sum(dim=1, keepdim=True) * xc)


def linear_gram_ref(x: torch.Tensor) -> torch.Tensor:
    """(m, d) -> K = x x^T (m, m)."""
    return x @ x.T


def centre(k: torch.Tensor) -> torch.Tensor:
    """Doubly centred kernel matrices, (..., m, m) -> (..., m, m): K - row means - column means + mean."""
    rows = k.mean(dim=-1, keepdim=True)
    cols = k.mean(dim=-2, keepdim=True)
    return k - rows - cols + rows.mean(dim=-2, keepdim=True)


ESTIMATORS = ("biased", "unbiased", "cka", "nocco")


def prepare_kernel(k: torch.Tensor, estimator: str, eps: float = 1e-5) -> torch.Tensor:
    """The per-matrix part of an estimator, (..., m, m) -> (..., m, m), computed once per matrix so
    that one matrix (X's, Y's) can be paired with many (every layer's) cheaply:
    biased: Kc; cka: Kc / |Kc|_F (0 for a constant feature); nocco: Kc (Kc + eps m I)^-1; unbiased: K with a zeroed diagonal."""
    if estimator == "biased":
        return centre(k)
    if estimator == "cka":
        # A constant feature (a dead layer) has Kc = 0: its CKA with anything is defined as 0 (no
        # shared structure), not 0/0. The guard keeps the gradient finite too.
        kc = centre(k)
        norm = kc.square().sum(dim=(-2, -1), keepdim=True).sqrt()
        return torch.where(norm > 0, kc / norm.clamp_min(torch.finfo(kc.dtype).tiny), torch.zeros_like(kc))
    if estimator == "nocco":
        return nocco_operator(k, eps)
    if estimator == "unbiased":
        return k * (1 - torch.eye(k.shape[-1], dtype=k.dtype, device=k.device))
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def pair_prepared(p: torch.Tensor, q: torch.Tensor, estimator: str) -> torch.Tensor:
    """The estimator's value from two prepared matrices (broadcast over leading dims); returns (...)."""
    m = p.shape[-1]
    if estimator == "biased":
        return (p * q).sum(dim=(-2, -1)) / (m - 1) ** 2
    if estimator == "cka":
        return (p * q).sum(dim=(-2, -1))
    if estimator == "nocco":  # tr(Rx Ry)
        return (p * q.transpose(-2, -1)).sum(dim=(-2, -1))
    if estimator == "unbiased":
        trace = (p * q).sum(dim=(-2, -1))
        sums = p.sum(dim=(-2, -1)) * q.sum(dim=(-2, -1)) / ((m - 1) * (m - 2))
        cross = (p.sum(dim=-1) * q.sum(dim=-1)).sum(dim=-1) * 2 / (m - 2)
        return (trace + sums - cross) / (m * (m - 3))
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def hsic_from_kernels(k: torch.Tensor, l: torch.Tensor, estimator: str = "biased", eps: float = 1e-5) -> torch.Tensor:
    """HSIC between kernel matrices k and l, (..., m, m) each (broadcast); returns (...).

    biased:   tr(Kc Lc) / (m - 1)^2 (Gretton et al. 2005), both matrices centred.
    unbiased: Song et al. 2012, on kernels with zeroed diagonals; needs m >= 4.
    cka:      biased(K, L) / sqrt(biased(K, K) biased(L, L)).
    nocco:    tr(Rx Ry), R = Kc (Kc + eps m I)^-1 (Fukumizu et al.; what HBaR and PwoA train with).
    """
    return pair_prepared(prepare_kernel(k, estimator, eps), prepare_kernel(l, estimator, eps), estimator)


def nocco_operator(k: torch.Tensor, eps: float) -> torch.Tensor:
    """R = Kc (Kc + eps m I)^-1 for (..., m, m) kernels, by a Cholesky solve on the device.

    Kc and (Kc + eps m I) commute, so R = (Kc + eps m I)^-1 Kc: a solve, not an inverse.
    """
    m = k.shape[-1]
    kc = centre(k)
    kc = 0.5 * (kc + kc.transpose(-2, -1))  # exactly symmetric for the Cholesky factorisation
    eye = torch.eye(m, dtype=k.dtype, device=k.device)
    # cholesky_ex: no host sync to check success; a non-finite input gives a non-finite result,
    # which the training loop reports, instead of an error raised mid-step
    factor, _ = torch.linalg.cholesky_ex(kc + eps * m * eye)
    return torch.cholesky_solve(kc, factor)


def median_sigma(sq_dist: torch.Tensor) -> torch.Tensor:
    """The median heuristic without a host sync: the median of the pairwise distances (i < j),
    falling back to their mean, then to 1, where the median is zero (e.g. duplicated samples)."""
    m = sq_dist.shape[-1]
    iu = torch.triu_indices(m, m, offset=1, device=sq_dist.device)
    dist = sq_dist[..., iu[0], iu[1]].clamp_min(0).sqrt()
    med = dist.median(dim=-1).values
    mean = dist.mean(dim=-1)
    return torch.where(med > 0, med, torch.where(mean > 0, mean, torch.ones_like(mean)))
