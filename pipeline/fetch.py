"""Opening a shard for parsing: the one seam between the streams and wherever shards live.

    fetcher = ShardFetcher(FetchOptions(cache_dir='/scratch/shards', retry=RetryPolicy(retries=8)))
    with fetcher.open(url, entry) as f:      # entry: the shard's manifest entry (sha256, bytes) or None
        for name, data, _ in tario.iter_members(f, url): ...
    fetcher.prefetch(next_url, next_entry)   # download the next shard in a background thread
    counts = fetcher.counters.take()         # retries, give-ups, cache hits... for metrics.jsonl

Local paths are opened directly, as fast as before (the converter renames only complete shards into
place; ``pipeline.verify`` checks their sha256 on demand). A remote shard whose sha256 is known is
downloaded completely, with retries (``pipeline.remote``), into the verified cache
(``pipeline.shardcache``) or a temporary file that is deleted as soon as it is opened, and its
sha256 is compared with the manifest's before the parser sees a single byte: a stream never yields
a sample of a corrupt shard. A remote shard without a known sha256 is streamed with retries,
unverified. What a stream does with a shard that cannot be read is ``ShardFaults``' business.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import tempfile
from typing import Any, BinaryIO, Mapping

from pipeline.remote import (FetchCounters, RetryPolicy, ShardFetchError, is_remote,
                             open_remote)
from pipeline.shardcache import ShardCache

log = logging.getLogger('pipeline.fetch')


class ShardChecksumError(ShardFetchError):
    """A downloaded shard whose sha256 is not the manifest's (it is never cached or parsed)."""


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    cache_dir: str | None = None  # --cache-dir: keep verified shards here (LRU); None: temp files
    cache_bytes: int = 100 * 2**30  # --cache-gb: bound of the cache's shard bytes
    tmp_dir: str | None = None  # where uncached shards are verified (default: the system's temp)
    retry: RetryPolicy = RetryPolicy()  # retries and timeouts of remote reads
    verify: bool = True  # verify remote shards whose sha256 is known before parsing them
    rehash_cached: bool = False  # recompute a cached shard's sha256 on reuse (else size + mtime)
    checksum_retries: int = 1  # downloads again after a sha256 mismatch before giving up
    prefetch: int = 1  # shards downloaded ahead in a background thread (0: none)

    def __post_init__(self):
        if self.cache_bytes <= 0:
            raise ValueError('--cache-gb must be > 0')
        if self.checksum_retries < 0 or self.prefetch < 0:
            raise ValueError('FetchOptions: checksum_retries and prefetch must be >= 0')


def _verifiable(entry: Mapping[str, Any] | None) -> bool:
    return bool(entry) and bool(entry.get('sha256')) and entry.get('bytes') is not None


