"""The architecture, checked: imports go one way, no import circles, short functions, no hooks.

Read from the source with :mod:`ast` (nothing is imported), so these run in milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TLI = ROOT / "tli"
MAX_LINES = 60  # per function, docstring not counted, unless the docstring says why


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(TLI.rglob("*.py")):
        rel = f.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (lazy ones too), resolved to dotted names."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _tli_deps(name: str) -> set[str]:
    return {m for m in _imports(name, MODULES[name]) if m in MODULES and m != name}


def test_no_import_circle_between_tli_modules() -> None:
    """Lazy imports count too: a circle through a function-level import is still a circle."""
    graph = {m: _tli_deps(m) for m in MODULES}
    # Packages' __init__ and the CLI face (which registers its own sub-command modules) aside.
    graph = {m: {d for d in ds if not MODULES[d].name == "__init__.py"} for m, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize(
    ("prefix", "forbidden"),
    [
        ("tli.inject", ("ray", "kfp", "lm_eval")),  # tensor surgery: no Ray, KFP or lm-eval
        ("tli.data", ("kfp", "lm_eval")),
        ("tli.train", ("kfp", "lm_eval")),
        ("tli.tune", ("kfp", "lm_eval")),
        ("tli.eval", ("kfp", "ray")),
        ("tli.pipeline", ("kfp",)),  # the library never imports kfp; only the CLI reaches it
    ],
)
def test_imports_go_one_way(prefix: str, forbidden: tuple[str, ...]) -> None:
    for name, path in MODULES.items():
        if not (name == prefix or name.startswith(prefix + ".")):
            continue
        bad = {m for m in _imports(name, path) if m.split(".")[0] in forbidden}
        bad |= {m for m in _imports(name, path) if m.startswith(("components", "pipelines"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_only_the_cli_reaches_the_pipeline_package() -> None:
    for name, path in MODULES.items():
        reach = {m for m in _imports(name, path) if m.split(".")[0] in ("kfp", "pipelines")}
        if reach:
            assert name.startswith("tli.cli"), f"{name} imports {sorted(reach)}"


def _function_lengths() -> list[tuple[str, int, str]]:
    out = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            n = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node)
            if doc is not None:
                first = node.body[0]
                n -= first.end_lineno - first.lineno + 1
            out.append((f"{name}:{node.lineno} {node.name}", n, doc or ""))
    return out


def test_functions_are_short_or_say_why() -> None:
    long = [(where, n) for where, n, doc in _function_lengths()
            if n > MAX_LINES and "long because" not in doc.lower()]  # fmt: skip
    assert not long, f"functions over {MAX_LINES} lines without a reason in the docstring: {long}"


def test_no_test_hooks_in_public_signatures() -> None:
    """Fault drills go through tli.drills (one environment variable), never a parameter."""
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                args = [a.arg for a in node.args.args + node.args.kwonlyargs]
                hooks = [a for a in args if a.startswith(("fail_", "fault_", "inject_failure"))]
                assert not hooks, f"{name}.{node.name} takes test hooks {hooks}"


def test_the_drill_variable_is_read_in_one_place() -> None:
    readers = [n for n, p in MODULES.items() if "TLI_DRILL" in p.read_text()]
    assert readers == ["tli.drills"], readers
