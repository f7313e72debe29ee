"""Remote shards under injected faults (loopback HTTP server, pipe: commands): every byte of a shard
arrives exactly once or the shard fails with a named error; counts of what was retried; the
verified cache; the policy for unreadable shards. Nothing here connects outside 127.0.0.1."""
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pipeline import schema, tario
from pipeline.fetch import (FetchOptions, ShardChecksumError, ShardFaults, ShardFetcher,
                            open_shard)
from pipeline.remote import FetchCounters, RetryPolicy, ShardFetchError, store_command
from tests.conftest import ROOT
from tests.faulty_http import FaultyServer

FAST = RetryPolicy(retries=3, backoff=0.001, max_backoff=0.005, timeout=2.0)
SAMPLES, MEMBER_BYTES = 6, 3000  # a shard of ~37 KB: faults land mid-shard, mid-sample


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)


def make_shards(count: int = 3) -> tuple[dict[str, bytes], dict[str, dict]]:
    """Tiny shards written with the project's tar writer, and their manifest entries."""
    rng = np.random.default_rng(0)
    files, entries = {}, {}
    for s in range(count):
        members = []
        for i in range(SAMPLES):
            key = f'scene_{s}_{i}'
            members.append((f'{key}.{schema.META}', b'{"num_views": 1}'))
            members.append((f'{key}.{schema.rgb_member(0)}', rng.bytes(MEMBER_BYTES)))
        data = tario.encode_members(members) + tario.END_OF_ARCHIVE
        name = f'train-{s:06d}.tar'
        files[name] = data
        entries[name] = {'name': name, 'scenes': SAMPLES, 'bytes': len(data),
                         'sha256': hashlib.sha256(data).hexdigest()}
    return files, entries


FILES, ENTRIES = make_shards()
NAMES = sorted(FILES)


def members(stream, url='shard') -> list[tuple[str, bytes]]:
    with stream:
        return [(name, data) for name, data, _ in tario.iter_members(stream, url)]


def expected(name: str) -> list[tuple[str, bytes]]:
    return [(n, d) for n, d in tario.iter_members_bytes(FILES[name])]


def fetcher(tmp_path, cache=False, **kw) -> ShardFetcher:
    tmp = tmp_path / 'tmp'
    tmp.mkdir(exist_ok=True)
    opts = dict(retry=FAST, tmp_dir=str(tmp), cache_dir=str(tmp_path / 'cache') if cache else None)
    opts.update(kw)
    return ShardFetcher(FetchOptions(**opts))


# ----------------------------------------------------------------------------- HTTP faults

@pytest.mark.parametrize('verified', [True, False], ids=['verified', 'streamed'])
def test_reset_mid_shard_resumes_at_the_byte_reached(tmp_path, verified):
    name = NAMES[0]
    with FaultyServer(FILES) as srv:
        srv.faults[name] = [('reset', 10_000)]
        f = fetcher(tmp_path)
        got = members(f.open(srv.url(name), ENTRIES[name] if verified else None))
        assert got == expected(name)
        c = f.counters.snapshot()
        assert c['retries'] == c['retries/reset'] == 1 and 'gave_up' not in c
        assert srv.count(name) == 2
        resumed_at = srv.requests[1][1]  # the bytes before a reset may be lost in the client's buffer
        assert resumed_at is None or 0 < resumed_at <= 10_000
        assert c.get('resumed', 0) == (resumed_at is not None)
        assert c['bytes_fetched'] == len(FILES[name])  # every byte delivered once
    assert os.listdir(tmp_path / 'tmp') == []


def test_truncated_body_is_a_short_read_resumed_with_range(tmp_path):
    name = NAMES[1]
    with FaultyServer(FILES) as srv:
        srv.faults[name] = [('truncate', 12_345)]
        f = fetcher(tmp_path)
        assert members(f.open(srv.url(name), ENTRIES[name])) == expected(name)
        assert [r[1] for r in srv.requests] == [None, 12_345]
        c = f.counters.snapshot()
        assert c['retries/short_read'] == 1 and c['resumed'] == 1 and c['retries'] == 1


