"""Run vLLM's OpenAI server as a child process: start it, wait until it answers, restart it
with backoff when it dies, and stop it (with its whole process group) on shutdown.

vLLM forks an engine-core and worker processes of its own; starting the child in a new
session and signalling the group is what makes sure none of them outlive Loom.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from loom.errors import LoomError
from loom.vllm.launch import VLLMLaunch

log = logging.getLogger("loom.vllm")

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 60.0)
STOP_GRACE_S = 20.0
HEALTHY_RESET_S = 300.0
LOG_TAIL_BYTES = 4000


class Supervisor:
    """One supervised vLLM. ``on_state(state, detail)`` hears "ok", "restarting" and "failed"."""

    def __init__(
        self,
        launch: VLLMLaunch,
        log_path: Path,
        start_timeout_s: float = 600.0,
        on_state: Callable[[str, str | None], None] | None = None,
        on_restarted: Callable[[], None] | None = None,
    ) -> None:
        self.launch, self.log_path, self.start_timeout_s = launch, log_path, start_timeout_s
        self.on_state = on_state or (lambda state, detail: None)
        self.on_restarted = on_restarted or (lambda: None)
        self.url = f"http://{launch.host}:{launch.port}"
        launch.api_key = launch.api_key or secrets.token_urlsafe(24)
        self.auth = {"Authorization": f"Bearer {launch.api_key}"}  # what Loom's clients send vLLM
        self.proc: subprocess.Popen[bytes] | None = None
        self.state = "starting"
        self.restarts = 0  # in all
        self.failures = 0  # in a row: the backoff's step, reset after HEALTHY_RESET_S up
        self.up_since = 0.0
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()  # a spawn and stop() never interleave
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start vLLM and block until it answers /health (or fail with its log's tail)."""
        self._spawn()
        self._wait_ready()
        self.up_since = time.monotonic()
        self._set("ok", None)
        self._watcher = threading.Thread(target=self._watch, name="loom-vllm-watch", daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._spawn_lock, self.log_path.open("ab") as out:  # the child keeps its own descriptor
            if self._stopping.is_set():
                raise LoomError("the server is shutting down; vLLM is not started again")
            out.write(f"\n=== loom: starting vLLM: {self.launch.shell()}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.launch.command(parent_pid=os.getpid()),
                env=self.launch.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() signals vLLM's workers too
            )
        log.info("vLLM starting (pid %d), log: %s", self.proc.pid, self.log_path)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                self._kill_group()
                raise LoomError("the server is shutting down; vLLM's start was abandoned")
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc.returncode if self.proc else None
                raise LoomError(
                    f"vLLM exited during start-up (code {code}); its log ends:\n{self.log_tail()}"
                )
            if self.healthy(timeout=2.0):
                return
            time.sleep(0.5)
        self._kill_group()
        raise LoomError(
            f"vLLM did not answer {self.url}/health within {self.start_timeout_s:.0f} s; its log ends:\n"
            f"{self.log_tail()}"
        )

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def _watch(self) -> None:
        """Restart a vLLM that died, with growing pauses; /health says 503 meanwhile."""
        while not self._stopping.is_set():
            proc = self.proc
            if proc is not None and proc.poll() is None:
                self._stopping.wait(0.5)
                continue
            if self._stopping.is_set():
                return
            code = proc.returncode if proc is not None else None
            if time.monotonic() - self.up_since > HEALTHY_RESET_S:
                self.failures = 0  # a crash after a long healthy run starts the backoff afresh
            pause = BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
            self.failures += 1
            self._set("restarting", f"vLLM exited (code {code}); restarting in {pause:.0f} s")
            log.error(
                "vLLM exited (code %s); restarting in %.0f s. Log tail:\n%s", code, pause, self.log_tail()
            )
            if self._stopping.wait(pause):
                return
            self.restarts += 1
            try:
                self._spawn()
                self._wait_ready()
                self.on_restarted()  # adapters loaded at runtime go back in before traffic
            except Exception as exc:
                self._set("restarting", f"vLLM restart {self.restarts} failed: {exc}")
                continue
            self.up_since = time.monotonic()
            self._set("ok", None)

    def _set(self, state: str, detail: str | None) -> None:
        self.state = state
        self.on_state(state, detail)

    def stop(self) -> None:
        """SIGTERM to vLLM's process group, SIGKILL after a grace period. The watcher is
        stopped first, so no restart can start a vLLM after this looked."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=STOP_GRACE_S + 15)  # a start under way kills its own child
        with self._spawn_lock:
            proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop within %.0f s of SIGTERM; killing it", STOP_GRACE_S)
        self._kill_group()  # whatever of its group is left, even when its server already exited

    def _kill_group(self) -> None:
        """SIGKILL whatever is left in the group (vLLM's engine-core and workers included)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("vLLM (pid %d) survived SIGKILL", self.proc.pid)
        deadline = time.monotonic() + 10  # its engine core and workers die asynchronously
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return "(no log)"


def group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, read from /proc (Linux)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive
