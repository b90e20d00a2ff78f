"""Reference sparse layers: CSR conversion, and convolution/linear through the dense weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_to_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, ...) dense weight -> CSR over its rows: row_ptr (rows + 1,) int32, col_idx (nnz,) int32
    (flat index within the row, so (ic * kh + r) * kw + s for a conv), values (nnz,) float32."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    nonzero = flat != 0
    counts = nonzero.sum(dim=1)
    row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    col_idx = nonzero.nonzero()[:, 1].to(torch.int32)  # row-major order: sorted by row, then column
    return row_ptr, col_idx, flat[nonzero].float().contiguous()


def csr_to_dense(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`dense_to_csr`: the dense float32 weight of ``shape``."""
    rows = shape[0]
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(rows, device=values.device), counts)
    dense = torch.zeros(rows, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1,
                        device=values.device, dtype=torch.float32)
    dense[row_of, col_idx.long()] = values
    return dense.view(shape)


def sparse_conv2d_ref(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride, padding):
    """(N, C, H, W) -> (N, OC, H', W'): F.conv2d with the CSR weight made dense."""
    weight = csr_to_dense(row_ptr, col_idx, values, (row_ptr.shape[0] - 1, in_channels, kh, kw)).to(x.dtype)
    return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride=stride, padding=padding)


def sparse_linear_ref(x, row_ptr, col_idx, values, bias, in_features):
    """(N, in) -> (N, out): F.linear with the CSR weight made dense."""
    weight = csr_to_dense(row_ptr, col_idx, values, (row_ptr.shape[0] - 1, in_features)).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
