"""Imports go one way: edge → pipeline → config → checks → foundations → model (STYLE.md §5), and the
per-message core does no I/O of its own: only the modules in IO_MODULES open files, sockets or processes.

Both rules are read from the source with ``ast``, so every import form counts (``import a.b``,
``from a import b``, ``from authmilter import x``, ``from . import x``, ``from .x import y``, imports
inside functions), and the checkers run on any source text: the tests at the end feed them
synthetic modules with known violations to show that they can fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE_NAME = "authmilter"
PACKAGE = Path(__file__).resolve().parents[1] / "milter" / PACKAGE_NAME

RANKS = {
    "model": 0,
    "settings": 0,
    "memo": 0,  # bounded memos for pure functions of what senders send
    "domains": 0.5,  # names and envelope paths, below everything that reads them
    "message": 1,
    "dnswire": 0.8,  # DNS responses as plain values, below the resolver
    "resolver": 1,
    "tables": 1,
    "keys": 1,
    "dkim_rsa": 1,
    "history": 1,
    "dkim_body": 1.5,  # a foundation of the DKIM checks, built on message and dkim_rsa
    "suffix_list": 1,
    "transaction": 1.6,  # what every check reads: connection, envelope, message
    "checks": 1.8,  # the interface every check implements, and the registry
    "spf_check": 2,
    "dkim_verify": 2,
    "dkim_sign": 2,
    "dmarc": 2,
    "authresults": 2,
    "actions": 2,
    "arc_check": 2.5,  # ARC reuses DKIM key lookup, DMARC alignment and the A-R parser
    "arc_seal": 2.6,
    "reports": 2.7,  # report delivery reuses dmarc (organizational domain, record parsing)
    "config": 3,
    "pipeline": 4,
    "session": 4.5,  # the SMTP transaction state machine, fed by the edge
    "cli": 5,
    "milter_app": 5,
    "quickack": 5,
    "connection_socket": 5,
    "manpage": 5,
    "supervisor": 5,
    "metrics": 5,
    "logformat": 5,
    "__main__": 5,
    "preflight": 5,
    "migrate": 5,
    "reload": 5,
}
EDGE = 5
CORE_FORBIDDEN = {"Milter", "signal", "socketserver"}
# Below the edge, only these touch files, sockets or processes: every other core module
# (including any new one) must stay a plain function of its arguments.
IO_MODULES = {"resolver", "tables", "keys", "history", "reports", "suffix_list", "config"}
PER_MESSAGE_CORE = (
    "spf_check",
    "dkim_verify",
    "dkim_sign",
    "dmarc",
    "authresults",
    "actions",
    "message",
    "model",
    "domains",
    "settings",
    "memo",
    "transaction",
    "checks",
    "session",
)
# Modules whose only use is I/O: importing them into an I/O-free module is already a violation.
IO_LIBRARIES = {"socket", "subprocess", "multiprocessing", "pty", "shutil", "tempfile", "asyncio"}
IO_FUNCTIONS = {
    "open",
    "io.open",
    "io.open_code",
    "os.open",
    "os.fdopen",
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.popen",
    "os.execv",
    "os.execve",
    "os.execvp",
    "os.execvpe",
    "os.spawnv",
    "os.spawnve",
    "os.posix_spawn",
    "os.posix_spawnp",
    "os.mkfifo",
    "os.remove",
    "os.unlink",
    "os.rename",
    "os.replace",
    "os.makedirs",
    "os.mkdir",
    "os.listdir",
    "os.scandir",
    "os.stat",
}
# Path-like methods that read or write a file, whatever the receiver is called.
IO_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "open", "touch", "unlink", "mkdir"}


def _absolute(node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names; ``.`` is the package (modules are flat)."""
    if node.level == 0:
        return node.module or ""
    parents = [PACKAGE_NAME] if node.level == 1 else []  # `..` leaves the package
    return ".".join([*parents, node.module] if node.module else parents)


def imported_modules(source: str) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of everything ``module`` imports, in any form and at any depth."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            origin = _absolute(node)
            yield node.lineno, origin
            for alias in node.names:  # `from authmilter import milter_app` imports a module
                yield node.lineno, f"{origin}.{alias.name}"


def _package_module(name: str) -> str | None:
    """The authmilter module a dotted name refers to, if any."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == PACKAGE_NAME and parts[1] in RANKS:
        return parts[1]
    return None


def layer_problems(module: str, source: str) -> list[str]:
    """Upward imports of ``module`` and, below the edge, imports of Milter/signal/socketserver."""
    rank = RANKS[module]
    problems: dict[str, None] = {}  # ordered set: `from .x import y` names x twice
    for line, name in imported_modules(source):
        target = _package_module(name)
        if target is not None:
            allowed = RANKS[target] < rank or (rank == EDGE and RANKS[target] == EDGE)
            if not allowed:
                problems[f"{module}:{line} (layer {rank}) imports {target} (layer {RANKS[target]})"] = None
        if rank < EDGE and name.split(".")[0] in CORE_FORBIDDEN:
            problems[f"{module}:{line}: core module imports {name.split('.')[0]}"] = None
    return list(problems)


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, so that `from os import fork as f; f()` reads as os.fork."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: Mapping[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def io_problems(module: str, source: str) -> list[str]:
    """Calls in ``module`` that open files, create sockets or start processes."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    problems: dict[str, None] = {}
    for line, name in imported_modules(source):
        if name.split(".")[0] in IO_LIBRARIES:
            problems[f"{module}:{line}: imports {name.split('.')[0]}, an I/O library"] = None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        method = node.func.attr if isinstance(node.func, ast.Attribute) else None
        called = _dotted(node.func, aliases) or f"(...).{method}"
        if called in IO_FUNCTIONS or called.split(".")[0] in IO_LIBRARIES or method in IO_METHODS:
            problems[f"{module}:{node.lineno}: calls {called}()"] = None
    return list(problems)