def test_object_replaced_while_read_is_an_error_not_a_splice(tmp_path):
    name = NAMES[0]
    with FaultyServer(FILES) as srv:
        srv.faults[name] = [('truncate', 5000)]
        srv.etags = ['"v1"', '"v2"']
        with pytest.raises(ShardFetchError, match='changed while it was read') as e:
            members(fetcher(tmp_path).open(srv.url(name), None))
        assert e.value.reason == 'changed'


def test_server_errors_then_success(tmp_path):
    name = NAMES[0]
    with FaultyServer(FILES) as srv:
        srv.faults[name] = [('status', 500), ('status', 503)]
        f = fetcher(tmp_path)
        assert members(f.open(srv.url(name), ENTRIES[name])) == expected(name)
        c = f.counters.snapshot()
        assert (c['retries'], c['retries/http_500'], c['retries/http_503']) == (2, 1, 1)
        assert srv.count(name) == 3


def test_not_found_is_permanent_and_named(tmp_path):
    with FaultyServer(FILES) as srv:
        url = srv.url('train-000099.tar')
        counters = FetchCounters()
        with pytest.raises(ShardFetchError, match='train-000099.tar: HTTP 404') as e:
            open_shard(url, None, FetchOptions(retry=FAST), counters)
        assert e.value.reason == 'http 404' and e.value.url == url
        assert srv.count('train-000099.tar') == 1  # not retried
        assert counters.snapshot() == {'opened': 1, 'permanent': 1}


def test_persistent_server_errors_give_up_after_the_bounded_retries(tmp_path):
    name = NAMES[0]
    with FaultyServer(FILES) as srv:
        srv.faults[name] = [('status', 503)] * 20
        f = fetcher(tmp_path)
        t0 = time.monotonic()
        with pytest.raises(ShardFetchError, match='gave up after 4 failed attempts') as e:
            f.open(srv.url(name), ENTRIES[name])
        assert e.value.reason == 'gave up' and name in str(e.value)
        assert srv.count(name) == FAST.retries + 1 and time.monotonic() - t0 < 2
        c = f.counters.snapshot()
        assert c['gave_up'] == 1 and c['retries/http_503'] == 4
    assert os.listdir(tmp_path / 'tmp') == []  # the partial download is gone


@pytest.mark.parametrize('fault,resume', [(('stall', 5.0, 4096), 4096), (('late', 5.0), None)],
                         ids=['mid-body', 'before-headers'])
def test_slow_response_times_out_and_is_retried(tmp_path, fault, resume):
    name = NAMES[2]
    with FaultyServer(FILES) as srv:
        srv.faults[name] = [fault]
        f = fetcher(tmp_path, retry=RetryPolicy(retries=2, backoff=0.001, timeout=0.3))
        t0 = time.monotonic()
        assert members(f.open(srv.url(name), ENTRIES[name])) == expected(name)
        assert time.monotonic() - t0 < 3
        assert f.counters.get('retries/timeout') == 1 and f.counters.get('retries') == 1
        assert srv.requests[1][1] == resume


def test_server_without_ranges_restarts_and_skips_what_was_delivered(tmp_path):
    name = NAMES[1]
    with FaultyServer(FILES, ranges=False) as srv:
        srv.faults[name] = [('truncate', 20_000), ('reset', 25_000)]
        f = fetcher(tmp_path)
        assert members(f.open(srv.url(name), None)) == expected(name)  # streamed: nothing repeated
        c = f.counters.snapshot()
        assert c['restarted'] == 2 and c['retries'] == 2 and 'resumed' not in c
        assert 20_000 <= c['bytes_skipped'] <= 20_000 + 25_000
        assert c['bytes_fetched'] == len(FILES[name])


