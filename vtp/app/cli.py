"""The ``vtp`` command: VTP's stages on ImageNet-style data, on one GPU or many (torchrun).

    vtp train         a dense timm ViT trained or fine-tuned on the data: the model to prune
    vtp sparse-train  dense timm ViT + gates, trained with task loss + lambda * sum|gate|
    vtp prune         a plan from the gate values, then a physically smaller model
    vtp finetune      the pruned model, trained without the penalty (--distill: with a teacher)
    vtp eval          accuracy, parameters, MACs and images/s of a saved model (or of its ONNX export)
    vtp export        an ONNX or torch.export file of a saved model, checked against it
    vtp report        dense vs pruned table and plots of a run
    vtp run           all of the above in one run directory
    vtp demo          the whole pipeline on MNIST digits, on a CPU, in minutes

Each stage writes a directory: config.yaml (resolved settings), metrics.jsonl,
checkpoints/last.pt, model/ (vtp.save) and summary.json once it is complete.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import vtp

from . import demo, distributed, models, report
from .errors import VTPError
from .flags import (FINETUNE_DEFAULTS, SPARSE_DEFAULTS, TRAIN_DEFAULTS, HelpFormatter,
                    add_config_arg, add_data_args, add_distill_args, add_eval_args, add_model_args,
                    add_output_args, add_prune_args, add_system_args, add_train_args,
                    apply_yaml_config, find_config_path, first_positional, positive_int)
from .stages import (Context, check_export_args, check_fresh_or_resume, check_prune_args,
                     check_run_teacher, check_runtime, check_source, check_trained_start,
                     finetune_teacher, precheck, resolve_source, stage_eval, stage_eval_dense,
                     stage_export, stage_finetune, stage_prune, stage_sparse_train, stage_train,
                     write_stage_config)

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------------------------
# Parser


def _sub(sub, subs: Dict[str, argparse.ArgumentParser], name: str, func, help_text: str,
         description: str) -> argparse.ArgumentParser:
    """A sub-command parser running `func`, registered in `subs`."""
    p = sub.add_parser(name, help=help_text, description=description,
                       formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    subs[name] = p
    return p


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The `vtp` parser and its sub-command parsers by name."""
    parser = argparse.ArgumentParser(
        prog="vtp", formatter_class=HelpFormatter,
        description="Vision Transformer Pruning (Zhu, Tang, Han 2021) for timm ViTs: dense and "
                    "sparse training, pruning, fine-tuning (with distillation), evaluation and "
                    "reports.",
        epilog="Multi-GPU: torchrun --nproc_per_node 8 -m vtp.app run ... (or the `vtp` script).\n"
               "Every command takes --config x.yaml; flags on the command line override it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs: Dict[str, argparse.ArgumentParser] = {}

    p = _sub(sub, subs, "demo", cmd_demo,
             "the whole pipeline on MNIST digits, on a CPU, in minutes",
             "Dense training, sparse training, pruning and fine-tuning of a small ViT on real "
             "MNIST digits shipped with the package; prints a dense vs pruned table.")
    add_config_arg(p)
    demo.add_arguments(p)

    p = _sub(sub, subs, "train", cmd_train,
             "train or fine-tune a dense model: the trained model VTP starts from",
             "Dense training: an ordinary timm model trained on the ImageFolder, from random "
             "weights, from timm's pretrained weights (--pretrained) or from a local checkpoint "
             "(--checkpoint; --reset-head for another class count), with the DeiT recipe. "
             "Writes model/ for `vtp sparse-train --checkpoint DIR/model` or `vtp run "
             "--checkpoint DIR/model`.")
    add_config_arg(p)
    add_data_args(p)
    add_model_args(p)
    add_train_args(p, TRAIN_DEFAULTS)
    add_eval_args(p, bench=False)
    add_system_args(p)
    add_output_args(p, "train")

    p = _sub(sub, subs, "sparse-train", cmd_sparse_train,
             "train a dense model with gates and the L1 gate penalty",
             "Sparse training (VTP step 1): gates in front of qkv, proj, fc1 and fc2 of every "
             "block, trained with task loss + lambda * sum|gate|, from a trained model "
             "(--checkpoint). Writes model/ (the gated model) for `vtp prune`.")
    add_config_arg(p)
    add_data_args(p)
    add_model_args(p)
    _add_sites_arg(p)
    add_train_args(p, SPARSE_DEFAULTS)
    add_eval_args(p, bench=False)
    add_system_args(p)
    add_output_args(p, "sparse-train")

    p = _sub(sub, subs, "prune", cmd_prune,
             "choose kept dimensions from the gates and shrink the model",
             "Pruning (VTP step 2): a plan from the gate values of a sparse-trained model "
             "(global threshold by default), then a physically smaller timm model. Writes "
             "plan.json, gates.json and model/.")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="sparse-train directory, `vtp run` directory or vtp.save directory")
    add_prune_args(p)
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="resolution for MACs (and --flops-target); default: the model's")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where to build the plan and the pruned model (cheap: cpu is fine)")
    add_output_args(p, "prune")

    p = _sub(sub, subs, "finetune", cmd_finetune,
             "train the pruned model without the penalty",
             "Fine-tuning (VTP step 3) of a pruned model with the DeiT recipe; --distill adds "
             "a teacher (the dense model, the gated one or any saved model).")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="prune directory, `vtp run` directory or vtp.save directory")
    add_data_args(p)
    add_model_args(p, dense=False)
    add_train_args(p, FINETUNE_DEFAULTS)
    add_distill_args(p)
    add_eval_args(p, bench=False)
    add_system_args(p)
    add_output_args(p, "finetune")

    p = _sub(sub, subs, "eval", cmd_eval,
             "accuracy, parameters, MACs and images/s of a model",
             "Evaluates a saved model on the validation split and measures inference speed.")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="vtp.save directory, stage directory or `vtp run` directory")
    add_data_args(p, train=False)
    add_eval_args(p)
    p.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"),
                   help="what runs the model: PyTorch, or ONNX Runtime on the CPU through an ONNX "
                        "export checked against it first (needs the 'export' extra)")
    add_system_args(p)
    add_output_args(p, "eval")

    p = _sub(sub, subs, "export", cmd_export,
             "write a model as an ONNX or torch.export file for deployment",
             "Exports a saved model (dense, gated or pruned) to ONNX (checked with ONNX Runtime) "
             "or to a torch.export program (checked by torch.export.load), with a dynamic batch "
             "size; the file is written only once it gives the model's outputs.")
    add_config_arg(p)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="vtp.save directory, stage directory or `vtp run` directory")
    p.add_argument("--format", default="onnx", choices=("onnx", "pt2"),
                   help="onnx: for ONNX Runtime, TensorRT, OpenVINO; pt2: torch.export.load, "
                        "AOTInductor, ExecuTorch")
    p.add_argument("--output", "-o", metavar="FILE", default=None, help="the file to write")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="image size the export takes; default: the model's")
    p.add_argument("--batch-size", type=positive_int, default=2,
                   help="batch of the example input (any batch size runs later)")
    p.add_argument("--opset", type=positive_int, default=None,
                   help="ONNX opset version; default: the exporter's")

    p = _sub(sub, subs, "report", cmd_report,
             "dense vs pruned table and plots of a run",
             "Prints accuracy, parameters, MACs and images/s of the dense and pruned models "
             "and writes PNG plots: kept dimensions per block and site, the gate value "
             "distribution at pruning time, and training curves.")
    p.add_argument("run_dir", nargs="?", default=None, metavar="RUN", help="`vtp run` directory")
    p.add_argument("--output", "-o", metavar="DIR", default=None,
                   help="where to write report.md and the PNGs; default RUN/report")
    add_config_arg(p)

    p = _sub(sub, subs, "run", cmd_run,
             "(train,) sparse-train, prune, finetune, eval and report in one go",
             "The whole VTP pipeline in one run directory: train/ (with --train-epochs), "
             "eval-dense/, sparse-train/, prune/, finetune/, eval-pruned/, report/. It starts "
             "from a trained model: --checkpoint, --pretrained weights for these classes, or "
             "the dense stage first (--train-epochs N); otherwise it stops before any work. "
             "--resume picks up where it stopped.")
    add_config_arg(p)
    add_data_args(p)
    add_model_args(p)
    _add_sites_arg(p)
    add_train_args(p, dict(TRAIN_DEFAULTS, epochs=0), prefix="train-", shared=False,
                   optional_stage=True)
    add_train_args(p, SPARSE_DEFAULTS, prefix="sparse-", shared=False)
    add_train_args(p, FINETUNE_DEFAULTS, prefix="finetune-", shared=True)
    add_distill_args(p, run=True)
    add_prune_args(p)
    add_eval_args(p)
    add_system_args(p)
    add_output_args(p, "run")
    return parser, subs


