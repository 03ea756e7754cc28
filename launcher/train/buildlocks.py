"""No silent wait on a C++ extension build: DeepSpeed builds its ops (on CPU, the shared-memory
op) with torch's cpp_extension, which holds a `lock` file in the op's build folder and makes
every other process wait while it exists, with no timeout. A build killed midway leaves the file
behind, and every later start then waits forever, silently.

A watcher thread in each rank says what it waits for, and removes a lock whose build folder
nothing has changed for STALE_AFTER_S (a live build writes its objects there all along).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

STALE_AFTER_S = 300.0


def extensions_root() -> Path:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, or its default under ~/.cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def use_environment_extension_cache() -> Path:
    """Builds go to a folder of this Python environment (keyed by sys.prefix) under torch's default
    root, unless TORCH_EXTENSIONS_DIR is set: torch's one folder per user is shared by every venv (and
    every node of a shared home), and each venv's build invalidated the other's, making every rank
    wait for a rebuild. Call it before anything builds an op (the worker does, first)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        key = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_root() / f"env-{key}")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def last_change(folder: Path) -> float:
    """The newest modification time of anything in the build folder (the lock included)."""
    times = [folder.stat().st_mtime]
    for path in folder.rglob("*"):
        try:
            times.append(path.stat().st_mtime)
        except FileNotFoundError:
            pass  # removed by the build meanwhile
    return max(times)


def check_build_locks(root: Path, stale_after_s: float = STALE_AFTER_S, told: set[Path] | None = None) -> list[Path]:
    """One look at the build locks under `root`: a stale one is removed (and returned), a live one
    is named once (in `told`)."""
    told = set() if told is None else told
    removed = []
    for lock in sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock")):
        try:
            idle = time.time() - last_change(lock.parent)
        except FileNotFoundError:
            continue  # released meanwhile
        if idle > stale_after_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(f"removed {lock}: left by an extension build that ended without finishing ({idle:.0f} s without change)")
        elif lock not in told:
            told.add(lock)
            print(
                f"waiting for {lock}: another process builds {lock.parent.name}; if none does, it is removed "
                f"{stale_after_s:.0f} s after its last change (or remove it yourself)",
                flush=True,
            )
    return removed


def watch_build_locks(root: Path | None = None, stale_after_s: float = STALE_AFTER_S, every_s: float = 10.0) -> threading.Event:
    """Check the build locks every `every_s` in a daemon thread until the returned event is set."""
    done, told = threading.Event(), set()

    def watch() -> None:
        folder = root or extensions_root()
        while not done.is_set():
            if folder.is_dir():
                check_build_locks(folder, stale_after_s, told)
            done.wait(every_s)

    threading.Thread(target=watch, name="build-lock-watch", daemon=True).start()
    return done
