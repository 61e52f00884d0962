"""The position biases of timm's attention modules, restricted to the heads pruning keeps.

``PrunedAttention`` calls one as ``bias(q, spatial)``: BEiT's learned table, the relative
position modules of timm's RelPos ViTs, SAM's decomposed bias (which reads the queries).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

__all__ = ["HeadsOfPositionBias", "TablePositionBias", "DecomposedPositionBias"]


class HeadsOfPositionBias(nn.Module):
    """The kept heads' rows of a timm relative-position module's bias (``get_bias()``,
    ``[1, heads, N, N]``): the module, its parameters and its window logic stay timm's."""

    def __init__(self, rel_pos: nn.Module, heads: Sequence[int]):
        super().__init__()
        self.rel_pos = rel_pos
        self.register_buffer("heads", torch.as_tensor(list(heads), dtype=torch.long), persistent=False)

    def forward(self, q: torch.Tensor, spatial: Optional[Tuple[int, int]]) -> torch.Tensor:
        return self.rel_pos.get_bias().index_select(1, self.heads.to(q.device))


class TablePositionBias(nn.Module):
    """BEiT's relative-position bias: a learned table ``[distances, kept heads]`` looked up
    through a fixed index of ``[tokens, tokens]``."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(table.detach().clone())
        self.register_buffer("relative_position_index", index.detach().clone(), persistent=False)

    def forward(self, q: torch.Tensor, spatial: Optional[Tuple[int, int]]) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)


class DecomposedPositionBias(nn.Module):
    """SAM's decomposed relative position bias (MViTv2): computed from the queries and one
    learned table per image axis. It reads every query dim: with ``attn_qk`` pruned the
    queries are still computed in full and their kept dims gathered after it."""

    def __init__(self, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor):
        super().__init__()
        self.rel_pos_h = nn.Parameter(rel_pos_h.detach().clone())
        self.rel_pos_w = nn.Parameter(rel_pos_w.detach().clone())

    def forward(self, q: torch.Tensor, spatial: Optional[Tuple[int, int]]) -> torch.Tensor:
        B, H, N, D = q.shape
        bias = get_decomposed_rel_pos_bias(q.reshape(B * H, N, D), self.rel_pos_h, self.rel_pos_w,
                                           spatial, spatial)
        return bias.view(B, H, N, N)


