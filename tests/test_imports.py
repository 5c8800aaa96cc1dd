"""The package's import graph, read from the source with ``ast``: no cycle, and no module imports
one that stands above it in the layering of ``docs/design.md``. Every import statement counts
(module level, inside functions, relative); ``from pkg import name`` is an edge to ``pkg.name``
when that is a module of the package, else to ``pkg``. Importing a submodule also runs its
parent packages' ``__init__``; those implicit edges are not counted (every module would
otherwise close a cycle through the package root)."""

from __future__ import annotations

import ast
import pathlib

import guidance_kernels

ROOT = pathlib.Path(guidance_kernels.__file__).parent
PKG = "guidance_kernels"
# compiled modules (built from csrc/, maybe absent here): leaves of the graph, lowest layer
EXTENSIONS = {f"{PKG}._C", f"{PKG}._cpu"}

# lowest first; a module may import modules of its own layer or below, never above
LAYERS = [
    ["_checks", "planning", "metrics", "kernels", "data", "files", "_scaling", "_memory"],
    ["backends"],
    ["ops", "feature_debiased"],
    ["functional"],
    ["nn"],
    ["truth", "peer_adapters"],  # the bench's and the peer comparison's fp64 truth and peers
    [""],  # the package root, guidance_kernels/__init__.py
    ["train"],
    ["integrations"],  # Lightning / Hugging Face trainers, over train
    ["similarity", "bench"],
    ["commands"],
    ["cli", "__main__"],
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = path
    return out


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """Package modules that ``name`` (source at ``path``) imports, anywhere in its body."""
    here = name if _is_package(path) else name.rpartition(".")[0]
    found = set()

    def resolve(base: str) -> None:
        if base in EXTENSIONS:
            return
        while base and base not in modules:
            base = base.rpartition(".")[0]
        if base:
            found.add(base)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    resolve(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not (base == PKG or base.startswith(PKG + ".")):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                resolve(sub if sub in modules or sub in EXTENSIONS else base)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> int:
    top = name[len(PKG) + 1 :].split(".")[0] if name != PKG else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{name}: not in any layer of LAYERS (add it)")


def test_graph_sees_function_level_and_relative_imports():
    g = _graph()
    # lazy (function-level) import of the measured dispatch table in backends/__init__.py
    assert f"{PKG}.backends.dispatch" in g[f"{PKG}.backends"]
    assert f"{PKG}.planning" in g[f"{PKG}.functional"]
    assert f"{PKG}.train.experiments.main" in g[f"{PKG}.commands.demo"]  # imported inside the command


def test_no_import_cycle():
    g = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_no_module_imports_one_above_it():
    g = _graph()
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})" for m, ds in g.items() for d in ds
           if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_planning_imports_nothing_from_the_package():
    assert _graph()[f"{PKG}.planning"] == set()


def test_every_call_path_stays_clear_of_the_measured_dispatch():
    """``backends.dispatch`` (and its json table) is imported lazily, by ``backend="auto"`` on
    CUDA only: no module imports it at module level except the bench tool that writes it."""
    allowed = {f"{PKG}.bench.dispatch"}
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("backends.dispatch"):
                assert name in allowed, f"{name} imports backends.dispatch at module level"
            if isinstance(node, ast.ImportFrom) and node.module == f"{PKG}.backends":
                assert "dispatch" not in {a.name for a in node.names}, name


def test_a_call_does_not_load_the_measured_dispatch():
    """At run time too: importing the package and computing a loss (``backend="auto"``, CPU)
    leaves ``backends.dispatch`` and its json table unloaded."""
    import subprocess
    import sys

    code = (
        "import sys, torch, guidance_kernels as gk\n"
        "x, y = torch.randn(8, 5, requires_grad=True), torch.randn(8, 3)\n"
        "gk.guidance_loss([x], [y]).backward()\n"
        "print('guidance_kernels.backends.dispatch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
