"""What VTP knows about timm's ViT blocks: their residual branches and where the four sites
of each branch sit.

A block is a set of residual branches. A branch is pre-norm,
``x = x + drop_path(scale(core(norm(x))))``, or post-norm,
``x = x + drop_path(norm(core(x)))``, where the core is an attention module (sites
``attn_in``: the core's input, ``attn_out``: the input of its output projection) or an MLP
(sites ``mlp_in``: the input of fc1, ``mlp_hidden``: the input of fc2). Parallel blocks hold
several branches; timm's ``ParallelScalingBlock`` computes attention and MLP from one fused
input projection and is one branch of its own kind ("parallel": ``attn_in`` is that shared
input, ``attn_out`` and ``mlp_hidden`` the inputs of the two output projections).

A site's gate multiplies the input of every linear that reads it (q, k and v projections
and an attention output gate read the same input, a SwiGLU's two input projections too), so
those linears share one gate. Gates are named ``blocks.{i}.{site}``, and
``blocks.{i}.{j}.{site}`` for the j-th branch of a parallel block.

A fifth site, ``attn_qk`` (opt-in, not in ``SITES``), scores each query/key dim of each
head: the scores become ``s = sum_d a_d q_d k_d``. The gate multiplies the keys: that is
the same product, and the keys have no other reader (SAM's decomposed position bias reads
the queries; EVA's and BEiT's attention add a query bias outside the projection, so a gate
in the query rows would miss it, while their key bias is zero). Where a key norm sits
between projection and product the gate multiplies its output (``GatedHeadNorm``);
elsewhere it scales the key rows of the projection (N*K work, like the input gates). With
RoPE one gate value serves both dims of a rotation pair, so the rotation commutes with it:
such a gate holds ``heads * head_dim / 2`` values, one per pair (``QKLayout``).

Anything else (grouped-query attention, differential attention, other MLPs or norms) is a
``TypeError`` that names the module and what was found.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch.nn as nn
from timm.layers import Attention, AttentionRope, GluMlp, Mlp, SwiGLU
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock
from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import (Block, ParallelScalingBlock, ParallelThingsBlock,
                                            ResPostBlock)
from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import Block as SamBlock

from .modules import is_rms_norm

__all__ = ["SITES", "QK_SITE", "ALL_SITES", "QKLayout", "qk_layout", "qk_slot", "ATTN_SITES", "MLP_SITES", "PARALLEL_SITES", "Branch", "branches",
           "check_supported", "site_linears", "head_dim", "attention_head_dim", "drop_path_slots", "parse_gate_name", "attention_input_names"]

SITES: Tuple[str, ...] = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")
QK_SITE = "attn_qk"
ALL_SITES: Tuple[str, ...] = SITES + (QK_SITE,)
ATTN_SITES = ("attn_in", "attn_out", QK_SITE)
MLP_SITES = ("mlp_in", "mlp_hidden")
PARALLEL_SITES = ("attn_in", "attn_out", "mlp_hidden", QK_SITE)

PRE_NORM_BLOCKS = (Block, RelPosBlock, BeitBlock, EvaBlock, SamBlock)
POST_NORM_BLOCKS = (ResPostBlock, ResPostRelPosBlock, EvaBlockPostNorm)
ATTENTIONS = (Attention, AttentionRope, EvaAttention, RelPosAttention, BeitAttention, SamAttention)
MLPS = (Mlp, GluMlp, SwiGLU)


@dataclass
class Branch:
    """One residual branch of a block, located by attribute names on ``host``."""

    kind: str                   # "attn", "mlp" or "parallel"
    name: str                   # gate-name prefix: "blocks.3" or "blocks.3.1"
    host: nn.Module             # the module holding the branch's norm, core and scale
    core: Optional[str]         # attribute of host: the attention or MLP module (None: host itself)
    norm: Optional[str] = None       # pre-norm: its output feeds the core
    post_norm: Optional[str] = None  # post-norm: it normalises the core's output
    scale: Optional[str] = None      # layer scale: a module (ls1) or a Parameter (gamma_1)

    @property
    def sites(self) -> Tuple[str, ...]:
        return {"attn": ATTN_SITES, "mlp": MLP_SITES, "parallel": PARALLEL_SITES}[self.kind]

    def module(self) -> nn.Module:
        return self.host if self.core is None else getattr(self.host, self.core)

    def gate_name(self, site: str) -> str:
        return f"{self.name}.{site}"

    @property
    def where(self) -> str:
        """The branch's core as the user's model spells it, for error messages."""
        return f"model.{self.name}.{self.core}" if self.core else f"model.{self.name}"


def parse_gate_name(name: str) -> Tuple[int, Optional[int], str]:
    """``"blocks.3.attn_in"`` -> (3, None, "attn_in"); ``"blocks.3.1.mlp_in"`` -> (3, 1, "mlp_in")."""
    parts = name.split(".")
    if len(parts) not in (3, 4) or parts[0] != "blocks" or parts[-1] not in ALL_SITES:
        raise ValueError(f"gate name: expected 'blocks.<i>.<site>' or 'blocks.<i>.<j>.<site>', got {name!r}")
    return int(parts[1]), (int(parts[2]) if len(parts) == 4 else None), parts[-1]


def _blocks(model: nn.Module) -> List[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
        raise TypeError(f"model: expected a timm ViT with a 'blocks' sequence, got {type(model).__name__}")
    return list(blocks)


def _block_branches(block: nn.Module, i: int) -> List[Branch]:
    name = f"blocks.{i}"
    if isinstance(block, PRE_NORM_BLOCKS):
        scales = ("gamma_1", "gamma_2") if isinstance(block, (EvaBlock, BeitBlock)) else ("ls1", "ls2")
        return [Branch("attn", name, block, "attn", norm="norm1", scale=scales[0]),
                Branch("mlp", name, block, "mlp", norm="norm2", scale=scales[1])]
    if isinstance(block, POST_NORM_BLOCKS):
        return [Branch("attn", name, block, "attn", post_norm="norm1"),
                Branch("mlp", name, block, "mlp", post_norm="norm2")]
    if isinstance(block, ParallelThingsBlock):
        return ([Branch("attn", f"{name}.{j}", seq, "attn", norm="norm", scale="ls")
                 for j, seq in enumerate(block.attns)] +
                [Branch("mlp", f"{name}.{j}", seq, "mlp", norm="norm", scale="ls")
                 for j, seq in enumerate(block.ffns)])
    if type(block) is ParallelScalingBlock:
        return [Branch("parallel", name, block, None, norm="in_norm", scale="ls")]
    raise TypeError(f"model.blocks[{i}]: VTP prunes timm's pre-norm, post-norm and parallel ViT blocks "
                    f"(Block, EvaBlock, RelPosBlock, Beit's and SAM's Block, ResPostBlock, "
                    f"ParallelThingsBlock, ParallelScalingBlock), got {type(block).__name__}")


def branches(model: nn.Module) -> Iterator[Branch]:
    """Every residual branch of every block, in order; a ``TypeError`` for a block VTP does
    not know."""
    for i, block in enumerate(_blocks(model)):
        yield from _block_branches(block, i)


def _check_norm(norm: nn.Module, where: str) -> None:
    if isinstance(norm, nn.Identity):
        return
    if isinstance(norm, nn.LayerNorm) or is_rms_norm(norm):
        if len(tuple(norm.normalized_shape)) != 1:
            raise TypeError(f"{where}: VTP prunes behind norms over the last dim, got {norm!r}")
        return
    raise TypeError(f"{where}: VTP prunes behind LayerNorm and RMS norms, got {type(norm).__name__}")


def _check_attention(attn: nn.Module, where: str) -> None:
    if type(attn) not in ATTENTIONS:
        raise TypeError(f"{where}: VTP prunes timm's Attention, AttentionRope, EvaAttention, "
                        f"RelPosAttention and BEiT's and SAM's attention, got {type(attn).__name__}")
    if getattr(attn, "num_kv_groups", 1) != 1:
        raise TypeError(f"{where}: grouped-query attention ({attn.num_heads} query heads over "
                        f"{attn.num_kv_heads} key/value heads) is not supported: a value dim is "
                        "shared by several heads")
    _check_norm(getattr(attn, "norm", nn.Identity()), f"{where}.norm")


def _check_mlp(mlp: nn.Module, where: str) -> None:
    if type(mlp) not in MLPS:
        raise TypeError(f"{where}: VTP prunes timm's Mlp, GluMlp and SwiGLU, got {type(mlp).__name__}")
    if not all(isinstance(getattr(mlp, name), nn.Linear) for name in mlp_input_names(mlp)):
        raise TypeError(f"{where}: VTP prunes MLPs of linear layers, not 1x1 convolutions")
    _check_norm(mlp.norm, f"{where}.norm")


def check_supported(model: nn.Module) -> None:
    """Raise a ``TypeError`` naming the first part of ``model`` that VTP cannot gate or prune.

    A model that ``vtp.prune`` already shrank is a ``ValueError``.
    """
    if getattr(model, "vtp_plan", None) is not None:
        raise ValueError("model: already pruned by vtp.prune; gates and plans apply to the dense model")
    dims = set()
    for branch in branches(model):
        if branch.norm is not None:
            _check_norm(getattr(branch.host, branch.norm), f"model.{branch.name}.{branch.norm}")
        if branch.post_norm is not None:
            _check_norm(getattr(branch.host, branch.post_norm), f"model.{branch.name}.{branch.post_norm}")
        if branch.kind == "attn":
            _check_attention(branch.module(), branch.where)
            dims.add(attention_head_dim(branch.module()))
        elif branch.kind == "mlp":
            _check_mlp(branch.module(), branch.where)
        else:
            if branch.module().out_proj is not None:
                raise TypeError(f"{branch.where}: a ParallelScalingBlock with one output projection over "
                                "attention and MLP together (fuse_out_proj) is not supported")
            dims.add(attention_head_dim(branch.module()))
        if len(dims) > 1:
            raise TypeError(f"{branch.where}: head_dim {sorted(dims)[-1]} differs from an earlier "
                            f"block's ({sorted(dims)[0]}); a plan holds one head_dim")


def attention_head_dim(attn: nn.Module) -> int:
    """Width of one attention head's queries (BEiT's attention keeps it in its projection only)."""
    if hasattr(attn, "head_dim"):
        return int(attn.head_dim)
    return attn.proj.in_features // attn.num_heads


def head_dim(model: nn.Module) -> int:
    for branch in branches(model):
        if branch.kind in ("attn", "parallel"):
            return attention_head_dim(branch.module())
    raise TypeError("model: has no attention branch")


def drop_path_slots(block: nn.Module) -> List[Tuple[nn.Module, str]]:
    """The (module, attribute) of every stochastic-depth module of a block: one per residual
    branch (drop_path1/2), one per parallel branch, or one for a fused parallel block."""
    if hasattr(block, "attns"):
        return [(seq, "drop_path") for seq in list(block.attns) + list(block.ffns)]
    names = [n for n in ("drop_path1", "drop_path2", "drop_path") if hasattr(block, n)]
    return [(block, n) for n in names]


def mlp_input_names(mlp: nn.Module) -> List[str]:
    """The linears of an MLP that read its input: fc1, or a SwiGLU's two halves."""
    return ["fc1"] if hasattr(mlp, "fc1") else ["fc1_g", "fc1_x"]


