"""The stop and ``with`` protocol of the child processes the tests start (the app server, Orthanc)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

import requests


class ChildProcess:
    """A child process with its log file: ``with`` calls :meth:`start`, then :meth:`stop`.

    Subclasses start ``self.process`` (``subprocess.Popen``) writing to ``self._log_file`` (at ``self.log``).
    """

    process: subprocess.Popen | None = None
    log: Path
    #: seconds :meth:`wait_ready` waits for the process to answer
    start_timeout: float = 60.0
    #: seconds a terminated process may take before it is killed
    stop_timeout: float = 20.0

    def start(self):
        raise NotImplementedError

    def wait_ready(self, name: str, answers: Callable[[], bool], interval: float) -> float:
        """Ask ``answers()`` every ``interval`` s until it is true (a refused connection counts as not yet);
        returns the seconds it took.

        Raises:
            RuntimeError: with the end of the log, when the process exits first or :attr:`start_timeout` passes.
        """
        start = time.monotonic()
        while time.monotonic() - start < self.start_timeout:
            if self.process.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"{name} exited with {self.process.returncode}:\n{self.log.read_text(errors='replace')[-4000:]}")
            try:
                if answers():
                    return time.monotonic() - start
            except requests.ConnectionError:
                pass
            time.sleep(interval)
        raise RuntimeError(f"{name} not ready in {self.start_timeout} s:\n{self.log.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        """Terminate the process (kill it after :attr:`stop_timeout` s) and close its log; ``process``
        keeps the finished ``Popen`` (its ``returncode``)."""
        if self.process is None or self._log_file.closed:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
