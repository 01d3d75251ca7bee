"""Stopping the servers the tests and the benchmark start (Knot, Postfix's helpers, milters)."""

from __future__ import annotations

import signal
import subprocess


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaps. No-op if it has exited."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
