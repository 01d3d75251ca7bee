"""Imports go one way: edge → pipeline → config → checks → foundations → model (STYLE.md §5)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "milter" / "authmilter"

RANKS = {
    "model": 0,
    "message": 1,
    "resolver": 1,
    "tables": 1,
    "keys": 1,
    "dkim_rsa": 1,
    "history": 1,
    "spf_check": 2,
    "dkim_verify": 2,
    "dkim_sign": 2,
    "dmarc": 2,
    "authresults": 2,
    "actions": 2,
    "reports": 2,
    "config": 3,
    "pipeline": 4,
    "cli": 5,
    "milter_app": 5,
    "quickack": 5,
    "supervisor": 5,
    "__main__": 5,
}
EDGE = 5
CORE_FORBIDDEN = {"Milter", "signal", "socketserver"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules <= set(RANKS), f"give these a layer in RANKS: {sorted(modules - set(RANKS))}"


def test_imports_only_go_down() -> None:
    problems = []
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        rank = RANKS[path.stem]
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top == "authmilter" and "." in name:
                target = name.split(".")[1]
                allowed = RANKS[target] < rank or (rank == EDGE and RANKS[target] == EDGE)
                if not allowed:
                    problems.append(f"{path.stem} (layer {rank}) imports {target} (layer {RANKS[target]})")
            if rank < EDGE and top in CORE_FORBIDDEN:
                problems.append(f"core module {path.stem} imports {top}")
    assert not problems, "\n".join(problems)


def test_no_module_shadows_a_wrapped_library() -> None:
    for name in ("milter", "dns", "spf", "dkim", "authres"):
        assert not (PACKAGE / f"{name}.py").exists()
        assert not (PACKAGE / name).is_dir()
    assert not (PACKAGE.parent / "milter").exists() and not (PACKAGE.parent / "__init__.py").exists()


def test_the_reports_package_imports_only_lower_layers() -> None:
    # reports/ is one layer ("reports" in RANKS): its modules import each other and lower layers only.
    problems = []
    for path in sorted((PACKAGE / "reports").glob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] in CORE_FORBIDDEN:
                problems.append(f"reports/{path.name} imports {parts[0]}")
            lower = parts[0] != "authmilter" or len(parts) == 1 or parts[1] == "reports"
            if not lower and RANKS[parts[1]] >= RANKS["reports"]:
                problems.append(f"reports/{path.name} imports {parts[1]} (layer {RANKS[parts[1]]})")
    assert not problems, "\n".join(problems)
