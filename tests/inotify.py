"""Linux inotify through ctypes: proof, from the kernel, that nobody opened a file.

Used by the tests that swap library files for symlinks to files outside the roots: an `IN_OPEN`
event on the outside file or directory would mean the worker opened it, whatever the job says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

IN_ACCESS = 0x001
IN_OPEN = 0x020
IN_NONBLOCK = os.O_NONBLOCK
_HEADER = struct.Struct("iIII")


class Watch:
    """inotify watches on some paths; `events()` returns (path watched, name, mask) seen so far."""

    def __init__(self, paths: list[Path], mask: int = IN_OPEN | IN_ACCESS) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._fd = libc.inotify_init1(IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._paths: dict[int, Path] = {}
        for path in paths:
            wd = libc.inotify_add_watch(self._fd, os.fsencode(str(path)), mask)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch failed for {path}")
            self._paths[wd] = path

    def events(self) -> list[tuple[Path, str, int]]:
        out: list[tuple[Path, str, int]] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return out
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                raw = data[offset + _HEADER.size : offset + _HEADER.size + length].rstrip(b"\0")
                out.append((self._paths.get(wd, Path("?")), raw.decode(errors="replace"), mask))
                offset += _HEADER.size + length

    def close(self) -> None:
        os.close(self._fd)
