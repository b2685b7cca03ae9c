"""Ingestion and scoring as child processes: each in its own process group, its output in a log.

A process group of its own lets the runner stop a kit program together with whatever it started
(data-loader workers, ...) without touching the runner. The exit status is collected as soon as a
program ends, because the kit's scoring checks that a killed ingestion is gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


class KitProcess:
    """One kit program: started at construction, its combined stdout/stderr copied into `log_path`
    (and echoed to stderr as `[name] line` when `echo`)."""

    def __init__(self, name: str, cmd: list[str], env: dict, cwd: str, log_path: str, echo: bool):
        self.name = name
        self.log = open(log_path, "w", buffering=1)
        self.log.write("# %s\n" % " ".join(cmd))
        # start_new_session: the program leads a new process group, whose id is its pid.
        self.p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.pgid = self.p.pid
        self.echo = echo
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()
        # Reap promptly: the kit's scoring checks that a killed ingestion is gone.
        self.waiter = threading.Thread(target=self.p.wait, daemon=True)
        self.waiter.start()

    def _pump(self) -> None:
        for raw in iter(self.p.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.log.write(line)
            if self.echo:
                sys.stderr.write("[%s] %s" % (self.name, line))
        self.p.stdout.close()

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, up to `grace` seconds to exit, then SIGKILL for the whole group (leftover children)."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            deadline = time.time() + grace
            while self.alive() and time.time() < deadline:
                time.sleep(0.1)
        self.signal_group(signal.SIGKILL)
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.reader.join(timeout=5)
        self.log.close()
