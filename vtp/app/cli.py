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
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import vtp

from . import checks, demo, distributed, models, report
from .checks import resolve_source
from .errors import VTPError
from .flags import (FINETUNE_DEFAULTS, SPARSE_DEFAULTS, TRAIN_DEFAULTS, HelpFormatter,
                    add_config_arg, add_data_args, add_distill_args, add_eval_args, add_model_args,
                    add_output_args, add_prune_args, add_system_args, add_train_args,
                    apply_yaml_config, find_config_path, first_positional, positive_int,
                    resolved_config, write_config)
from .settings import StageSettings, settings_from_args
from .checkpoint import check_fresh_or_resume
from .stages import (Context, dense_for_eval, stage_eval, stage_eval_dense,
                     stage_export, stage_finetune, stage_prune, stage_sparse_train, stage_train)

__all__ = ["main", "build_parser", "COMMANDS", "RUN_STAGES"]


# ---------------------------------------------------------------------------------------------
# The table of commands: each one's flag groups, checks, run function and outputs. It builds
# the parser (build_parser) and runs a command (_execute); `vtp run` chains RUN_STAGES.


class Invocation(NamedTuple):
    """One command as its run function sees it: settings read once from the flags."""
    settings: StageSettings
    source: Optional[str]          # the vtp.save directory SOURCE names, if the command takes one
    args: argparse.Namespace       # only for what the command layer writes (config.yaml, report)
    parser: argparse.ArgumentParser
    after_step: Optional[Callable]


Check = Callable[[Invocation], None]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    flags: Tuple[Callable[[argparse.ArgumentParser], None], ...]
    checks: Tuple[Check, ...]
    run: Callable[[Invocation], None]
    outputs: str
    source: bool = False           # takes a SOURCE directory (resolved before the checks)


def _source_flag(what: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", nargs="?", default=None, metavar="SOURCE", help=what)
    return add


def _sites_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", nargs="+", default=list(vtp.SITES), choices=list(vtp.ALL_SITES),
                   help="which linear inputs of each block get gates (default: the paper's four; "
                        "attn_qk also scores each query/key dim of each head)")


def _prune_extra_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="resolution for MACs (and --flops-target); default: the model's")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where to build the plan and the pruned model (cheap: cpu is fine)")


def _runtime_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"),
                   help="what runs the model: PyTorch, or ONNX Runtime on the CPU through an ONNX "
                        "export checked against it first (needs the 'export' extra)")


def _export_flags(p: argparse.ArgumentParser) -> None:
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


def _report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", default=None, metavar="RUN", help="`vtp run` directory")
    p.add_argument("--output", "-o", metavar="DIR", default=None,
                   help="where to write report.md and the PNGs; default RUN/report")


# The checks, each one rule of checks.py applied to an invocation.

def _data_check(need_train: bool) -> Check:
    return lambda inv: checks.check_data(inv.settings.data, need_train, inv.settings.batch_size)


def _start_check(inv: Invocation) -> None:
    checks.check_start(inv.settings.start, inv.settings.data)


def _prune_check(inv: Invocation) -> None:
    checks.check_prune(inv.settings.prune)


def _distill_flags_check(inv: Invocation) -> None:
    checks.check_distill_flags(inv.settings.distill)


def _source_check(inv: Invocation) -> None:
    checks.check_source(inv.settings, inv.source)


def _runtime_check(inv: Invocation) -> None:
    s = inv.settings
    checks.check_runtime(s.eval.runtime, s.system.device, s.system.amp)


def _export_check(inv: Invocation) -> None:
    checks.check_export_output(inv.args.output)


def _run_output_check(inv: Invocation) -> None:
    """`vtp run --resume` continues a run directory; without it, never writes over one."""
    out, resume = inv.settings.system.output, inv.settings.system.resume
    if resume and not out:
        raise VTPError("--resume: give the --output of the run to continue")
    if out and not resume and any(os.path.exists(os.path.join(out, stage.name))
                                  for stage in RUN_STAGES):
        raise VTPError(f"{out} already holds a run; pass --resume to continue it or "
                       "choose another --output")


