"""The import structure the code relies on: models never import what schedules them (pipeline,
objectives, step, trainer), there are no import cycles in jaxlm/ or kernels_pallas/, every family
is found by the registry, and configs load without JAX."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxlm", "kernels_pallas")
SCHEDULERS = {"jaxlm.parallel.pipeline", "jaxlm.objectives", "jaxlm.state", "jaxlm.step",
              "jaxlm.train"}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its
    __init__)."""
    out = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (function-level imports
    count: they run too). `from pkg import name` is an edge to pkg.name where that is a module,
    else to pkg itself (its __init__ runs)."""
    files = module_files(root)
    graph = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != mod}
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO)


def test_no_import_cycles(graph):
    assert len(graph) > 40  # the whole tree was read
    assert cycles(graph) == []


def test_models_never_import_what_schedules_them(graph):
    models = [m for m in graph if m.startswith("jaxlm.models")]
    assert "jaxlm.models.llama.model" in models and "jaxlm.models.mixtral.model" in models
    for m in models:
        assert not reachable(graph, m) & SCHEDULERS, (m, reachable(graph, m) & SCHEDULERS)


def test_the_checks_see_cycles_and_forbidden_imports(tmp_path):
    """On a throwaway tree: a two-module cycle through a function-level import, and a model
    reaching the pipeline through another module, are both found."""
    for rel, text in {
        "jaxlm/__init__.py": "",
        "jaxlm/a.py": "from jaxlm import b\n",
        "jaxlm/b.py": "def f():\n    from jaxlm.a import x\n",
        "jaxlm/models/__init__.py": "",
        "jaxlm/models/fam.py": "from jaxlm.nn import helper\n",
        "jaxlm/nn/__init__.py": "",
        "jaxlm/nn/helper.py": "from ..parallel import pipeline\n",
        "jaxlm/parallel/__init__.py": "",
        "jaxlm/parallel/pipeline.py": "",
        "kernels_pallas/__init__.py": "",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = import_graph(tmp_path)
    assert cycles(g) == [["jaxlm.a", "jaxlm.b"]]
    assert "jaxlm.parallel.pipeline" in reachable(g, "jaxlm.models.fam")


def test_registry_finds_every_family_folder():
    from jaxlm.models.registry import families
    folders = {p.parent.name for p in (REPO / "jaxlm" / "models").glob("*/__init__.py")}
    assert set(families()) == folders == {"bert", "deepseek", "gpt2", "llama", "mixtral", "t5"}
    for name, fam in families().items():
        assert fam.config().family == name


def test_configs_load_without_jax():
    """`jaxlm.data prepare` and config checks need no JAX: loading every family's config must
    not import it."""
    code = ("import sys, jaxlm.config as c; "
            "[c.load_config([p]) for p in ('configs/tiny.yaml', 'configs/mixtral-tiny.yaml')]; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
