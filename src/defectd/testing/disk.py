"""``FullDisk``: fills the file system under a path and keeps it full until stopped.

A thread writes one file in 4 KiB blocks; once the disk is full it keeps trying, so every byte
the code under test frees is taken again at once. Use it on a small tmpfs of its own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


class FullDisk:
    """Writes ``path`` until the disk is full and keeps it full from ``start()`` to ``stop()``.

    ``stop()`` ends the writer (waiting ``timeout`` seconds at most) and deletes the file, which
    frees the space; it is idempotent. The owner stops it.
    """

    def __init__(self, path: Path, *, retry_s: float = 0.005, name: str = "filler") -> None:
        self.path = path
        self._retry_s = retry_s
        self._filling = threading.Event()
        self._thread = threading.Thread(target=self._fill, name=name, daemon=True)

    def start(self) -> None:
        self._filling.set()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._filling.clear()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.path.unlink(missing_ok=True)

    def _fill(self) -> None:
        with open(self.path, "wb", buffering=0) as fh:
            while self._filling.is_set():
                try:
                    fh.write(bytes(4096))
                except OSError:
                    time.sleep(self._retry_s)