def _trained_start_check(inv: Invocation) -> None:
    checks.check_trained_start(inv.settings)


def _run_teacher_check(inv: Invocation) -> None:
    checks.check_run_teacher(inv.settings)


# The run functions.

def _write_config(ctx: Context, inv: Invocation, out_dir: str) -> None:
    if ctx.info.is_main:
        write_config(os.path.join(out_dir, "config.yaml"), resolved_config(inv.args, inv.parser))


def _begin(inv: Invocation) -> Context:
    ctx = Context(inv.settings.system, inv.settings.command)
    _write_config(ctx, inv, ctx.out)
    return ctx


def _run_training(stage) -> Callable[[Invocation], None]:
    """A stage that trains a model it builds, in its own directory."""
    def run(inv: Invocation) -> None:
        s = inv.settings
        resume = check_fresh_or_resume(s.system.output, s.system.resume)
        ctx = _begin(inv)
        stage(s, ctx, ctx.out, resume, after_step=inv.after_step)
    return run


def _run_prune(inv: Invocation) -> None:
    ctx = _begin(inv)
    stage_prune(inv.settings, ctx, inv.source, ctx.out)


def _run_finetune(inv: Invocation) -> None:
    s = inv.settings
    teacher = checks.finetune_teacher(s.distill, inv.source)
    resume = check_fresh_or_resume(s.system.output, s.system.resume)
    ctx = _begin(inv)
    stage_finetune(s, ctx, inv.source, teacher, ctx.out, resume, after_step=inv.after_step)


def _run_eval(inv: Invocation) -> None:
    ctx = _begin(inv)
    model, metadata = models.load_vtp_model(inv.source)
    stage_eval(inv.settings, ctx, model, metadata, ctx.out, os.path.abspath(inv.source))


def _run_export(inv: Invocation) -> None:
    a = inv.args
    model, _ = models.load_vtp_model(inv.source)
    stage_export(inv.settings, a.output, a.format, a.batch_size, a.opset, model, inv.source, print)