def test_flipped_byte_is_never_parsed_nor_cached_and_the_shard_is_reported(tmp_path):
    with FaultyServer(FILES) as srv:
        srv.flip.add((NAMES[1], 777))
        f = fetcher(tmp_path, cache=True)
        faults = ShardFaults('skip', f.counters)
        got = {}
        for name in NAMES:
            try:
                got[name] = members(f.open(srv.url(name), ENTRIES[name]))
            except ShardChecksumError as e:
                faults(e, entry=ENTRIES[name])
        assert got == {n: expected(n) for n in (NAMES[0], NAMES[2])}
        [record] = faults.failed.values()
        assert (record['url'], record['reason'], record['scenes']) == (srv.url(NAMES[1]),
                                                                      'checksum', SAMPLES)
        c = f.counters.snapshot()
        assert c['checksum_mismatches'] == 2 and srv.count(NAMES[1]) == 2  # one more download
        cached = sorted(p for p in os.listdir(tmp_path / 'cache') if p.endswith('.tar'))
        assert cached == sorted(f'{ENTRIES[n]["sha256"]}.tar' for n in (NAMES[0], NAMES[2]))
        assert os.listdir(tmp_path / 'cache' / '.tmp') == []
        with pytest.raises(ShardChecksumError, match=NAMES[1]):  # evaluation: stop, naming it
            try:
                f.open(srv.url(NAMES[1]), ENTRIES[NAMES[1]])
            except ShardChecksumError as e:
                ShardFaults('stop')(e)


def test_skip_policy_lists_the_missing_shard_and_reads_the_rest(tmp_path):
    with FaultyServer(FILES) as srv:
        del srv.files[NAMES[0]]
        f = fetcher(tmp_path)
        faults, read = ShardFaults('skip', f.counters), []
        for name in NAMES:
            try:
                read += members(f.open(srv.url(name), ENTRIES[name]))
            except ShardFetchError as e:
                assert faults(e, entry=ENTRIES[name])
        assert read == expected(NAMES[1]) + expected(NAMES[2])
        assert [(r['reason'], r['scenes']) for r in faults.take()] == [('http 404', SAMPLES)]
        assert faults.take() == [] and f.counters.get('shards_failed') == 1


def test_every_fault_at_once_gives_the_fault_free_bytes(tmp_path):
    with FaultyServer(FILES) as srv:
        srv.faults = {NAMES[0]: [('status', 502), ('reset', 3000), ('truncate', 20_000)],
                      NAMES[1]: [('truncate', 0), ('stall', 5.0, 100)],
                      NAMES[2]: [('reset', 1)]}
        f = fetcher(tmp_path, cache=True, retry=RetryPolicy(retries=3, backoff=0.001, timeout=0.3))
        for i, name in enumerate(NAMES):
            if i + 1 < len(NAMES):
                f.prefetch(srv.url(NAMES[i + 1]), ENTRIES[NAMES[i + 1]])
            assert members(f.open(srv.url(name), ENTRIES[name])) == expected(name)
        f.close()
        assert f.counters.get('retries') == 6 and f.counters.get('gave_up') == 0
        assert len(srv.requests) == 9


# ----------------------------------------------------------------------------- cache

def test_cache_reuses_verified_shards_and_refetches_changed_ones(tmp_path):
    name = NAMES[0]
    with FaultyServer(FILES) as srv:
        f = fetcher(tmp_path, cache=True)
        for _ in range(2):
            assert members(f.open(srv.url(name), ENTRIES[name])) == expected(name)
        assert srv.count(name) == 1 and f.counters.get('cache_hits') == 1
        tar = tmp_path / 'cache' / f'{ENTRIES[name]["sha256"]}.tar'
        os.utime(tar, ns=(1, 1))  # changed since its verification: not trusted any more
        assert members(f.open(srv.url(name), ENTRIES[name])) == expected(name)
        assert srv.count(name) == 2 and f.counters.get('cache_stale') == 1
        os.remove(tmp_path / 'cache' / f'{ENTRIES[name]["sha256"]}.json')  # crash before record
        assert members(f.open(srv.url(name), ENTRIES[name])) == expected(name)
        assert srv.count(name) == 3


def test_cache_stays_under_its_bound_evicting_the_least_recently_used(tmp_path):
    size = len(FILES[NAMES[0]])
    with FaultyServer(FILES) as srv:
        f = fetcher(tmp_path, cache=True, cache_bytes=int(2.5 * size))
        a, b, c = NAMES
        for name in (a, b, a, c):  # a was used after b: b goes
            members(f.open(srv.url(name), ENTRIES[name]))
        cache = f.cache()
        assert cache.total_bytes() <= int(2.5 * size)
        assert {sha for sha, _, _ in cache.entries()} == {ENTRIES[a]['sha256'], ENTRIES[c]['sha256']}
        assert f.counters.get('cache_evictions') == 1
        members(f.open(srv.url(b), ENTRIES[b]))
        assert srv.count(b) == 2


