"""Reading shards over the network with bounded retries: ``http(s)://`` URLs (standard library),
``pipe:`` commands and object-store URLs (``s3://``, ``gs://``, through the stores' CLIs).

``open_remote(url, ...)`` returns a binary stream whose bytes are exactly the object's bytes, each
delivered once, however often the transfer had to be restarted underneath: connection errors,
resets, timeouts, HTTP 5xx/429/408 and short reads (fewer bytes than ``Content-Length`` or the
manifest's size) are retried with exponential backoff and jitter. A retry resumes at the byte offset
already delivered with an HTTP ``Range`` request when the server answers ``206`` to it; otherwise
(no range support, ``pipe:`` commands) the transfer restarts from the first byte and the bytes
already delivered are read and dropped. Permanent failures (HTTP 4xx, a command that is not found)
and exhausted retries raise ``ShardFetchError`` naming the URL. Every retry and give-up is logged
(logger ``pipeline.remote``) with the URL and counted in a ``FetchCounters``.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import select
import shlex
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from typing import BinaryIO

log = logging.getLogger('pipeline.remote')

REMOTE_PREFIXES = ('http://', 'https://', 'pipe:', 's3://', 'gs://')
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_LOOPBACK = frozenset({'127.0.0.1', 'localhost', '::1'})


def is_remote(url: str) -> bool:
    """True for the URLs this module reads (anything else is a local path)."""
    return url.startswith(REMOTE_PREFIXES)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # failed attempts in a row without a new byte before giving up (--fetch-retries)
    max_attempts: int = 40  # attempts per shard in all, progress or not (bounds a dribbling server)
    backoff: float = 0.5  # seconds before the first retry; doubles with each failure in a row
    max_backoff: float = 30.0  # cap of one delay, seconds
    jitter: float = 0.5  # this fraction of each delay is drawn at random (ranks do not retry in step)
    timeout: float = 60.0  # seconds a connect or one read may block (--fetch-timeout)

    def __post_init__(self):
        if self.retries < 0:
            raise ValueError('--fetch-retries must be >= 0')
        if self.max_attempts < 1:
            raise ValueError('RetryPolicy.max_attempts must be >= 1')
        if self.backoff < 0 or self.max_backoff < 0 or not 0 <= self.jitter <= 1:
            raise ValueError('RetryPolicy: backoff and max_backoff must be >= 0, jitter in [0, 1]')
        if self.timeout <= 0:
            raise ValueError('--fetch-timeout must be > 0 seconds')

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1-based)."""
        base = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
        return base * (1 - self.jitter * rng.random())


class FetchCounters:
    """Counts of what fetching did, for ``metrics.jsonl``: ``retries`` and ``retries/<reason>``,
    ``resumed`` (Range), ``restarted`` (from byte 0) and ``bytes_skipped``, ``gave_up``,
    ``permanent``, ``checksum_mismatches``, ``cache_hits`` / ``cache_misses`` / ``cache_evictions``,
    ``bytes_fetched``. Thread-safe (the prefetch thread counts too)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def get(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def take(self) -> dict[str, int]:
        """The counts since the previous ``take`` (a DataLoader worker hands them on in a batch)."""
        with self._lock:
            out, self._counts = self._counts, {}
        return out

    def merge(self, counts: dict[str, int]) -> None:
        for k, n in counts.items():
            self.add(k, n)

    def __getstate__(self):
        return {'counts': self.snapshot()}

    def __setstate__(self, state):
        self._lock = threading.Lock()
        self._counts = dict(state['counts'])


class ShardFetchError(OSError):
    """A shard that could not be read: a permanent error or retries exhausted (``reason`` says
    which, e.g. ``'http 404'``, ``'gave up'``, ``'checksum'``). The message names the URL."""

    def __init__(self, url: str, reason: str, detail: str):
        super().__init__(f'{url}: {detail}')
        self.url, self.reason, self.detail = url, reason, detail

    def __reduce__(self):  # picklable from DataLoader workers and converter processes
        return type(self), (self.url, self.reason, self.detail)


class _Transient(Exception):
    """A failure worth retrying; ``reason`` is the counter suffix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _permanent(url: str, reason: str, detail: str, counters: FetchCounters) -> ShardFetchError:
    counters.add('permanent')
    log.error('%s: %s (not retried)', url, detail)
    return ShardFetchError(url, reason, detail)


# ----------------------------------------------------------------------------- transports