def _run_demo(inv: Invocation) -> None:
    try:
        demo.run(inv.args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise VTPError(str(e)) from None


def _run_report(inv: Invocation) -> None:
    run_dir = inv.args.run_dir
    if not run_dir:
        raise VTPError("vtp report: give the RUN directory")
    if not os.path.isdir(run_dir):
        raise VTPError(f"RUN not found: {run_dir}")
    out = inv.args.output or os.path.join(run_dir, "report")
    print(report.write_report(run_dir, out), flush=True)


class RunStage(NamedTuple):
    """One stage of `vtp run`: its directory name, the file that says it is done, and the
    function that runs it there: (invocation, ctx, run directory, resume) -> summary."""
    name: str
    done_file: str
    trains: bool
    run: Callable[..., Optional[Dict[str, Any]]]


def _rs_train(inv, ctx, run_dir, resume):
    return stage_train(inv.settings, ctx, os.path.join(run_dir, "train"), resume,
                       after_step=inv.after_step)


def _rs_eval_dense(inv, ctx, run_dir, resume):
    return stage_eval_dense(inv.settings, ctx, os.path.join(run_dir, "eval-dense"))


def _rs_sparse_train(inv, ctx, run_dir, resume):
    return stage_sparse_train(inv.settings, ctx, os.path.join(run_dir, "sparse-train"), resume,
                              after_step=inv.after_step)


def _rs_prune(inv, ctx, run_dir, resume):
    return stage_prune(inv.settings, ctx, os.path.join(run_dir, "sparse-train", "model"),
                       os.path.join(run_dir, "prune"))


def _rs_finetune(inv, ctx, run_dir, resume):
    pruned = os.path.join(run_dir, "prune", "model")
    return stage_finetune(inv.settings, ctx, pruned, checks.finetune_teacher(inv.settings.distill, pruned),
                          os.path.join(run_dir, "finetune"), resume, after_step=inv.after_step)


def _rs_eval_pruned(inv, ctx, run_dir, resume):
    """The fine-tuned model, timed in turns with the dense model in this one process, so
    that the report's speed-up compares two figures taken under the same conditions."""
    s = inv.settings
    model, metadata = models.load_vtp_model(os.path.join(run_dir, "finetune", "model"))
    dense = {"dense": dense_for_eval(s)[0]} if s.eval.bench_steps > 0 else None
    return stage_eval(s, ctx, model, metadata, os.path.join(run_dir, "eval-pruned"), "pruned",
                      timed_with=dense)


def _rs_report(inv, ctx, run_dir, resume):
    if ctx.info.is_main:
        print(report.write_report(run_dir, os.path.join(run_dir, "report")), flush=True)


RUN_STAGES = (
    RunStage("train", "summary.json", True, _rs_train),
    RunStage("eval-dense", "eval.json", False, _rs_eval_dense),
    RunStage("sparse-train", "summary.json", True, _rs_sparse_train),
    RunStage("prune", "summary.json", False, _rs_prune),
    RunStage("finetune", "summary.json", True, _rs_finetune),
    RunStage("eval-pruned", "", False, _rs_eval_pruned),  # measured again on every resume
    RunStage("report", "", False, _rs_report),
)


def _run_all(inv: Invocation) -> None:
    """`vtp run`: RUN_STAGES in one run directory, each skipped once done; a training stage
    that stops early (--stop-after-steps) ends the run there, --resume continues it."""
    # A run killed before it wrote its config has nothing to continue: the same command with
    # --resume starts it from the beginning.
    nothing_yet = inv.settings.system.resume and not os.path.isfile(
        os.path.join(inv.settings.system.output, "config.yaml"))
    ctx = _begin(inv)
    run_dir = ctx.out
    if nothing_yet:
        ctx.say(f"run: --resume found no run in {run_dir} yet: starting from the beginning")
    for stage in RUN_STAGES:
        if stage.name == "train" and inv.settings.training["train"].epochs == 0:
            continue
        out_dir = os.path.join(run_dir, stage.name)
        # Rank 0's answer, so that every process takes the same branch.
        done = bool(stage.done_file) and distributed.broadcast_object(
            os.path.isfile(os.path.join(out_dir, stage.done_file)), ctx.info)
        if not done:
            resume = False
            if stage.trains:
                resume = check_fresh_or_resume(out_dir, inv.settings.system.resume, optional=True)
                _write_config(ctx, inv, out_dir)
            summary = stage.run(inv, ctx, run_dir, resume)
            if stage.trains and summary["stopped"]:
                return
        if stage.name == "train":
            # The rest of the run starts from the model the dense stage trained.
            trained = inv.settings.start.from_directory(os.path.join(out_dir, "model"))
            inv = inv._replace(settings=inv.settings.with_start(trained))


_DENSE_FLAGS = (add_data_args, add_model_args)
COMMANDS: Dict[str, Command] = {c.name: c for c in (
    Command("demo", "the whole pipeline on MNIST digits, on a CPU, in minutes",
            "Dense training, sparse training, pruning and fine-tuning of a small ViT on real "
            "MNIST digits shipped with the package; prints a dense vs pruned table.",
            (demo.add_arguments,), (), _run_demo, "runs/demo/"),
    Command("train", "train or fine-tune a dense model: the trained model VTP starts from",
            "Dense training: an ordinary timm model trained on the ImageFolder, from random "
            "weights, from timm's pretrained weights (--pretrained) or from a local checkpoint "
            "(--checkpoint: a timm file, or a vtp.save directory, which carries its own "
            "architecture; --reset-head for another class count), with the DeiT recipe. "
            "Writes model/ for `vtp sparse-train --checkpoint DIR/model` or `vtp run "
            "--checkpoint DIR/model`.",
            _DENSE_FLAGS + (partial(add_train_args, defaults=TRAIN_DEFAULTS),
                            partial(add_eval_args, bench=False), add_system_args,
                            partial(add_output_args, stage="train")),
            (_data_check(True), _start_check, _distill_flags_check), _run_training(stage_train),
            "config.yaml, metrics.jsonl, checkpoints/, model/, summary.json"),
    Command("sparse-train", "train a dense model with gates and the L1 gate penalty",
            "Sparse training (VTP step 1): gates in front of qkv, proj, fc1 and fc2 of every "
            "block, trained with task loss + lambda * sum|gate|, from a trained model "
            "(--checkpoint). Writes model/ (the gated model) for `vtp prune`.",
            _DENSE_FLAGS + (_sites_flag, partial(add_train_args, defaults=SPARSE_DEFAULTS),
                            partial(add_eval_args, bench=False), add_system_args,
                            partial(add_output_args, stage="sparse-train")),
            (_data_check(True), _start_check, _distill_flags_check),
            _run_training(stage_sparse_train),
            "config.yaml, metrics.jsonl, checkpoints/, model/ (gated), summary.json"),
    Command("prune", "choose kept dimensions from the gates and shrink the model",
            "Pruning (VTP step 2): a plan from the gate values of a sparse-trained model "
            "(global threshold by default), then a physically smaller timm model. Writes "
            "plan.json, gates.json and model/.",
            (_source_flag("sparse-train directory, `vtp run` directory or vtp.save directory"),
             add_prune_args, _prune_extra_flags, partial(add_output_args, stage="prune")),
            (_prune_check,), _run_prune, "plan.json, gates.json, model/, summary.json",
            source=True),
    Command("finetune", "train the pruned model without the penalty",
            "Fine-tuning (VTP step 3) of a pruned model with the DeiT recipe; --distill adds "
            "a teacher (the dense model, the gated one or any saved model).",
            (_source_flag("prune directory, `vtp run` directory or vtp.save directory"),
             add_data_args, partial(add_model_args, dense=False),
             partial(add_train_args, defaults=FINETUNE_DEFAULTS), add_distill_args,
             partial(add_eval_args, bench=False), add_system_args,
             partial(add_output_args, stage="finetune")),
            (_source_check, _data_check(True), _distill_flags_check), _run_finetune,
            "config.yaml, metrics.jsonl, checkpoints/, model/, summary.json", source=True),
    Command("eval", "accuracy, parameters, MACs and images/s of a model",
            "Evaluates a saved model on the validation split and measures inference speed.",
            (_source_flag("vtp.save directory, stage directory or `vtp run` directory"),
             partial(add_data_args, train=False), add_eval_args, _runtime_flag, add_system_args,
             partial(add_output_args, stage="eval")),
            (_source_check, _data_check(False), _runtime_check), _run_eval,
            "config.yaml, eval.json", source=True),
    Command("export", "write a model as an ONNX or torch.export file for deployment",
            "Exports a saved model (dense, gated or pruned) to ONNX (checked with ONNX Runtime) "
            "or to a torch.export program (checked by torch.export.load), with a dynamic batch "
            "size; the file is written only once it gives the model's outputs.",
            (_source_flag("vtp.save directory, stage directory or `vtp run` directory"),
             _export_flags),
            (_export_check,), _run_export, "FILE", source=True),
    Command("report", "dense vs pruned table and plots of a run",
            "Prints accuracy, parameters, MACs and images/s of the dense and pruned models "
            "and writes PNG plots: kept dimensions per block and site, the gate value "
            "distribution at pruning time, and training curves.",
            (_report_flags,), (), _run_report, "report.md, kept_dims.png, gate_hist.png, curves.png"),
    Command("run", "(train,) sparse-train, prune, finetune, eval and report in one go",
            "The whole VTP pipeline in one run directory: train/ (with --train-epochs), "
            "eval-dense/, sparse-train/, prune/, finetune/, eval-pruned/ (the dense and pruned "
            "models timed in turns), report/. It starts from a trained model: --checkpoint, "
            "--pretrained weights for these classes, or the dense stage first (--train-epochs "
            "N); otherwise it stops before any work. --resume picks up where it stopped.",
            _DENSE_FLAGS + (_sites_flag,
                            partial(add_train_args, defaults=dict(TRAIN_DEFAULTS, epochs=0),
                                    prefix="train-", shared=False, optional_stage=True),
                            partial(add_train_args, defaults=SPARSE_DEFAULTS, prefix="sparse-",
                                    shared=False),
                            partial(add_train_args, defaults=FINETUNE_DEFAULTS, prefix="finetune-",
                                    shared=True),
                            partial(add_distill_args, run=True), add_prune_args, add_eval_args,
                            add_system_args, partial(add_output_args, stage="run")),
            (_data_check(True), _start_check, _prune_check, _distill_flags_check,
             _run_output_check, _trained_start_check, _run_teacher_check), _run_all,
            "[train/] eval-dense/ sparse-train/ prune/ finetune/ eval-pruned/ report/"),
)}


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The `vtp` parser and its sub-command parsers by name, from COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="vtp", formatter_class=HelpFormatter,
        description="Vision Transformer Pruning (Zhu, Tang, Han 2021) for timm ViTs: dense and "
                    "sparse training, pruning, fine-tuning (with distillation), evaluation and "
                    "reports.",
        epilog="Multi-GPU: torchrun --nproc_per_node 8 -m vtp.app run ... (or the `vtp` script).\n"
               "Every command takes --config x.yaml; flags on the command line override it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs: Dict[str, argparse.ArgumentParser] = {}
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, formatter_class=HelpFormatter,
                           description=f"{command.description}\n\nwrites: {command.outputs}")
        add_config_arg(p)
        for add_flags in command.flags:
            add_flags(p)
        p.set_defaults(func=lambda args, sub_parser, name=command.name: _COMMAND_FUNCTIONS[name](args, sub_parser))
        subs[command.name] = p
    return parser, subs