def test_two_processes_share_the_cache(tmp_path):
    script = textwrap.dedent(f'''
        import hashlib, sys
        from pipeline.fetch import FetchOptions, ShardFetcher
        from pipeline.remote import RetryPolicy
        f = ShardFetcher(FetchOptions(cache_dir=sys.argv[1], retry=RetryPolicy(backoff=0.001,
                                      timeout=5)))
        entries = {ENTRIES!r}
        for rnd in range(3):
            for name in sorted(entries):
                with f.open(sys.argv[2] + name, entries[name]) as s:
                    assert hashlib.sha256(s.read()).hexdigest() == entries[name]['sha256']
        print(f.counters.get('cache_hits'))
    ''')
    with FaultyServer(FILES) as srv:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        procs = [subprocess.Popen([sys.executable, '-c', script, str(tmp_path / 'c'),
                                   srv.url('')], stdout=subprocess.PIPE, env=env)
                 for _ in range(2)]
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        assert sum(int(o) for o in outs) >= 2 * 3 * 2  # rounds 2 and 3 always hit
        assert len(srv.requests) <= 2 * len(NAMES)
    assert sorted(os.listdir(tmp_path / 'c' / '.tmp')) == []


# ----------------------------------------------------------------------------- pipe: commands

def test_pipe_command_failing_once_is_rerun_and_skips_delivered_bytes(tmp_path):
    name = NAMES[0]
    shard = tmp_path / name
    shard.write_bytes(FILES[name])
    flag = tmp_path / 'failed-once'
    cmd = (f'if [ -e {flag} ]; then cat {shard}; '
           f'else touch {flag}; head -c 9000 {shard}; echo boom >&2; exit 2; fi')
    f = fetcher(tmp_path)
    assert members(f.open(f'pipe:{cmd}', None)) == expected(name)
    c = f.counters.snapshot()
    assert (c['retries/exit_2'], c['restarted'], c['bytes_skipped']) == (1, 1, 9000)


def test_pipe_command_that_keeps_failing_or_is_missing_ends_in_a_named_error(tmp_path):
    f = fetcher(tmp_path, retry=RetryPolicy(retries=2, backoff=0.001, timeout=2))
    with pytest.raises(ShardFetchError, match="gave up after 3 .*exited with status 3: nope"):
        f.open('pipe:echo nope >&2; exit 3', ENTRIES[NAMES[0]])
    with pytest.raises(ShardFetchError, match='no-such-command-xyz') as e:
        f.open('pipe:no-such-command-xyz', ENTRIES[NAMES[0]])
    assert e.value.reason == 'command'
    assert f.counters.get('retries') == 3 and f.counters.get('permanent') == 1


def test_pipe_command_that_hangs_times_out(tmp_path):
    f = fetcher(tmp_path, retry=RetryPolicy(retries=1, backoff=0.001, timeout=0.2))
    t0 = time.monotonic()
    with pytest.raises(ShardFetchError, match='no output for 0.2 s'):
        f.open('pipe:sleep 30', None).read()
    assert time.monotonic() - t0 < 3 and f.counters.get('retries/timeout') == 2


def test_object_store_urls_go_through_their_cli(tmp_path, monkeypatch):
    assert store_command('s3://b/x y.tar') == "aws s3 cp 's3://b/x y.tar' -"
    assert store_command('gs://b/x.tar') == 'gcloud storage cat gs://b/x.tar'
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (tmp_path / 'bucket').mkdir()
    for name in NAMES:
        (tmp_path / 'bucket' / name).write_bytes(FILES[name])
    aws = bin_dir / 'aws'  # a stand-in CLI: `aws s3 cp s3://bucket/<name> -` writes the object
    aws.write_text(f'#!/bin/sh\nexec cat "{tmp_path}/bucket/${{3##*/}}"\n')
    aws.chmod(0o755)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    f = fetcher(tmp_path, cache=True)
    assert members(f.open(f's3://bucket/{NAMES[2]}', ENTRIES[NAMES[2]])) == expected(NAMES[2])
    assert f.cache().entries()[0][0] == ENTRIES[NAMES[2]]['sha256']


