"""Writing files so that readers never see a partial one, and naming the output's own failures.

``atomic_output(path)`` writes a temporary file next to ``path``, fsyncs it and renames it into
place: a reader sees the old file or the whole new one. When the output itself fails (disk full,
quota, read-only file system, permissions, a file-size limit) the temporary file is removed and an
``OutputError`` names the path and what to do; a rerun then starts from what is complete.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import BinaryIO, Iterator

# errno -> what to do; reading never fails with the first four, so they always mean the output.
_DISK = {errno.ENOSPC: 'free space or write elsewhere, then rerun',
         errno.EDQUOT: 'free quota or write elsewhere, then rerun',
         errno.EROFS: 'the file system is read-only: write elsewhere',
         errno.EFBIG: 'a file-size limit (ulimit -f) or the file system refuses the size'}
_ACCESS = {errno.EACCES: 'fix the permissions or write elsewhere',
           errno.EPERM: 'fix the permissions or write elsewhere'}


class OutputError(OSError):
    """The output could not be written; ``filename`` is the path, ``errno`` the cause."""

    def __str__(self) -> str:
        return f'{self.filename}: {self.strerror}'


def output_error(e: OSError, path: str, what: str, out_dir: str | None = None
                 ) -> OutputError | None:
    """The ``OutputError`` for ``e``, met while writing ``what`` at ``path``, or None when ``e`` is
    not the output's fault (with ``out_dir``, permission errors count only on paths inside it)."""
    if isinstance(e, OutputError):
        return e
    hint = _DISK.get(e.errno)
    if hint is None and e.errno in _ACCESS:
        inside = out_dir is None or (e.filename is not None and os.path.abspath(
            os.fsdecode(e.filename)).startswith(os.path.abspath(out_dir) + os.sep))
        hint = _ACCESS[e.errno] if inside else None
    if hint is None:
        return None
    return OutputError(e.errno, f'cannot write {what}: {os.strerror(e.errno)} ({hint})', path)


def fsync_dir(path: str) -> None:
    """Make renames in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str, what: str = 'file') -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: fsynced and renamed into place when the block
    ends without error, removed otherwise. OS errors of the output raise ``OutputError``."""
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            named = output_error(e, path, what)
            if named is not None and named is not e:
                raise named from e
        raise


def atomic_write(path: str, data: bytes, what: str = 'file') -> None:
    with atomic_output(path, what) as f:
        f.write(data)
