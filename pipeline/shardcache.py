"""A size-bounded LRU cache of verified shards on local disk (``--cache-dir``), safe to share
between the processes of a machine (ranks, DataLoader workers, several runs).

Entries are keyed by content: ``<dir>/<sha256>.tar`` holds bytes whose sha256 was checked against
the manifest before they were added, and ``<dir>/<sha256>.json`` records that check (bytes,
``mtime_ns`` of the verified file, the URL it came from). Reusing an entry re-checks it cheaply:
the file's size and mtime must still be the recorded ones (``rehash=True`` recomputes the sha256
instead), else the entry is ignored and replaced by a fresh download.

Concurrency: a file is written under ``<dir>/.tmp/`` by its fetcher, flushed and fsynced, and only
then renamed to its final name, so no process ever opens a half-written shard. Adding and evicting
hold an exclusive ``flock`` on ``<dir>/.lock``, opening holds it shared: an entry is never removed
between its check and its opening (a reader that has it open keeps reading after an eviction, as
POSIX keeps unlinked open files). The lock is never held during a download. Use a local disk
(``flock`` over NFS is not reliable).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from typing import BinaryIO, Iterator

from pipeline.durable import fsync_dir
from pipeline.remote import FetchCounters

_TMP = '.tmp'


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardCache:
    """Verified shards by sha256 under ``directory``, at most ``max_bytes`` of them in all."""

    def __init__(self, directory: str, max_bytes: int, counters: FetchCounters | None = None,
                 rehash: bool = False):
        if max_bytes <= 0:
            raise ValueError('--cache-gb must be > 0')
        self.directory, self.max_bytes, self.rehash = directory, max_bytes, rehash
        self.counters = counters or FetchCounters()
        os.makedirs(os.path.join(directory, _TMP), exist_ok=True)
        self._lock_path = os.path.join(directory, '.lock')

    def _tar(self, sha256: str) -> str:
        return os.path.join(self.directory, f'{sha256}.tar')

    def _record(self, sha256: str) -> str:
        return os.path.join(self.directory, f'{sha256}.json')

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _valid(self, sha256: str, size: int, count: bool = True) -> bool:
        """The entry exists and still looks as it did when it was verified."""
        try:
            with open(self._record(sha256)) as f:
                rec = json.load(f)
            st = os.stat(self._tar(sha256))
        except (FileNotFoundError, ValueError):
            return False
        if rec.get('sha256') != sha256 or st.st_size != size or rec.get('bytes') != size or \
                st.st_mtime_ns != rec.get('mtime_ns'):
            if count:
                self.counters.add('cache_stale')
            return False
        return True

    def open(self, sha256: str, size: int) -> BinaryIO | None:
        """The cached shard opened for reading, or None (absent, or changed since it was verified)."""
        with self._locked(exclusive=False):
            if not self._valid(sha256, size):
                self.counters.add('cache_misses')
                return None
            f = open(self._tar(sha256), 'rb')
            self._touch(sha256)
        if self.rehash and file_sha256(self._tar(sha256)) != sha256:
            f.close()
            self.counters.add('cache_corrupt')
            self.counters.add('cache_misses')
            return None
        self.counters.add('cache_hits')
        return f

    def _touch(self, sha256: str) -> None:
        """Mark the last use (for LRU) as the record's mtime: the record is not what is verified.
        An explicit clock reading: file systems stamp 'now' only to the kernel tick (~4 ms)."""
        now = time.time_ns()
        with contextlib.suppress(OSError):
            os.utime(self._record(sha256), ns=(now, now))

    def new_file(self) -> tuple[str, BinaryIO]:
        """A temporary file to download into (in the cache's file system, so ``add`` renames it)."""
        path = os.path.join(self.directory, _TMP, f'{os.getpid()}-{uuid.uuid4().hex}.part')
        return path, open(path, 'wb')

    def add(self, tmp_path: str, sha256: str, size: int, url: str = '') -> BinaryIO | None:
        """Move a verified, fsynced temporary file into the cache (evicting least recently used
        entries to stay under the bound) and return the entry opened for reading; None (the file
        stays where it is) for a shard larger than the whole cache."""
        if size > self.max_bytes:
            return None
        with self._locked(exclusive=True):
            if self._valid(sha256, size, count=False):  # another process added it meanwhile
                os.remove(tmp_path)
            else:
                self._evict(size)
                os.replace(tmp_path, self._tar(sha256))
                rec = {'sha256': sha256, 'bytes': size, 'url': url,
                       'mtime_ns': os.stat(self._tar(sha256)).st_mtime_ns}
                tmp_rec = os.path.join(self.directory, _TMP,
                                       f'{os.getpid()}-{uuid.uuid4().hex}.rec')
                with open(tmp_rec, 'w') as f:
                    json.dump(rec, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp_rec, self._record(sha256))
                fsync_dir(self.directory)
            self._touch(sha256)
            return open(self._tar(sha256), 'rb')  # under the lock: no eviction in between

    def entries(self) -> list[tuple[str, int, int]]:
        """(sha256, bytes, last use in ns) of every complete entry."""
        out = []
        for name in os.listdir(self.directory):
            if name.endswith('.json') and len(name) == 69:
                sha = name[:-5]
                try:
                    size = os.stat(self._tar(sha)).st_size
                    used = os.stat(self._record(sha)).st_mtime_ns
                except FileNotFoundError:
                    continue
                out.append((sha, size, used))
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _evict(self, need: int) -> None:
        """Remove leftovers of dead processes, then least recently used entries until ``need``
        more bytes fit under the bound (call with the exclusive lock held)."""
        self._remove_leftovers()
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        for sha, size, _ in entries:
            if total + need <= self.max_bytes:
                break
            for path in (self._record(sha), self._tar(sha)):  # record first: never a bare record
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            total -= size
            self.counters.add('cache_evictions')

    def _remove_leftovers(self) -> None:
        tmp = os.path.join(self.directory, _TMP)
        for name in os.listdir(tmp):
            pid = name.split('-', 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(tmp, name))
        for name in os.listdir(self.directory):
            stem, ext = os.path.splitext(name)
            orphan = (ext == '.tar' and not os.path.exists(self._record(stem))) or \
                (ext == '.json' and not os.path.exists(self._tar(stem)))
            if orphan and len(stem) == 64:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, name))
