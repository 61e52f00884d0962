"""The package's layout rules, checked on the source: the library never imports the
application, there is no import cycle, and no function hides an import of the project."""
import importlib
from pathlib import Path
from scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "import_graph.py"


def _import_graph_module():
    return load_script("tools/import_graph.py")


def test_library_app_split_has_no_cycles_and_no_hidden_imports():
    assert _import_graph_module().violations() == []


def test_the_checks_catch_what_they_look_for():
    tool = _import_graph_module()
    graph = {"vtp.a": {"vtp.b"}, "vtp.b": {"vtp.a"}, "vtp.c": set()}
    assert tool.cycles(graph) == [["vtp.a", "vtp.b", "vtp.a"]]
    assert tool.cycles({"vtp": {"vtp.a"}, "vtp.a": set()}) == []
    bad = {"vtp": set(), "vtp.io": {"vtp.app.cli"}, "vtp.app": set(), "vtp.app.cli": set(),
           "vtp_kernels": set(), "vtp_kernels.reference": {"vtp.prune"}, "vtp.prune": set()}
    found = tool.violations(bad, ["vtp.io.save: from vtp import prune"])
    assert found == ["library module vtp.io imports the application (vtp.app.cli)",
                     "kernel module vtp_kernels.reference imports the model library (vtp.prune)",
                     "import inside a function: vtp.io.save: from vtp import prune"]


def test_no_module_is_named_after_a_public_function_of_its_package():
    # The convention (as timm's _builder.py): a module that implements a public function is
    # underscored, and the package re-exports the function, so `vtp.plan` is the function and
    # vtp/_plan.py its code; a module of the function's own name would shadow it on import.
    root = SCRIPT.parents[1]
    for package in ("vtp", "vtp_kernels"):
        module = importlib.import_module(package)
        modules = {p.stem for p in (root / package).glob("*.py")} | {
            p.name for p in (root / package).iterdir() if (p / "__init__.py").exists()}
        public_functions = {name for name in module.__all__ if callable(getattr(module, name))
                            and not isinstance(getattr(module, name), type)}
        assert public_functions, package
        assert public_functions.isdisjoint(modules), (package, public_functions & modules)
