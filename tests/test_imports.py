"""The library's import graph: no cycles between tbps_lib modules (counting imports inside functions and under
TYPE_CHECKING too), every module imports on its own, and the models never pull in matplotlib."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tbps_lib

ROOT = Path(tbps_lib.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> file for every module of the package (``pkg.__init__`` is named ``pkg``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("tbps_lib",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the tbps_lib modules it imports anywhere in its source (static, from the syntax tree)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import mod" imports the module pkg.mod when there is one, else names of pkg
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# The one deliberate upward call: a config naming the workbook's own weights (``workbook:<arch>``) trains
# them on first use when an encoder or its tokenizer is built (``tbps_lib.pretrain.resolve_pretrained``, a
# function-level import). Nothing else may point up; this list is reviewed like code.
FIRST_USE_TRAINING = {("tbps_lib.models.encoders", "tbps_lib.pretrain"), ("tbps_lib.data.loaders", "tbps_lib.pretrain")}


def test_no_import_cycles():
    graph = import_graph()
    assert "tbps_lib.data.synthetic" in graph["tbps_lib.data.catalog"]  # the parser sees lazy imports
    for module, target in FIRST_USE_TRAINING:
        assert target in graph[module]  # still there (else drop it from the list)
        graph[module] = graph[module] - {target}
    assert cycles(graph) == []


def test_layering():
    """Models and losses stay below data exploration and analysis; losses do not reach into data."""
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith(("tbps_lib.models", "tbps_lib.losses")):
            assert not {d for d in deps if d.startswith(("tbps_lib.analysis", "tbps_lib.data.explore"))}, name
        if name.startswith("tbps_lib.losses"):
            assert not {d for d in deps if d.startswith("tbps_lib.data")}, name


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_module_imports_on_its_own():
    """Each module imported first, in turn, with every tbps_lib module dropped from sys.modules between
    them (third-party packages stay loaded, so this takes seconds, not one interpreter per module)."""
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    out = _run(f"""
import importlib, sys
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "tbps_lib" or m.startswith("tbps_lib.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("ok", len({names!r}))
""")
    assert out.split() == ["ok", str(len(names))]


def test_models_do_not_import_matplotlib():
    out = _run("import sys, tbps_lib.models.baseline, tbps_lib.models.sew_mcm, tbps_lib.engine.evaluate\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    assert out.strip() == "[]"
