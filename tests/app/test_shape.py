"""The application's shape (issue 16): flags are read once, by the command layer, into typed
settings; the plan's arguments are checked by the library's own rule."""
from __future__ import annotations

import ast
from pathlib import Path

import vtp
from vtp.app import cli, settings

from cli_helpers import FAST, TINY_MODEL, cli_error, flags

APP = Path(cli.__file__).parent
# The command layer: the parser and its flag groups, the one reading of the flags, and
# `vtp demo`, a command of its own.
COMMAND_LAYER = {"cli.py", "flags.py", "settings.py", "demo.py"}


def test_nothing_below_the_command_layer_reads_flags():
    readers = set()
    for path in APP.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        params = {a.arg for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for a in n.args.args + n.args.kwonlyargs}
        imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if "argparse" in imports or "args" in params or "args" in names:
            readers.add(path.name)
    assert readers <= COMMAND_LAYER, readers - COMMAND_LAYER


def test_no_app_file_over_600_lines():
    for path in APP.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 600, path.name


def test_one_table_drives_the_parser_and_the_run():
    _, subs = cli.build_parser()
    assert set(subs) == set(cli.COMMANDS)
    for name, command in cli.COMMANDS.items():
        assert command.outputs in subs[name].description
    assert [s.name for s in cli.RUN_STAGES] == ["train", "eval-dense", "sparse-train", "prune",
                                                 "finetune", "eval-pruned", "report"]
    parsed = subs["run"].parse_args(["--depth", "3", "--model-kwargs", '{"qkv_bias": false}'])
    s = settings.settings_from_args(parsed, "run")
    assert s.start.shape == {"depth": 3, "qkv_bias": False} and s.start.from_kwargs == ("qkv_bias",)
    assert set(s.training) == {"train", "sparse-train", "finetune"}


def test_plan_flags_are_checked_by_the_library(capsys, tmp_path, monkeypatch):
    """`vtp run` and `vtp demo` check --ratio/--flops-target/... with vtp.check_plan_args
    (whatever it says, in the flags' words), before any work."""
    seen = []

    def rule(**kwargs):
        seen.append(kwargs)
        raise ValueError("round_to: expected what the library wants, got 3")

    monkeypatch.setattr(vtp, "check_plan_args", rule)
    out = tmp_path / "o"
    err = cli_error(capsys, flags(["run", "--synthetic", "--round-to", "3", "--ratio", "0.3",
                                   "--sparse-epochs", "1", "-o", str(out)], TINY_MODEL, FAST))
    assert "--round-to: expected what the library wants, got 3" in err
    assert seen[-1] == dict(ratio=0.3, scope="global", flops_target=None, round_to=3, min_keep=0)
    err = cli_error(capsys, ["demo", "--out", str(out), "--round-to", "3", "--no-progress"])
    assert "--round-to: expected what the library wants, got 3" in err
    assert seen[-1]["round_to"] == 3
    assert not out.exists()