def _package_sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _io_free(module: str) -> bool:
    return RANKS[module] < EDGE and module not in IO_MODULES


def test_every_module_has_a_layer() -> None:
    modules = set(_package_sources())
    assert modules <= set(RANKS), f"give these a layer in RANKS: {sorted(modules - set(RANKS))}"


def test_imports_only_go_down() -> None:
    problems = [p for module, source in _package_sources().items() for p in layer_problems(module, source)]
    assert not problems, "\n".join(problems)


def test_core_modules_do_no_io() -> None:
    sources = _package_sources()
    problems = [
        p for module, source in sources.items() if _io_free(module) for p in io_problems(module, source)
    ]
    assert not problems, "\n".join(problems) + "\nmove the I/O to one of " + ", ".join(sorted(IO_MODULES))


def test_the_per_message_checks_are_io_free() -> None:
    for module in PER_MESSAGE_CORE:
        assert _io_free(module), module


def test_no_module_shadows_a_wrapped_library() -> None:
    for name in ("milter", "dns", "spf", "dkim", "authres"):
        assert not (PACKAGE / f"{name}.py").exists()
        assert not (PACKAGE / name).is_dir()
    assert not (PACKAGE.parent / "milter").exists() and not (PACKAGE.parent / "__init__.py").exists()


# The checkers can fail: synthetic modules with one violation each.


def test_from_package_import_of_the_edge_is_caught() -> None:
    source = "from authmilter import milter_app\n"
    assert layer_problems("model", source) == ["model:1 (layer 0) imports milter_app (layer 5)"]


def test_relative_import_of_the_edge_is_caught() -> None:
    source = "def start() -> None:\n    from .supervisor import run\n    run()\n"
    assert layer_problems("dmarc", source) == ["dmarc:2 (layer 2) imports supervisor (layer 5)"]


def test_every_import_form_is_seen() -> None:
    forms = {
        "import authmilter.pipeline": "pipeline",
        "import authmilter.pipeline as p": "pipeline",
        "from authmilter.pipeline import evaluate": "pipeline",
        "from authmilter import pipeline": "pipeline",
        "from . import pipeline": "pipeline",
        "from .pipeline import evaluate": "pipeline",
        "def f() -> None:\n    import authmilter.config": "config",
    }
    for source, target in forms.items():
        problems = layer_problems("dmarc", source + "\n")
        assert problems and target in problems[0], source


def test_downward_imports_pass() -> None:
    source = "from . import model\nfrom .resolver import Resolver\nfrom authmilter import message\n"
    assert layer_problems("dmarc", source) == []


def test_socket_in_a_check_is_caught() -> None:
    source = "import socket\n\ndef ask() -> None:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    problems = io_problems("dmarc", source)
    assert "dmarc:1: imports socket, an I/O library" in problems
    assert "dmarc:4: calls socket.socket()" in problems


def test_file_and_process_calls_in_a_check_are_caught() -> None:
    source = (
        "import os\nimport pathlib\nfrom os import fork as spawn\n"
        "def f(p: pathlib.Path) -> None:\n"
        "    open('x')\n    os.open('x', 0)\n    p.read_text()\n    spawn()\n"
        "    pathlib.Path('y').write_bytes(b'')\n"
    )
    called = {p.split(": calls ")[1] for p in io_problems("dmarc", source)}
    assert called == {"open()", "os.open()", "p.read_text()", "os.fork()", "(...).write_bytes()"}


def test_pure_code_passes() -> None:
    source = "import re\n\ndef f(text: str) -> list[str]:\n    return re.split(',', text.strip())\n"
    assert io_problems("dmarc", source) == []


def _reports_imports(source: str) -> Iterator[str]:
    """Absolute names a module of the reports/ subpackage imports (``.x`` is a sibling, ``..x`` a
    module of authmilter), ``from P import m`` counted as importing P.m too."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parents = [PACKAGE_NAME, "reports"][: max(0, 3 - node.level)] if node.level else []
            origin = ".".join([*parents, node.module] if node.module else parents)
            yield origin
            yield from (f"{origin}.{alias.name}" for alias in node.names)


def test_the_reports_package_imports_only_lower_layers() -> None:
    # reports/ is one layer ("reports" in RANKS): its modules import each other and lower layers only.
    problems = []
    for path in sorted((PACKAGE / "reports").glob("*.py")):
        for name in _reports_imports(path.read_text()):
            parts = name.split(".")
            if parts[0] in CORE_FORBIDDEN:
                problems.append(f"reports/{path.name} imports {parts[0]}")
            if parts[0] != PACKAGE_NAME or len(parts) == 1 or parts[1] == "reports" or parts[1] not in RANKS:
                continue
            if RANKS[parts[1]] >= RANKS["reports"]:
                problems.append(f"reports/{path.name} imports {parts[1]} (layer {RANKS[parts[1]]})")
    assert not problems, "\n".join(problems)


def test_an_upward_import_in_the_reports_package_is_caught() -> None:
    names = set(_reports_imports("from ..config import Config\nfrom .model import ReportData\n"))
    assert {"authmilter.config", "authmilter.reports.model"} <= names