class ShardFetcher:
    """Opens shards for a stream (see the module docstring). Picklable: a DataLoader worker gets
    the options and fresh counters, and starts its own prefetch thread on first use."""

    def __init__(self, options: FetchOptions | None = None, counters: FetchCounters | None = None):
        self.options = options or FetchOptions()
        self.counters = counters or FetchCounters()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: dict[str, cf.Future] = {}
        self._shard_cache: ShardCache | None = None

    def __getstate__(self):
        return {'options': self.options}

    def __setstate__(self, state):
        self.__init__(state['options'])

    def _forked(self) -> None:
        if self._pid != os.getpid():  # a forked child must not touch the parent's thread pool
            self._reset()

    def cache(self) -> ShardCache | None:
        if self.options.cache_dir and self._shard_cache is None:
            self._shard_cache = ShardCache(self.options.cache_dir, self.options.cache_bytes,
                                           self.counters, self.options.rehash_cached)
        return self._shard_cache

    def open(self, url: str, entry: Mapping[str, Any] | None = None) -> BinaryIO:
        """A binary stream of the shard at ``url`` (local path, http(s)://, pipe:, s3://, gs://);
        ``entry`` is its manifest entry. Raises ShardFetchError (``ShardChecksumError`` for a
        sha256 mismatch) naming the URL when the shard cannot be had."""
        self._forked()
        if not is_remote(url):
            return open(url, 'rb')
        future = self._pending.pop(url, None)
        if future is not None:
            return future.result()
        if self.options.verify and _verifiable(entry):
            return self._fetch_verified(url, entry)
        return open_remote(url, self.options.retry, self.counters,
                           int(entry['bytes']) if entry and entry.get('bytes') else None)

    def prefetch(self, url: str, entry: Mapping[str, Any] | None = None) -> None:
        """Start downloading and verifying a remote shard that ``open`` will be asked for next
        (no-op for local paths, unverifiable shards, or when ``options.prefetch`` are in flight)."""
        self._forked()
        if not (is_remote(url) and self.options.verify and _verifiable(entry)) or \
                url in self._pending or len(self._pending) >= self.options.prefetch:
            return
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix='shard-prefetch')
        self._pending[url] = self._pool.submit(self._fetch_verified, url, dict(entry))

    def close(self) -> None:
        """Drop prefetched shards nobody asked for (their temporary files go with them)."""
        if self._pid != os.getpid():
            return
        for future in self._pending.values():
            future.cancel()
            future.add_done_callback(_close_result)
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> 'ShardFetcher':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- verified download

    def _fetch_verified(self, url: str, entry: Mapping[str, Any]) -> BinaryIO:
        sha, size = str(entry['sha256']), int(entry['bytes'])
        cache = self.cache()
        if cache is not None:
            cached = cache.open(sha, size)
            if cached is not None:
                return cached
        for attempt in range(self.options.checksum_retries + 1):
            path, out = cache.new_file() if cache is not None else self._temp_file()
            try:
                with out:
                    digest = self._download(url, out, size)
                    if cache is not None:  # other processes will trust it after the rename
                        out.flush()
                        os.fsync(out.fileno())
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                raise
            if digest == sha:
                break
            os.remove(path)
            self.counters.add('checksum_mismatches')
            log.warning('%s: sha256 %s is not the manifest\'s %s (download %d of %d)', url,
                        digest, sha, attempt + 1, self.options.checksum_retries + 1)
        else:
            self.counters.add('gave_up')
            raise ShardChecksumError(url, 'checksum', f'sha256 {digest} != manifest {sha} in '
                                     f'{self.options.checksum_retries + 1} downloads (the copy '
                                     'there is corrupt or not the one the manifest describes)')
        if cache is not None:
            cached = cache.add(path, sha, size, url)
            if cached is not None:
                return cached
        f = open(path, 'rb')
        os.remove(path)  # the open file stays readable; nothing is left behind
        return f

    def _temp_file(self) -> tuple[str, BinaryIO]:
        fd, path = tempfile.mkstemp(prefix='shard-', suffix='.part', dir=self.options.tmp_dir)
        return path, os.fdopen(fd, 'wb')

    def _download(self, url: str, out: BinaryIO, size: int) -> str:
        h = hashlib.sha256()
        with open_remote(url, self.options.retry, self.counters, size) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        return h.hexdigest()


def _close_result(future: cf.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def open_shard(url: str, entry: Mapping[str, Any] | None = None,
               options: FetchOptions | None = None,
               counters: FetchCounters | None = None) -> BinaryIO:
    """One shard opened as ``ShardFetcher(options, counters).open(url, entry)`` (no prefetch)."""
    return ShardFetcher(options, counters).open(url, entry)


class ShardFaults:
    """The policy for shards that cannot be read, as a webdataset-style handler
    (``handler(exn) -> True`` to go on). ``'skip'`` (training): log it, count it and list it with
    its reason and scene count (``failed``; ``take()`` hands on the new ones), then go on.
    ``'stop'`` (evaluation): count it and raise the error, which names the shard."""

    def __init__(self, mode: str = 'skip', counters: FetchCounters | None = None):
        if mode not in ('skip', 'stop'):
            raise ValueError(f'ShardFaults mode {mode!r}: use skip or stop')
        self.mode, self.counters = mode, counters or FetchCounters()
        self.failed: dict[str, dict[str, Any]] = {}
        self._new: list[dict[str, Any]] = []

    def __call__(self, exn: BaseException, url: str | None = None,
                 entry: Mapping[str, Any] | None = None) -> bool:
        url = url or getattr(exn, 'url', None) or '?'
        reason = getattr(exn, 'reason', None) or type(exn).__name__
        self.counters.add('shards_failed')
        if self.mode == 'stop':
            raise exn
        record = {'url': url, 'reason': reason, 'error': str(exn),
                  'scenes': entry.get('scenes') if entry else None}
        known = self.failed.get(url)
        record['times'] = (known['times'] + 1) if known else 1
        self.failed[url] = record
        self._new.append(record)
        print(f'warning: skipping shard {url} ({reason}): {exn}', file=sys.stderr)
        return True

    def take(self) -> list[dict[str, Any]]:
        out, self._new = self._new, []
        return out