def _execute(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
             after_step=None) -> int:
    """A command of COMMANDS: its settings read once, SOURCE resolved, its checks in order
    (all before any work), then its run function."""
    command = COMMANDS[name]
    source = resolve_source(args.source, name) if command.source else None
    inv = Invocation(settings_from_args(args, name), source, args, parser, after_step)
    for check in command.checks:
        check(inv)
    command.run(inv)
    return 0


def cmd_demo(args, parser) -> int:
    return _execute("demo", args, parser)


def cmd_train(args, parser, after_step=None) -> int:
    return _execute("train", args, parser, after_step)


def cmd_sparse_train(args, parser, after_step=None) -> int:
    return _execute("sparse-train", args, parser, after_step)


def cmd_prune(args, parser) -> int:
    return _execute("prune", args, parser)


def cmd_finetune(args, parser, after_step=None) -> int:
    return _execute("finetune", args, parser, after_step)


def cmd_eval(args, parser) -> int:
    return _execute("eval", args, parser)


def cmd_export(args, parser) -> int:
    return _execute("export", args, parser)


def cmd_report(args, parser) -> int:
    return _execute("report", args, parser)


def cmd_run(args, parser, after_step=None) -> int:
    return _execute("run", args, parser, after_step)


_COMMAND_FUNCTIONS = {"demo": cmd_demo, "train": cmd_train, "sparse-train": cmd_sparse_train,
                      "prune": cmd_prune, "finetune": cmd_finetune, "eval": cmd_eval,
                      "export": cmd_export, "report": cmd_report, "run": cmd_run}


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
