"""The heads a pruned attention keeps: what ``PrunedAttention`` and ``PrunedParallelBlock``
(vtp/modules.py) share about their queries, keys and values.

Each kept head has a value width of its own (``attn_out``) and query/key slots (``attn_qk``:
every head as many, zero slots where a head keeps fewer dims, so one attention call takes
them all). How qkv lays out the values is the ``v_layout``: packed side by side, or padded
with zero rows to one width per head, the block's attention width, so attention reads V as
the projection wrote it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

import vtp_kernels

__all__ = ["V_LAYOUTS"]

V_LAYOUTS = ("packed", "padded")


class _KeptHeads:
    """The heads a pruned attention keeps: their value widths and layout in the qkv rows,
    and which of the dense model's heads they were (for biases and masks given over all of
    them). Shared by ``PrunedAttention`` and ``PrunedParallelBlock``."""

    def _init_heads(self, head_dim: int, v_widths: Sequence[int], v_layout: str,
                    kept_heads: Optional[Sequence[int]], dense_heads: Optional[int], device,
                    qk_slots: Optional[Sequence[Sequence[int]]] = None, qk_full_rows: bool = False,
                    dtype=None, v_head_width: Optional[int] = None) -> None:
        v_widths = tuple(int(w) for w in v_widths)
        if v_layout not in V_LAYOUTS:
            raise ValueError(f"v_layout: expected one of {', '.join(V_LAYOUTS)}, got {v_layout!r}")
        if v_layout == "padded" and v_widths and max(v_widths) > head_dim:
            raise ValueError(f"v_widths: a padded V holds at most head_dim={head_dim} values per head")
        self.v_layout = v_layout
        self.num_heads = len(v_widths)
        self.head_dim = head_dim
        self.v_widths = v_widths
        self.v_dim = sum(v_widths)
        self._init_qk(qk_slots, qk_full_rows, device, dtype)
        self.v_head_width = self._padded_width(v_head_width)
        # qkv's value rows
        self.v_rows = self.num_heads * self.v_head_width if v_layout == "padded" else self.v_dim
        kept_heads = list(range(self.num_heads)) if kept_heads is None else [int(h) for h in kept_heads]
        if len(kept_heads) != self.num_heads:
            raise ValueError(f"kept_heads: expected {self.num_heads} head indices, got {len(kept_heads)}")
        self.dense_heads = self.num_heads if dense_heads is None else int(dense_heads)
        self.register_buffer("kept_heads", torch.tensor(kept_heads, dtype=torch.long, device=device),
                             persistent=False)

    def _padded_width(self, v_head_width: Optional[int]) -> Optional[int]:
        """A padded V's rows per head: by default the block's attention width, the wider of
        its query/key slots and its widest head's values, so attention runs on V as it comes
        at the width the queries and keys have (no narrower width is possible: the fused
        attention kernels take one width for all three). ``head_dim`` until ``attn_qk``
        narrows the queries and keys, since a head keeping every query/key dim keeps
        ``head_dim`` slots. A packed V has none."""
        if self.v_layout != "padded":
            if v_head_width is not None:
                raise ValueError("v_head_width: only a padded V has a head width")
            return None
        widest = max(self.v_widths, default=0)
        width = max(self.qk_width, widest) if v_head_width is None else int(v_head_width)
        if not widest <= width <= self.head_dim or width < 1:
            raise ValueError(f"v_head_width: expected a width in [{max(widest, 1)}, {self.head_dim}] (the widest "
                             f"head's values to head_dim), got {v_head_width}")
        return width

    @property
    def attention_width(self) -> int:
        """The width attention runs each head at: q, k and v padded to one width."""
        return max(self.qk_width, self.v_head_width or max(self.v_widths, default=0))

    def _init_qk(self, qk_slots: Optional[Sequence[Sequence[int]]], full_rows: bool, device, dtype) -> None:
        """Query/key widths. ``qk_slots`` (None: every head keeps its ``head_dim`` dims) gives
        each head's slots: the dense dim (within the head) each slot holds, -1 for a zero
        slot; every head has as many (``qk_width``), so one attention call takes them all.
        The projection emits ``qk_width`` query and key rows per head (zero rows at zero
        slots), or, with ``qk_full_rows`` (a q/k norm needs every dim for its statistics, or
        a position bias reads the full queries), all ``head_dim`` of them, of which the kept
        ones are gathered after the norm (and RoPE) and the queries scaled by ``qk_scale``
        (the folded gate values; 0 at zero slots)."""
        H, D = self.num_heads, self.head_dim
        if qk_slots is None:
            qk_slots = [list(range(D))] * H
        qk_slots = [[int(d) for d in row] for row in qk_slots]
        width = len(qk_slots[0]) if qk_slots else D
        if len(qk_slots) != H or any(len(row) != width or any(d < -1 or d >= D for d in row) for row in qk_slots):
            raise ValueError(f"qk_slots: expected {H} rows of one length, of dims in [-1, {D}), got {qk_slots}")
        self.qk_width = width
        self.qk_widths = tuple(sum(d >= 0 for d in row) for row in qk_slots)
        self.qk_pruned = qk_slots != [list(range(D))] * H
        self.qk_full_rows = bool(full_rows)
        self.qk_dim = H * (D if self.qk_full_rows or not self.qk_pruned else width)  # q (or k) rows of the projection
        self.register_buffer("qk_index", torch.tensor([[max(d, 0) for d in row] for row in qk_slots],
                                                      dtype=torch.long, device=device).view(H, width), persistent=False)
        if self.qk_full_rows:
            mask = [[1.0 if d >= 0 else 0.0 for d in row] for row in qk_slots]
            self.register_buffer("qk_scale", torch.tensor(mask, device=device, dtype=dtype).view(H, width))
        else:
            self.qk_scale = None

    def _shrink_qk(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``[B, H, N, head_dim]`` computed in full: their kept slots, the
        queries scaled by ``qk_scale``."""
        if not self.qk_full_rows:
            return q, k
        B, H, N, _ = q.shape
        if not self.qk_pruned:
            return q * self.qk_scale.to(q.dtype).view(1, H, 1, self.qk_width), k
        index = self.qk_index.view(1, H, 1, self.qk_width).expand(B, H, N, self.qk_width)
        q = torch.gather(q, -1, index) * self.qk_scale.to(q.dtype).view(1, H, 1, self.qk_width)
        return q, torch.gather(k, -1, index)

    def _rope_for_slots(self, rope: torch.Tensor) -> torch.Tensor:
        """A RoPE table ``[..., N, 2 * head_dim]`` (sin | cos) for the slots of each head:
        ``[H, N, 2 * qk_width]`` (what a zero slot gets does not matter: it rotates zeros)."""
        if not self.qk_pruned or self.qk_full_rows:
            return rope
        H, W = self.num_heads, self.qk_width
        sin, cos = rope.tensor_split(2, -1)
        if sin.dim() == 2:
            sin, cos = sin.unsqueeze(0), cos.unsqueeze(0)
        n = sin.shape[-2]
        index = self.qk_index.view(H, 1, W).expand(H, n, W)
        sin, cos = sin.expand(H, n, sin.shape[-1]), cos.expand(H, n, cos.shape[-1])
        return torch.cat([torch.gather(sin, -1, index), torch.gather(cos, -1, index)], dim=-1)

    def _attend(self, q, k, v, bias):
        return vtp_kernels.packed_attention(q, k, v, self.v_widths, self.scale, attn_bias=bias,
                                            v_padded=self.v_layout == "padded", v_head_width=self.v_head_width)

    def value_rows(self) -> torch.Tensor:
        """Where each kept value dim sits among qkv's V rows (packed: in order; padded: the
        first ``v_widths[h]`` of head ``h``'s ``v_head_width`` rows)."""
        if self.v_layout == "packed":
            return torch.arange(self.v_dim)
        return vtp_kernels.reference.padded_value_columns(self.v_widths, self.v_head_width, torch.device("cpu"))

    def _heads_repr(self) -> str:
        layout = f", V padded to {self.v_head_width}" if self.v_layout == "padded" else ""
        qk = ""
        if self.qk_pruned:
            qk = f", qk_widths={self.qk_widths} in {self.qk_width} slots"
        if self.qk_full_rows:
            qk += ", q/k gathered and scaled after the norm"
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, v_widths={self.v_widths}{layout}{qk}"
