"""What every trainer-state file shares: the format name and the crash-safe write (`.pt` and portable checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Callable

FORMAT = "simvq-codec-train/1"


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write `path` through `write(file)` under a temporary name, fsynced, then renamed over it (and the folder
    fsynced): a crash at any moment leaves the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
