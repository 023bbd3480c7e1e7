"""The library's import graph: no cycles, top-level and function-level imports both, and every
function-level import says on its line (or the line above) why it is deferred."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "flexigpt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _resolve(name: str, current: str, is_pkg: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The project modules one import statement loads (a ``from pkg import sub`` loads ``pkg.sub``)."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in MODULES:
                out.append(alias.name)
        return out
    if node.level:
        base = current.split(".") if is_pkg else current.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    for alias in node.names:
        sub = f"{mod}.{alias.name}"
        if sub in MODULES:
            out.append(sub)
        elif mod in MODULES:
            out.append(mod)
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at function level)`` for every project import of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, name, is_pkg, child):
                    found.append((target, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {t for t, _, _ in _imports(name, path) if t != name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def test_the_graph_reader_sees_function_level_imports():
    graph = _graph()
    assert "flexigpt.arch" in graph["flexigpt.surgery"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_library():
    assert _cycles(_graph()) == []


def _says_why(lines: list[str], i: int) -> bool:
    """A comment on the import's own line, or right above the run of import lines it belongs to."""
    if "#" in lines[i]:
        return True
    j = i - 1
    while j >= 0 and lines[j].strip().startswith(("import ", "from ")):
        if "#" in lines[j]:
            return True
        j -= 1
    return j >= 0 and lines[j].strip().startswith("#")


def test_function_level_imports_say_why():
    missing = []
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    if not _says_why(lines, node.lineno - 1):
                        missing.append(f"{name}:{node.lineno}")
    assert not missing, f"function-level imports without a one-line reason: {sorted(set(missing))}"


def test_no_library_module_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
