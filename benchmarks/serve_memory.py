"""Peak RSS of a ``loom serve`` start, by phase, against the memory plan it printed.

    LOOM_STORE=/work/store7b python benchmarks/serve_memory.py --base mistral-7b-random \\
        -- --dtype int8 --allow-lossy --memory-mb 16000 --max-batch-size 4

Starts the server (the arguments after ``--`` go to ``loom serve``), polls its
/proc/PID/status every 0.1 s and reports, for each phase, the highest RSS seen (anonymous
and file-backed apart: pages of a memory-mapped file count in RSS while mapped) and the
kernel's own high-water mark (VmHWM) at the phase's end:

  load     from the start until /health answers (weights read, engine built, caches made)
  request  one completion (``--max-tokens`` tokens)
  steady   ``--steady-s`` seconds idle afterwards

The plan's total comes from the server's /info. Polling can miss a spike shorter than the
interval; VmHWM cannot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loom.serve.server import free_port, wait_healthy

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def proc_status(pid: int) -> dict[str, int]:
    """The RSS fields of /proc/PID/status, in MiB (empty once the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":")[0]
                if key in FIELDS:
                    out[key] = int(line.split()[1]) // 1024
    except OSError:
        pass
    return out


@dataclass
class Poller:
    """Samples a process's RSS until stopped; ``mark(phase)`` starts a new phase."""

    pid: int
    interval_s: float = 0.1
    phase: str = "load"
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    hwm_at_end: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def _sample(self) -> None:
        status = proc_status(self.pid)
        peak = self.peaks.setdefault(self.phase, {})
        for key in ("VmRSS", "RssAnon", "RssFile"):
            peak[key] = max(peak.get(key, 0), status.get(key, 0))

    def mark(self, phase: str) -> None:
        self._sample()
        self.hwm_at_end[self.phase] = proc_status(self.pid).get("VmHWM", 0)
        self.phase = phase

    def stop(self) -> None:
        self._stop.set()


def measure(base: str, serve_args: list[str], max_tokens: int, steady_s: float) -> dict[str, Any]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loom", "serve", "--base", base, "--port", str(port)]
    server = subprocess.Popen([*cmd, "--log-level", "warning", *serve_args])
    poller = Poller(server.pid)
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    started = time.perf_counter()
    result: dict[str, Any] = {}
    try:
        wait_healthy(url, timeout=900)
        result["load_s"] = round(time.perf_counter() - started, 1)
        plan = httpx.get(f"{url}/info").json()["plan"]
        result |= {k: plan[k] for k in ("total_mb", "budget_mb", "weights_mb", "kv_cache_mb")}
        poller.mark("request")
        body = {"model": base, "prompt": "Hello, my name is", "max_tokens": max_tokens}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
        result["answer"] = answer["choices"][0]["text"]
        poller.mark("steady")
        time.sleep(steady_s)
        poller.mark("end")
    except httpx.HTTPError as exc:  # e.g. the server died: report what was measured up to then
        result["error"] = f"{type(exc).__name__}: {exc} (server exit code {server.poll()})"
        poller.mark("end")
    finally:
        poller.stop()
        server.terminate()
        server.wait(timeout=120)
    return result | {"peaks_mb": poller.peaks, "vm_hwm_mb": poller.hwm_at_end}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--steady-s", type=float, default=3.0)
    ap.add_argument("serve_args", nargs="*", help="after --: arguments for loom serve")
    args = ap.parse_args()
    result = measure(args.base, args.serve_args, args.max_tokens, args.steady_s)
    print(json.dumps(result, indent=2))
    peak = max(result["vm_hwm_mb"].values(), default=0)
    total = result.get("total_mb")
    if total is not None:
        verdict = "within" if peak <= total else f"over by {peak - total} MiB"
        print(f"peak RSS (VmHWM) {peak} MiB vs plan {total} MiB of {result['budget_mb']}: {verdict}")
    if "error" in result:
        sys.exit(f"failed: {result['error']}")


if __name__ == "__main__":
    main()