class _HttpBody:
    """One HTTP response: its bytes start at object offset ``start``; ``end`` is where they should
    stop (from Content-Length) or None."""

    def __init__(self, resp, start: int, end: int | None):
        self.resp, self.start, self.end = resp, start, end

    def read(self, n: int) -> bytes:
        try:  # read1: what has arrived, so a failure loses no byte already received
            return self.resp.read1(n)
        except (OSError, HTTPException) as e:  # reset, timeout, IncompleteRead of a chunked body
            raise _Transient(_reason_of(e), f'{type(e).__name__}: {e}') from None

    def finish(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.resp.close()
        except (OSError, HTTPException):
            pass


def _reason_of(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return 'timeout'
    if isinstance(e, ConnectionResetError):
        return 'reset'
    if isinstance(e, HTTPException):
        return 'short_read' if type(e).__name__ == 'IncompleteRead' else 'http_protocol'
    return 'connection'


class _Http:
    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self.validator: str | None = None  # ETag / Last-Modified of the first response
        host = urllib.parse.urlsplit(url).hostname or ''
        # Loopback never goes through a proxy (tests, local mirrors), whatever http_proxy says.
        self.opener = (urllib.request.build_opener(urllib.request.ProxyHandler({}))
                       if host in _LOOPBACK else urllib.request.build_opener())

    def open(self, offset: int, counters: FetchCounters) -> _HttpBody:
        req = urllib.request.Request(self.url, headers={'Accept-Encoding': 'identity'})
        if offset:
            req.add_header('Range', f'bytes={offset}-')
            if self.validator:  # a changed object comes back whole (200), never spliced
                req.add_header('If-Range', self.validator)
        try:
            resp = self.opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in RETRY_STATUS:
                raise _Transient(f'http_{e.code}', f'HTTP {e.code} {e.reason}') from None
            raise _permanent(self.url, f'http {e.code}', f'HTTP {e.code} {e.reason}',
                             counters) from None
        except urllib.error.URLError as e:
            reason = e.reason if isinstance(e.reason, BaseException) else e
            raise _Transient(_reason_of(reason), f'cannot connect: {e.reason}') from None
        except (OSError, HTTPException) as e:
            raise _Transient(_reason_of(e), f'{type(e).__name__}: {e}') from None
        validator = resp.headers.get('ETag') or resp.headers.get('Last-Modified')
        if not offset or self.validator is None:  # nothing delivered yet: any version will do
            self.validator = validator
        elif validator and validator != self.validator:
            resp.close()
            raise _permanent(self.url, 'changed', f'the object changed while it was read '
                             f'({self.validator} -> {validator}); restart the shard', counters)
        start = 0
        if resp.status == 206:
            content_range = resp.headers.get('Content-Range', '')
            try:
                start = int(content_range.split()[1].split('-')[0])
            except (IndexError, ValueError):
                resp.close()
                raise _Transient('bad_range', f'unparsable Content-Range {content_range!r}') from None
        length = resp.headers.get('Content-Length')
        end = start + int(length) if length and length.isdigit() else None
        return _HttpBody(resp, start, end)


class _PipeBody:
    """A running command's stdout; ``finish`` checks its exit status."""

    def __init__(self, url: str, command: str, timeout: float, counters: FetchCounters):
        self.url, self.command, self.timeout, self.counters = url, command, timeout, counters
        self.start, self.end = 0, None
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,
                                     stderr=self.stderr, stdin=subprocess.DEVNULL)
        self.fd = self.proc.stdout.fileno()

    def read(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise _Transient('timeout', f'no output for {self.timeout:g} s')
        return os.read(self.fd, n)

    def finish(self) -> None:
        try:
            rc = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            raise _Transient('timeout', f'output ended but the command did not exit within '
                             f'{self.timeout:g} s') from None
        if rc:
            self.stderr.seek(0)
            tail = self.stderr.read()[-500:].decode('utf-8', 'replace').strip()
            detail = f'command exited with status {rc}' + (f': {tail}' if tail else '')
            if rc in (126, 127):  # the shell's 'cannot execute' / 'not found': no retry helps
                raise _permanent(self.url, 'command', detail, self.counters)
            raise _Transient(f'exit_{rc}', detail)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        self.stderr.close()


class _Pipe:
    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self.command = url[len('pipe:'):] if url.startswith('pipe:') else store_command(url)

    def open(self, offset: int, counters: FetchCounters) -> _PipeBody:
        return _PipeBody(self.url, self.command, self.timeout, counters)


def store_command(url: str) -> str:
    """The shell command that writes an object-store URL's bytes to stdout (the stores' own CLIs:
    ``aws`` for s3://, ``gcloud storage`` for gs://)."""
    if url.startswith('s3://'):
        return f'aws s3 cp {shlex.quote(url)} -'
    if url.startswith('gs://'):
        return f'gcloud storage cat {shlex.quote(url)}'
    raise ValueError(f'{url}: not an object-store URL (s3://, gs://)')


# ----------------------------------------------------------------------------- retrying stream

class RetryingReader(io.RawIOBase):
    """The bytes of ``url``, each delivered once; transient failures are retried underneath.

    ``expected_bytes`` (the manifest's size) turns an early end into a retried short read and a
    longer object into an error. Use through ``open_remote`` (which adds a read buffer)."""

    def __init__(self, url: str, policy: RetryPolicy, counters: FetchCounters,
                 expected_bytes: int | None = None):
        super().__init__()
        self.url, self.policy, self.counters = url, policy, counters
        self.expected = expected_bytes
        self.transport = (_Http(url, policy.timeout) if url.startswith(('http://', 'https://'))
                          else _Pipe(url, policy.timeout))
        self.pos = 0  # bytes delivered
        self._body = None
        self._body_pos = 0  # object offset of the body's next byte
        self._attempts = self._in_a_row = 0
        self._fail_pos = -1
        self._rng = random.Random()
        counters.add('opened')

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast('B')
        while True:
            try:
                if self._body is None:
                    self._connect()
                data = self._body.read(len(view))
                if not data:
                    self._check_end()
                    return 0
            except _Transient as e:
                self._retry(e)
                continue
            except ShardFetchError:
                self._close_body()
                raise
            n = len(data)
            if self.expected is not None and self.pos + n > self.expected:
                self._close_body()
                raise _permanent(self.url, 'size', f'longer than the manifest\'s {self.expected} '
                                 'bytes (the shard does not match the manifest)', self.counters)
            view[:n] = data
            self.pos += n
            self._body_pos += n
            self.counters.add('bytes_fetched', n)
            return n

    def start(self) -> None:
        """Connect now (with retries), so that a permanent error shows when the shard is opened."""
        while self._body is None:
            try:
                self._connect()
            except _Transient as e:
                self._retry(e)

    def _connect(self) -> None:
        body = self.transport.open(self.pos, self.counters)
        self._body, self._body_pos = body, body.start
        if self.pos and body.start == self.pos:
            self.counters.add('resumed')
        elif self.pos:
            if body.start != 0:
                raise _Transient('bad_range', f'asked for byte {self.pos}, got {body.start}')
            self.counters.add('restarted')
            while self._body_pos < self.pos:  # drop what the consumer already has
                data = body.read(min(1 << 20, self.pos - self._body_pos))
                if not data:
                    raise _Transient('short_read', f'ended at byte {self._body_pos} while '
                                     f'skipping to {self.pos}')
                self._body_pos += len(data)
                self.counters.add('bytes_skipped', len(data))

    def _check_end(self) -> None:
        self._body.finish()  # a command that failed, even after writing everything, is retried
        end = self._body.end
        if end is not None and self._body_pos < end:
            raise _Transient('short_read', f'body ended at byte {self._body_pos} of {end}')
        if self.expected is not None and self.pos < self.expected:
            raise _Transient('short_read', f'ended at byte {self.pos} of {self.expected}')

    def _close_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def _retry(self, e: _Transient) -> None:
        self._close_body()
        progressed = self.pos > self._fail_pos
        self._in_a_row = 1 if progressed else self._in_a_row + 1
        self._fail_pos = self.pos
        self._attempts += 1
        self.counters.add('retries')
        self.counters.add(f'retries/{e.reason}')
        if self._in_a_row > self.policy.retries or self._attempts >= self.policy.max_attempts:
            self.counters.add('gave_up')
            detail = (f'gave up after {self._attempts} failed attempts (at byte {self.pos}); '
                      f'last: {e}')
            log.error('%s: %s', self.url, detail)
            raise ShardFetchError(self.url, 'gave up', detail) from None
        wait = self.policy.delay(self._in_a_row, self._rng)
        log.warning('%s: %s at byte %d; retry %d in %.2f s', self.url, e, self.pos,
                    self._attempts, wait)
        time.sleep(wait)

    def close(self) -> None:
        self._close_body()
        super().close()


def open_remote(url: str, policy: RetryPolicy | None = None, counters: FetchCounters | None = None,
                expected_bytes: int | None = None, buffer_size: int = 1 << 20) -> BinaryIO:
    """A buffered binary stream of a remote shard's bytes (see the module docstring); nothing is
    verified here (``pipeline.fetch`` checks sha256 before parsing)."""
    if not is_remote(url):
        raise ValueError(f'{url}: not a remote URL ({", ".join(REMOTE_PREFIXES)})')
    raw = RetryingReader(url, policy or RetryPolicy(), counters or FetchCounters(), expected_bytes)
    raw.start()
    return io.BufferedReader(raw, buffer_size)
