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


OC_TILE = 16  # output channels per tile of the GPU kernels' weight format


def check_csr(row_ptr, col_idx, values, columns: int) -> None:
    """Raise ValueError unless the CSR arrays are consistent: as many values as column indices
    (unless ``values`` is None), row_ptr non-decreasing from 0 to nnz, every column index in
    [0, columns). (Syncs with the host; the GPU paths run it once per pattern, when they build its
    tiled form.)"""
    nnz = col_idx.numel()
    if values is not None and values.numel() != nnz:
        raise ValueError(f"values has {values.numel()} entries, col_idx {nnz}")
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError(f"row_ptr must rise from 0 to nnz ({nnz})")
    if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= columns):
        raise ValueError(f"col_idx must lie in [0, {columns}), got [{int(col_idx.min())}, {int(col_idx.max())}]")


class TiledPattern:
    """Where a CSR weight's values go in its tiled form (below), from its structure alone.

    Built from ``row_ptr`` and ``col_idx`` once (it syncs with the host, and checks them); a new set
    of values for the same pattern (a finetune step) then becomes a tiled weight by one scatter, with
    no host synchronisation. ``tile_ptr`` (tiles + 1,) int32, ``tile_cols`` (union columns,) int32:
    each tile's sorted union of its rows' column indices; ``slot`` (nnz,) int64: the flat index in
    the (union columns, OC_TILE) values block of each CSR entry.
    """

    def __init__(self, row_ptr, col_idx, columns: int):
        rows = row_ptr.shape[0] - 1
        tiles = -(-rows // OC_TILE)
        counts = (row_ptr[1:] - row_ptr[:-1]).long()
        row_of = torch.repeat_interleave(torch.arange(rows, device=col_idx.device), counts,
                                         output_size=col_idx.numel())
        cols = col_idx.long()
        used = torch.zeros(tiles, columns, dtype=torch.bool, device=col_idx.device)
        used[row_of // OC_TILE, cols] = True  # (tiles, columns): the union of each tile's columns
        per_tile = used.sum(dim=1)
        starts = torch.cat([per_tile.new_zeros(1), per_tile.cumsum(0)])
        self.tile_ptr = starts.to(torch.int32)
        self.tile_cols = used.nonzero()[:, 1].to(torch.int32).contiguous()
        # rank of (tile, column) among the union columns of all tiles, tile-major
        union_index = used.long().cumsum(dim=1) - 1 + starts[:-1, None]
        self.slot = (union_index[row_of // OC_TILE, cols] * OC_TILE + row_of % OC_TILE).contiguous()
        self.rows, self.tiles, self.columns, self.nnz = rows, tiles, columns, col_idx.numel()


class TiledWeight:
    """A CSR weight (rows = output channels) in the GPU kernels' output-channel-tiled format.

    Rows are cut into tiles of OC_TILE; a tile keeps the sorted union of its rows' column indices
    and a dense (union columns, OC_TILE) block of their values, zero where a row lacks the column.
    ``tile_ptr`` (tiles + 1,) int32 offsets into ``tile_cols`` (int32) and the rows of ``tile_vals``
    (float32, row-major); ``bias`` (tiles * OC_TILE,) float32, zeros where the layer has none.
    ``pattern``: the :class:`TiledPattern` it was built on (pass it to :meth:`from_pattern` to
    build the form of new values without a host sync).
    """

    def __init__(self, row_ptr, col_idx, values, bias, columns: int, pattern: "TiledPattern | None" = None):
        if pattern is None:
            check_csr(row_ptr, col_idx, values, columns)
            pattern = TiledPattern(row_ptr, col_idx, columns)
        elif values.numel() != pattern.nnz:
            raise ValueError(f"values has {values.numel()} entries, the pattern {pattern.nnz}")
        self.pattern = pattern
        self.tile_ptr, self.tile_cols = pattern.tile_ptr, pattern.tile_cols
        self.tile_vals = torch.zeros(pattern.tile_cols.numel() * OC_TILE, device=values.device, dtype=torch.float32)
        self.tile_vals[pattern.slot] = values.reshape(-1).float()
        self.tile_vals = self.tile_vals.view(-1, OC_TILE)  # (union columns, OC_TILE), tile-major
        self.bias = torch.zeros(pattern.tiles * OC_TILE, device=values.device, dtype=torch.float32)
        if bias is not None:
            self.bias[:pattern.rows] = bias.float()
        self.rows, self.tiles, self.columns = pattern.rows, pattern.tiles, columns

    @classmethod
    def from_pattern(cls, pattern: TiledPattern, values, bias) -> "TiledWeight":
        """The tiled form of new ``values`` (nnz,) on a known pattern: one scatter, no host sync."""
        return cls(None, None, values, bias, pattern.columns, pattern=pattern)

    def to_dense(self) -> torch.Tensor:
        """The (rows, columns) float32 weight back (for tests)."""
        dense = torch.zeros(self.tiles * OC_TILE, self.columns, device=self.tile_vals.device)
        counts = (self.tile_ptr[1:] - self.tile_ptr[:-1]).long()
        tile_of = torch.repeat_interleave(torch.arange(self.tiles, device=counts.device), counts)
        rows = tile_of[:, None] * OC_TILE + torch.arange(OC_TILE, device=counts.device)
        dense[rows, self.tile_cols.long()[:, None].expand_as(rows)] = self.tile_vals
        return dense[:self.rows]


def sparse_conv2d_ref(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride, padding):
    """(N, C, H, W) -> (N, OC, H', W'): F.conv2d with the CSR weight made dense."""
    weight = csr_to_dense(row_ptr, col_idx, values, (row_ptr.shape[0] - 1, in_channels, kh, kw)).to(x.dtype)
    return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride=stride, padding=padding)


def sparse_linear_ref(x, row_ptr, col_idx, values, bias, in_features):
    """(N, in) -> (N, out): F.linear with the CSR weight made dense."""
    weight = csr_to_dense(row_ptr, col_idx, values, (row_ptr.shape[0] - 1, in_features)).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
