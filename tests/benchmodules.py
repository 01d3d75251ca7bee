"""The benchmark's modules (bench/*.py), loaded for its tests under names of their own.

bench/ is not a package, and its modules import each other by bare name (``import _paths``), so a
test loads one as ``bench_<name>`` with bench/ on ``sys.path`` only while it loads: no test meets
bench's modules by their bare names.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench_module(name: str) -> ModuleType:
    """bench/``name``.py as the module ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module
