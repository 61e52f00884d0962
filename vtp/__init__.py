"""VTP: Vision Transformer Pruning (Zhu, Tang, Han; arXiv 2104.08500) for timm ViTs.

    import timm, vtp
    model = timm.create_model("deit_small_patch16_224", num_classes=10)
    vtp.add_gates(model)                          # learnable score per dimension, 4 sites per block
                                                  # (sites=vtp.ALL_SITES: also attn_qk, per q/k dim)
    loss = task_loss + 1e-4 * vtp.l1_penalty(model)   # sparse training
    plan = vtp.plan(model, ratio=0.4)             # one global threshold on |gate|
    small = vtp.prune(model, plan)                # a physically smaller timm model
    vtp.save(small, "out/"); small = vtp.load("out/")
    print(vtp.profile(small))                     # params and multiply-adds
"""
from ._gates import ALL_SITES, QK_SITE, SITES, add_gates, gate_stats, gate_values, gates, l1_penalty, param_groups
from ._export import export
from .io import load, read_config, save
from .modules import ConstantBranch, GatedHeadNorm, GatedLinear, KeptLayerNorm, KeptRmsNorm, PrunedAttention
from .pruning_plan import PruningPlan
from ._plan import check_plan_args, plan
from ._profile import Profile, profile
from ._prune import prune
from .latency_model import BlockShape, BlockWidths, LatencyTable
from ._latency import latency_table, model_widths
from ._latency_plot import plot_block_latency, plot_latency_table

__version__ = "0.1.0"

__all__ = [
    "SITES", "QK_SITE", "ALL_SITES", "add_gates", "gates", "l1_penalty", "param_groups", "gate_values", "gate_stats",
    "GatedLinear", "GatedHeadNorm", "KeptLayerNorm", "KeptRmsNorm", "PrunedAttention", "ConstantBranch",
    "PruningPlan", "plan", "check_plan_args", "prune", "save", "load", "read_config", "export", "Profile", "profile",
    "latency_table", "model_widths", "LatencyTable", "BlockWidths", "BlockShape", "plot_latency_table",
    "plot_block_latency",
]
