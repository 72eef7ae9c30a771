"""Opening the files a boot reads (guests, initrds, modules, firmware): regular files only.

A FIFO would block the open (and then every read) past any --timeout, and /dev/zero or a
character device never ends: both are refused by what the file is before a byte is read,
and every read is bounded by what could fit where it goes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from pyvmm.errors import GuestImageError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_regular(path: str | Path, what: str, missing_hint: str = "") -> BinaryIO:
    """Open path for reading if it is a regular file; else a GuestImageError naming it.

    what names the file's role in the message ("guest image", "initrd"); the open never
    blocks (O_NONBLOCK, which a regular file's reads ignore).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GuestImageError(f"{what} {path} not found{missing_hint}: check the path") from None
    except IsADirectoryError:
        raise GuestImageError(f"{what} {path} is a directory: give a file") from None
    except OSError as error:
        raise GuestImageError(f"cannot read {what} {path}: {error.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise GuestImageError(f"{what} {path} is {kind}, not a regular file: give a file")
        os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | Path, what: str, limit: int, room: str, missing_hint: str = ""
) -> bytes:
    """The contents of the regular file path, refused if larger than limit bytes.

    room says where limit comes from, for the message ("RAM below the 3 GiB hole (64 MiB)").
    """
    with open_regular(path, what, missing_hint) as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise GuestImageError(
                f"{what} {path} is {size} bytes: more than fits in {room}: raise --memory or "
                "give a smaller file"
            )
        try:
            data = file.read(limit + 1)
        except OSError as error:
            raise GuestImageError(f"cannot read {what} {path}: {error.strerror}") from None
    if len(data) > limit:  # the file grew while it was read
        raise GuestImageError(f"{what} {path} changed while it was read: try again")
    return data
