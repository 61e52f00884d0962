"""Memory layouts a caller can hand a kernel, for the kernel tests.

``with_layout(values, layout)`` returns a tensor holding ``values`` (or, for "expanded",
values that a stride-0 tensor can hold) stored in one of these layouts:

    contiguous    a fresh dense copy
    permuted      dims stored in another order: a 2-D tensor column-major; from 3-D on,
                  dim 1 has unit stride (e.g. q stored [B, N, D, H] and viewed [B, H, N, D])
    sliced        a column window of a wider row: row stride > width (odd), storage offset
                  (as q, k and v are views of one qkv projection output)
    strided       every other element of the last dim (last-dim stride 2)
    expanded      stride 0 along dim 0 (``t[:1].expand(...)``, the gradient of a sum)
    offset        dense, but starting one element into its storage: the data pointer is
                  not 16-byte aligned, so a GPU kernel may not use vector loads on it
"""
import torch

LAYOUTS = ("contiguous", "permuted", "sliced", "strided", "expanded", "offset")


def layouts_for(rank: int):
    """The layouts a tensor of ``rank`` dims can take (a 1-D tensor has no dim order)."""
    return [layout for layout in LAYOUTS if not (layout == "permuted" and rank < 2)]


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    values = values.detach()
    shape = values.shape
    if layout == "contiguous":
        return values.clone()
    if layout == "expanded":
        return values[:1].clone().expand(shape)
    if layout == "permuted":
        if values.dim() < 2:
            raise ValueError("a 1-D tensor cannot be permuted")
        order = [1, 0] if values.dim() == 2 else [d for d in range(values.dim()) if d != 1] + [1]
        inverse = [order.index(d) for d in range(values.dim())]
        out = values.permute(order).contiguous().permute(inverse)
    elif layout == "sliced":
        width = shape[-1] if values.dim() else 1
        wide = torch.empty(*shape[:-1], width + 5, dtype=values.dtype)
        out = wide[..., 2:2 + width]
    elif layout == "strided":
        out = torch.empty(*shape[:-1], 2 * shape[-1], dtype=values.dtype)[..., ::2]
    elif layout == "offset":
        out = torch.empty(values.numel() + 1, dtype=values.dtype)[1:].view(shape)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    out.copy_(values)
    return out


def describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)} strides {list(t.stride())} offset {t.storage_offset()}"
