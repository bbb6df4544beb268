"""Bring up ``loom serve`` on the store's default base with the ``intent`` agent (the
``snips-intent`` adapter), show it answering through ``POST /v1/agents/intent/run`` and requests
through the OpenAI-compatible API, then stop the server gracefully.

    python scripts/serve_demo.py [--adapter snips-intent] [--agents MAP] [--keep-serving]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loom.serve.server import free_port, wait_healthy

AGENT_MAP = Path(__file__).resolve().parents[1] / "examples" / "snips_intent" / "AGENT_MODEL_MAP.json"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", default="snips-intent")
    parser.add_argument("--agents", type=Path, default=AGENT_MAP, help="Agent map served at /v1/agents.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--keep-serving", action="store_true", help="Leave the server running (Ctrl-C stops)."
    )
    args = parser.parse_args()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    loom = [sys.executable, "-m", "loom"]  # the venv's loom, activated or not
    cmd = [
        *loom,
        "serve",
        "--port",
        str(port),
        "--preload",
        args.adapter,
        "--agents",
        str(args.agents),
        "--max-batch-size",
        "8",
        "--max-seq-len",
        "512",
        "--log-level",
        "warning",
    ]
    print("$ loom", " ".join(cmd[3:]), flush=True)
    server = subprocess.Popen(cmd)
    try:
        started = time.monotonic()
        wait_healthy(url, timeout=300)
        print(f"healthy after {time.monotonic() - started:.1f} s: {url}", flush=True)
        with httpx.Client(base_url=url, timeout=120) as http:
            models = [m["id"] for m in http.get("/v1/models").json()["data"]]
            for text in ("play the new Daft Punk album", "will it snow in Denver tomorrow?"):
                r = http.post("/v1/agents/intent/run", json={"input": {"text": text}})
                r.raise_for_status()
                result = r.json()
                print(f"POST /v1/agents/intent/run {json.dumps({'input': {'text': text}})}")
                print(
                    f"  output: {json.dumps(result['output'])}  model_version: {result['model_version']}  "
                    f"answered by step {result['fallback']['step']} ({result['fallback']['kind']})"
                )
            print("models:", ", ".join(models[:8]) + (" ..." if len(models) > 8 else ""))
            system = {"role": "system", "content": "You label voice-assistant requests."}
            for model, messages in (  # the adapter was trained on this system prompt and "Intent of: ..."
                (
                    args.adapter,
                    [system, {"role": "user", "content": "Intent of: play the new Daft Punk album"}],
                ),
                (
                    args.adapter,
                    [system, {"role": "user", "content": "Intent of: will it snow in Denver tomorrow?"}],
                ),
                (models[0], [{"role": "user", "content": "What is the capital of France?"}]),
            ):
                text = messages[-1]["content"]
                body = {"model": model, "messages": messages, "max_tokens": 24, "temperature": 0}
                r = http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                answer = r.json()
                print(f"POST /v1/chat/completions model={model!r} ({answer['system_fingerprint']})")
                print(f"  user: {text}\n  assistant: {answer['choices'][0]['message']['content']!r}")
        if args.keep_serving:
            print(f"serving on {url} (Ctrl-C to stop)", flush=True)
            server.wait()
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)  # graceful: uvicorn drains, then the engine stops
            try:
                server.wait(timeout=40)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