# ----------------------------------------------------------------------------- plumbing

def test_prefetch_downloads_ahead_and_errors_surface_at_open(tmp_path):
    with FaultyServer(FILES) as srv:
        del srv.files[NAMES[2]]
        f = fetcher(tmp_path)
        f.prefetch(srv.url(NAMES[1]), ENTRIES[NAMES[1]])
        f.prefetch(srv.url(NAMES[2]), ENTRIES[NAMES[2]])  # over the depth of 1: ignored
        assert members(f.open(srv.url(NAMES[0]), ENTRIES[NAMES[0]])) == expected(NAMES[0])
        assert members(f.open(srv.url(NAMES[1]), ENTRIES[NAMES[1]])) == expected(NAMES[1])
        f.prefetch(srv.url(NAMES[2]), ENTRIES[NAMES[2]])
        with pytest.raises(ShardFetchError, match='404'):
            f.open(srv.url(NAMES[2]), ENTRIES[NAMES[2]])
        assert [srv.count(n) for n in NAMES] == [1, 1, 1]
        f.close()
    assert os.listdir(tmp_path / 'tmp') == []


def test_local_paths_open_directly_and_the_pieces_pickle(tmp_path):
    path = tmp_path / NAMES[0]
    path.write_bytes(FILES[NAMES[0]])
    f = fetcher(tmp_path, cache=True)
    assert members(f.open(str(path), ENTRIES[NAMES[0]])) == expected(NAMES[0])
    assert f.counters.snapshot() == {}  # no copy, no check: as fast as before
    clone = pickle.loads(pickle.dumps(f))  # into DataLoader workers
    assert clone.options == f.options and clone.counters.snapshot() == {}
    err = pickle.loads(pickle.dumps(ShardFetchError('http://h/x.tar', 'http 404', 'HTTP 404')))
    assert (err.url, err.reason, str(err)) == ('http://h/x.tar', 'http 404', 'http://h/x.tar: HTTP 404')
    policy = RetryPolicy(backoff=1, max_backoff=8, jitter=0.5)
    rng = __import__('random').Random(0)
    delays = [policy.delay(k, rng) for k in range(1, 7)]
    assert all(0.5 * min(8, 2 ** (k - 1)) <= d <= min(8, 2 ** (k - 1)) for k, d in zip(range(1, 7), delays))
    with pytest.raises(ValueError, match='--fetch-timeout'):
        RetryPolicy(timeout=0)


def test_converted_shards_stream_through_faults_with_their_manifest(tmp_path):
    """The converter's own shards and manifest entries (NMR test vectors), served with faults."""
    from pipeline.convert import ConvertConfig, convert
    from pipeline.reader import Scene, read_manifest
    from tests.conftest import TESTVECTORS
    out = tmp_path / 'shards'
    convert(ConvertConfig(dataset='nmr', src=str(TESTVECTORS / 'sources' / 'nmr'), out=str(out),
                          splits=['train'], scenes_per_shard=1, progress=False))
    entries = read_manifest(str(out), 'train')['shards']
    files = {e['name']: (out / e['name']).read_bytes() for e in entries}
    with FaultyServer(files) as srv:
        srv.faults = {entries[0]['name']: [('reset', 20_000)],
                      entries[1]['name']: [('status', 500), ('truncate', 40_000)]}
        f = fetcher(tmp_path, cache=True)
        for e in entries:
            got = members(f.open(srv.url(e['name']), e))
            assert got == list(tario.iter_members_bytes(files[e['name']]))
            sample = {'__key__': tario.split_key(got[0][0])[0], '__url__': srv.url(e['name'])}
            sample.update((tario.split_key(n)[1], d) for n, d in got)
            assert Scene(sample).images([0]).shape == (1, 64, 64, 3)
        assert f.counters.get('retries') == 3 and f.counters.get('cache_misses') == 2