def attention_input_names(attn: nn.Module) -> List[str]:
    """The linears of an attention module that read its input: the fused or separate
    q/k/v projections, and the output gate of gated attention."""
    names = ["qkv"] if getattr(attn, "qkv", None) is not None else ["q_proj", "k_proj", "v_proj"]
    if isinstance(getattr(attn, "gate", None), nn.Linear):
        names.append("gate")
    return names


def site_linears(branch: Branch, site: str) -> List[Tuple[nn.Module, str]]:
    """The (parent, attribute) of every linear whose input the site's gate multiplies; the
    first one holds the gate, the others share it."""
    core = branch.module()
    if branch.kind == "parallel":
        attr = {"attn_in": "in_proj", "attn_out": "attn_out_proj", "mlp_hidden": "mlp_out_proj"}[site]
        return [(core, attr)]
    if site == "attn_in":
        return [(core, name) for name in attention_input_names(core)]
    if site == "attn_out":
        return [(core, "proj")]
    if site == "mlp_in":
        return [(core, name) for name in mlp_input_names(core)]
    if site == "mlp_hidden":
        return [(core, "fc2")]
    raise ValueError(f"site: expected one of {SITES} (attn_qk: see qk_slot), got {site!r}")


@dataclass(frozen=True)
class QKLayout:
    """How an ``attn_qk`` gate maps onto the query/key dims of one attention.

    ``pairs`` is None (one gate value per dim: ``heads * head_dim`` values), "interleaved"
    (RoPE rotates dims 2j and 2j+1 together) or "half" (RoPE rotates j and j + head_dim/2):
    then value ``h * head_dim/2 + j`` gates pair j of head h."""
    heads: int
    head_dim: int
    pairs: Optional[str] = None

    @property
    def units_per_head(self) -> int:
        return self.head_dim // 2 if self.pairs else self.head_dim

    @property
    def size(self) -> int:
        return self.heads * self.units_per_head

    def unit_dims(self, unit: int) -> Tuple[int, ...]:
        """The dims (within its head) that gate value ``unit`` of a head scores."""
        if self.pairs == "interleaved":
            return (2 * unit, 2 * unit + 1)
        if self.pairs == "half":
            return (unit, unit + self.head_dim // 2)
        return (unit,)

    def dim_to_unit(self):
        """For each of the ``heads * head_dim`` dims, the gate value that scores it."""
        return [h * self.units_per_head + self._unit_of(d) for h in range(self.heads) for d in range(self.head_dim)]

    def _unit_of(self, d: int) -> int:
        if self.pairs == "interleaved":
            return d // 2
        if self.pairs == "half":
            return d % (self.head_dim // 2)
        return d

    def slots(self, kept_units: Sequence[int], width: int) -> List[int]:
        """A head's ``width`` query/key slots: the dim (within the head) each kept unit puts
        in each slot, -1 for a zero slot, ordered so that RoPE on ``width`` dims rotates the
        members of each kept pair together and zero slots with zero slots."""
        kept_units = sorted(kept_units)
        if self.pairs == "half":
            half = width // 2
            lows = [u for u in kept_units] + [-1] * (half - len(kept_units))
            return lows + [u + self.head_dim // 2 if u >= 0 else -1 for u in lows]
        dims = [d for u in kept_units for d in self.unit_dims(u)]
        return dims + [-1] * (width - len(dims))


def _rope_pairs(attn: nn.Module) -> Optional[str]:
    """How RoPE pairs the head dims of this attention, None where it takes no RoPE."""
    if hasattr(attn, "rotate_half"):  # EvaAttention, AttentionRope: RoPE comes with the call
        return "half" if attn.rotate_half else "interleaved"
    if isinstance(attn, SamAttention) and attn.rope is not None:
        return "interleaved"
    return None


def qk_layout(branch: Branch) -> QKLayout:
    """The ``attn_qk`` gate layout of an attention or parallel branch; a ``TypeError`` where
    RoPE would rotate an odd head width."""
    core = branch.module()
    heads, width = core.num_heads, attention_head_dim(core)
    pairs = _rope_pairs(core) if branch.kind == "attn" else None
    if pairs and width % 2:
        raise TypeError(f"{branch.where}: RoPE over an odd head_dim ({width}) has no rotation pairs to gate")
    return QKLayout(heads, width, pairs)


def qk_slot(branch: Branch) -> Tuple[nn.Module, str, Optional[int]]:
    """Where the ``attn_qk`` gate of a branch sits: ``(parent, attribute, row offset)``. A
    row offset says the gate scales the key rows of the linear ``parent.attribute`` from that
    row on; None says ``parent.attribute`` is the key norm and the gate multiplies its output."""
    core = branch.module()
    if branch.kind not in ("attn", "parallel"):
        raise ValueError(f"site: {QK_SITE} belongs to attention branches, not {branch.kind}")
    if not isinstance(getattr(core, "k_norm", nn.Identity()), nn.Identity):
        return core, "k_norm", None
    dim = core.num_heads * attention_head_dim(core)
    if branch.kind == "parallel":
        return core, "in_proj", core.in_split[0] + core.in_split[1]
    if getattr(core, "qkv", None) is not None:
        return core, "qkv", dim
    return core, "k_proj", 0