def _add_sites_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", nargs="+", default=list(vtp.SITES), choices=list(vtp.ALL_SITES),
                   help="which linear inputs of each block get gates (default: the paper's four; "
                        "attn_qk also scores each query/key dim of each head)")


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_demo(args, parser) -> int:
    try:
        demo.run(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise VTPError(str(e)) from None
    return 0


def _training_command(args, parser, command: str, stage, after_step) -> int:
    """A stage that trains a model it builds: checks, then the stage in its own directory."""
    precheck(args, need_train=True)
    resume = check_fresh_or_resume(args.output, args.resume)
    ctx = Context(args, command)
    write_stage_config(ctx, args, parser, ctx.out)
    stage(args, ctx, ctx.out, resume, after_step=after_step)
    return 0


def cmd_train(args, parser, after_step=None) -> int:
    return _training_command(args, parser, "train", stage_train, after_step)


def cmd_sparse_train(args, parser, after_step=None) -> int:
    return _training_command(args, parser, "sparse-train", stage_sparse_train, after_step)


def cmd_prune(args, parser) -> int:
    source = resolve_source(args.source, "prune")
    check_prune_args(args)
    ctx = Context(args, "prune")
    write_stage_config(ctx, args, parser, ctx.out)
    stage_prune(args, ctx, source, ctx.out)
    return 0


def cmd_finetune(args, parser, after_step=None) -> int:
    source = resolve_source(args.source, "finetune")
    check_source(args, source, "finetune")
    precheck(args, need_train=True)
    teacher = finetune_teacher(args, source)
    resume = check_fresh_or_resume(args.output, args.resume)
    ctx = Context(args, "finetune")
    write_stage_config(ctx, args, parser, ctx.out)
    stage_finetune(args, ctx, source, teacher, ctx.out, resume, after_step=after_step)
    return 0


def cmd_eval(args, parser) -> int:
    source = resolve_source(args.source, "eval")
    check_source(args, source, "eval")
    precheck(args, need_train=False)
    check_runtime(args)
    ctx = Context(args, "eval")
    write_stage_config(ctx, args, parser, ctx.out)
    model, metadata = models.load_vtp_model(source)
    stage_eval(args, ctx, model, metadata, ctx.out, os.path.abspath(source))
    return 0


def cmd_export(args, parser) -> int:
    source = resolve_source(args.source, "export")
    check_export_args(args)
    model, metadata = models.load_vtp_model(source)
    stage_export(args, model, metadata, source, print)
    return 0


def cmd_report(args, parser) -> int:
    if not args.run_dir:
        raise VTPError("vtp report: give the RUN directory")
    if not os.path.isdir(args.run_dir):
        raise VTPError(f"RUN not found: {args.run_dir}")
    out = args.output or os.path.join(args.run_dir, "report")
    text = report.write_report(args.run_dir, out)
    print(text, flush=True)
    return 0


RUN_STAGES = ("train", "eval-dense", "sparse-train", "prune", "finetune", "eval-pruned", "report")


def cmd_run(args, parser, after_step=None) -> int:
    precheck(args, need_train=True)
    if args.resume and not (args.output and os.path.isfile(os.path.join(args.output, "config.yaml"))):
        raise VTPError("--resume: give the --output of the run to continue (it has no config.yaml)")
    if args.output and not args.resume and any(os.path.exists(os.path.join(args.output, name))
                                               for name in RUN_STAGES):
        raise VTPError(f"{args.output} already holds a run; pass --resume to continue it or "
                       "choose another --output")
    check_trained_start(args)
    check_run_teacher(args)
    ctx = Context(args, "run")
    run = ctx.out
    dirs = {name: os.path.join(run, name) for name in RUN_STAGES}

    def done(name: str) -> bool:
        path = os.path.join(dirs[name], "eval.json" if name.startswith("eval") else "summary.json")
        # Rank 0's answer, so that every process takes the same branch.
        return distributed.broadcast_object(os.path.isfile(path), ctx.info)

    def trains_to_the_end(name: str, stage) -> bool:
        """Runs (or resumes) the training stage `name`, `stage(out_dir, resume)`, unless it is
        done; False when it stopped early (--stop-after-steps), which ends the run here."""
        if done(name):
            return True
        resume = check_fresh_or_resume(dirs[name], args.resume, optional=True)
        write_stage_config(ctx, args, parser, dirs[name])
        return not stage(dirs[name], resume)["stopped"]

    def train_dense(out_dir: str, resume: bool):
        return stage_train(args, ctx, out_dir, resume, prefix="train-", after_step=after_step)

    def sparse_train(out_dir: str, resume: bool):
        return stage_sparse_train(args, ctx, out_dir, resume, prefix="sparse-", after_step=after_step)

    def finetune(out_dir: str, resume: bool):
        pruned = os.path.join(dirs["prune"], "model")
        return stage_finetune(args, ctx, pruned, finetune_teacher(args, pruned), out_dir, resume,
                              prefix="finetune-", after_step=after_step)

    write_stage_config(ctx, args, parser, run)

    if args.train_epochs > 0:
        if not trains_to_the_end("train", train_dense):
            return 0
        # The rest of the run starts from the model the dense stage trained.
        args.checkpoint = os.path.join(dirs["train"], "model")
        args.pretrained, args.pretrained_path, args.reset_head = False, None, False

    if not done("eval-dense"):
        stage_eval_dense(args, ctx, dirs["eval-dense"])

    if not trains_to_the_end("sparse-train", sparse_train):
        return 0

    if not done("prune"):
        stage_prune(args, ctx, os.path.join(dirs["sparse-train"], "model"), dirs["prune"])

    if not trains_to_the_end("finetune", finetune):
        return 0

    model, metadata = models.load_vtp_model(os.path.join(dirs["finetune"], "model"))
    stage_eval(args, ctx, model, metadata, dirs["eval-pruned"], "pruned")
    if ctx.info.is_main:
        print(report.write_report(run, dirs["report"]), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one `vtp` command; returns the exit status (argparse errors exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    command = first_positional(argv)
    config_path = find_config_path(argv)
    if config_path and command in subs:
        apply_yaml_config(subs[command], config_path)
    args = parser.parse_args(argv)
    sub_parser = subs[args.command]
    try:
        return int(args.func(args, sub_parser) or 0)
    except VTPError as e:
        print(f"vtp {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"vtp {args.command}: interrupted; the last checkpoint is kept (continue with "
              "--resume)", file=sys.stderr, flush=True)
        return 130
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
