"""Puts the integration harness on ``sys.path``: the benchmark reuses its classes instead of copying them.

tests/ holds dnsserver.py and signing.py; tests/integration/ holds postfix.py and sink.py (which import
``signing`` and ``sink`` by bare name, so both folders are needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
TESTS = REPO / "tests"
INTEGRATION = TESTS / "integration"

for folder in (TESTS, INTEGRATION):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
