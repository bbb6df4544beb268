"""A publishing process for crash and concurrency tests.

usage: python publisher.py ROOT NAME VERSION|auto SIZE_MB NFILES [GO_FILE]
Prints "ready" once imported, then {"version", "sha"} on success; exit 3 when the version already exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from loom.errors import VersionExistsError
from loom.store import Store
from loom.store.manifest import Source


def main() -> int:
    root, name, version, size_mb, nfiles = sys.argv[1:6]
    go = sys.argv[6] if len(sys.argv) > 6 else None
    print("ready", flush=True)  # imports done: the crash test times its kills from here
    while go and not os.path.exists(go):
        time.sleep(0.005)
    seed = f"{os.getpid()}-{time.time_ns()}".encode()
    chunk = int(float(size_mb) * 2**20) // int(nfiles)
    digest = hashlib.sha256()

    def fill(folder: Path) -> None:
        for i in range(int(nfiles)):
            data = hashlib.sha256(seed + bytes([i])).digest() * (chunk // 32)
            digest.update(data)
            (folder / f"part-{i:02d}.bin.txt").write_bytes(data)

    try:
        m = Store(root).publish(
            "dataset",
            name,
            fill=fill,
            source=Source(type="local", uri="test"),
            version=None if version == "auto" else version,
        )
    except VersionExistsError as exc:
        print(json.dumps({"error": str(exc)}))
        return 3
    print(json.dumps({"version": m.version, "sha": digest.hexdigest()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
