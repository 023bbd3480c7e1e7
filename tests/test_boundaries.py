"""The import rules of the project: the app never does tensor math, the library never
imports the UI stack, and the pure figure/table modules import no gradio."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP_FORBIDDEN = {"torch", "transformers", "peft", "accelerate", "safetensors"}
PURE_FORBIDDEN = APP_FORBIDDEN | {"gradio"}
UI_STACK = {"gradio", "plotly", "spaces"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _app_files() -> list[Path]:
    files = sorted((ROOT / "app").rglob("*.py")) + [ROOT / "app.py"]
    assert len(files) >= 10, files  # the app exists: ui, common, session, figures, tables, text, tabs...
    return files


def test_app_imports_no_tensor_libraries():
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & APP_FORBIDDEN) for p in _app_files()}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"app modules import tensor libraries: {bad}"


def test_figures_and_tables_are_pure():
    for name in ("figures.py", "tables.py", "text.py"):
        found = _imports(ROOT / "app" / name) & PURE_FORBIDDEN
        assert not found, f"app/{name} imports {sorted(found)}"


def test_library_never_imports_the_ui_stack():
    lib = ROOT / "flexigpt"
    modules = sorted(".".join(p.relative_to(lib).with_suffix("").parts).removesuffix(".__init__")
                     for p in lib.rglob("*.py") if p.stem != "__main__" and p.relative_to(lib).parts[0] != "commands"
                     and p.name != "__init__.py" or (p.name == "__init__.py" and p.parent != lib
                                                    and p.parent.name != "commands"))
    commands = sorted(p.stem for p in (ROOT / "flexigpt" / "commands").glob("*.py") if p.stem != "__init__")
    assert "plan" in modules and "models" in modules and "methods.flexigpt" in modules
    code = "; ".join(
        ["import sys", "import flexigpt"]
        + [f"import flexigpt.{m}" for m in modules]
        + [f"import flexigpt.commands.{c}" for c in commands]
        + ["loaded = {m.split('.')[0] for m in sys.modules}",
           f"bad = loaded & set({sorted(UI_STACK)!r})",
           "assert not bad, bad",
           "print('ok', len(loaded))"]
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_library_has_no_gradio_source_imports():
    # a cheap static check too, so a lazy import inside a function is caught as well
    bad = {}
    for p in sorted((ROOT / "flexigpt").rglob("*.py")):
        found = _imports(p) & UI_STACK
        if found:
            bad[str(p.relative_to(ROOT))] = sorted(found)
    assert not bad, bad
