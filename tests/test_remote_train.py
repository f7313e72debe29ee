"""The trainer on remote shards: a faulty loopback HTTP server (127.0.0.1 only) and the verified
cache give the local run's losses; a permanent fault skips the shard in training (listed in
metrics.jsonl) and stops evaluation naming it; DDP ranks do not hang when one rank's shard fails;
a checkpoint the disk refuses is a named error that leaves the previous one resumable."""
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from srt import checkpoint
from srt.config import FetchConfig
from tests.conftest import ENV, ROOT, losses, train_cmd, write_config
from tests.faulty_http import FaultyServer

ENV = {**ENV, 'no_proxy': '127.0.0.1', 'NO_PROXY': '127.0.0.1'}
FAST = ['--fetch-retries', 3, '--fetch-timeout', 5]


def served(shards) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shards.glob('*.tar')}


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


def train(shards, config, run, *extra, timeout=300):
    return subprocess.run(train_cmd(shards, config, run, *extra), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_training_over_a_faulty_server_gives_the_local_losses(nmr_shards, tmp_path):
    config = write_config(tmp_path / 'tiny.yaml', max_it=3, checkpoint_every=0)
    assert train(nmr_shards, config, tmp_path / 'local').returncode == 0
    cache = tmp_path / 'cache'
    with FaultyServer(served(nmr_shards)) as srv:
        # The shard the first batches come from: a 500, a reset mid-body, a truncated body.
        srv.faults = {'train-000001.tar': [('status', 500), ('reset', 20_000), ('truncate', 20_000)],
                      'val-000000.tar': [('status', 503)]}
        run = tmp_path / 'http'
        proc = train(nmr_shards, config, run, '--shard-url', srv.url('{name}'), '--cache-dir',
                     cache, '--evalnow', '--max-eval', 1, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(s, r) for p, s, r in srv.requests if p == 'train-000001.tar'] == \
        [(None, 500), (None, 200), (20_000, 206), (40_000, 206)]
    want = losses(tmp_path / 'local')
    assert sorted(want) == [1, 2, 3]
    np.testing.assert_allclose(list(losses(run).values()), list(want.values()), rtol=1e-5,
                               atol=1e-8)
    train_records = [r for r in records(run) if 'loss' in r]
    total = lambda key: sum(r.get(key, 0) for r in train_records)  # noqa: E731
    assert total('fetch_retries') == 3 and total('fetch_gave_up') == 0
    assert total('fetch_retries/http_500') == 1 and total('fetch_retries/reset') == 1
    assert total('fetch_resumed') == 2 and total('fetch_cache_misses') >= 1
    assert not any('failed_shards' in r for r in train_records)
    # Each shard read is cached once, under its sha256, after the check (the val shard too).
    entries = [e for split in ('train', 'val') for e in
               json.loads((nmr_shards / f'{split}.manifest.json').read_text())['shards']]
    cached = {p.name for p in cache.glob('*.tar')}
    assert f'{entries[1]["sha256"]}.tar' in cached and f'{entries[2]["sha256"]}.tar' in cached
    for e in entries:
        if f'{e["sha256"]}.tar' in cached:
            assert (cache / f'{e["sha256"]}.tar').read_bytes() == (nmr_shards / e['name']).read_bytes()


def test_a_lost_shard_is_skipped_in_training_and_a_corrupt_one_stops_evaluation(
        nmr_shards, tmp_path):
    config = write_config(tmp_path / 'tiny.yaml', max_it=4, checkpoint_every=0, validate_every=2)
    files = served(nmr_shards)
    del files['train-000001.tar']  # 404: permanent
    cache = tmp_path / 'cache'
    with FaultyServer(files) as srv:
        srv.flip = {('val-000000.tar', 1000)}
        run = tmp_path / 'run'
        proc = train(nmr_shards, config, run, '--shard-url', srv.url('{name}'), '--cache-dir',
                     cache, '--max-eval', 1, *FAST)
    assert proc.returncode == 2
    assert 'evaluation stopped: unreadable shard' in proc.stderr
    assert f'{srv.url("val-000000.tar")}' in proc.stderr and 'sha256' in proc.stderr
    # Training went on without the lost shard, and listed it with its reason and scenes.
    recs = [r for r in records(run) if 'loss' in r]
    assert [r['it'] for r in recs] == [1, 2] and all(np.isfinite(r['loss']) for r in recs)
    failed = [f for r in recs for f in r.get('failed_shards', [])]
    assert failed and {f['url'] for f in failed} == {srv.url('train-000001.tar')}
    assert failed[0]['reason'] == 'http 404' and failed[0]['scenes'] == 1
    assert sum(r['fetch_gave_up'] for r in recs) == 0 and recs[-1]['bad_data'] >= 1
    # The corrupt shard was never cached (only the good train shard is).
    good = json.loads((nmr_shards / 'train.manifest.json').read_text())['shards'][0]['sha256']
    assert sorted(p.name for p in cache.glob('*.tar')) == [f'{good}.tar']


def test_two_ranks_train_on_when_one_ranks_shard_fails(nmr_shards, tmp_path):
    # Four train shards (two copies of each scene), one of them lost: whichever rank it falls to
    # trains on its other shard; both ranks finish together, nothing hangs.
    shards = tmp_path / 'shards'
    shutil.copytree(nmr_shards, shards)
    manifest = json.loads((shards / 'train.manifest.json').read_text())
    for i, e in enumerate(list(manifest['shards'])):
        name = f'train-00000{i + 2}.tar'
        shutil.copy(shards / e['name'], shards / name)
        manifest['shards'].append({**e, 'name': name})
    manifest['num_scenes'] = 4
    (shards / 'train.manifest.json').write_text(json.dumps(manifest))
    files = served(shards)
    del files['train-000003.tar']
    config = write_config(tmp_path / 'tiny.yaml', max_it=3, checkpoint_every=0, num_workers=0)
    with FaultyServer(files) as srv:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
               '--master_port', '29531', '-m', 'srt.train', '--shards', str(shards), '--config',
               str(config), '--out', str(tmp_path / 'ddp'), '--shard-url', srv.url('{name}'),
               '--debug-ddp', *map(str, FAST)]
        proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((tmp_path / 'ddp/ddp_debug.json').read_text())
    assert ranks[0]['param_sum'] == ranks[1]['param_sum'] and ranks[0]['scenes'] and ranks[1]['scenes']
    recs = [r for r in records(tmp_path / 'ddp') if 'loss' in r]
    assert [r['it'] for r in recs] == [1, 2, 3]
    failed = [f for r in recs for f in r.get('failed_shards', [])]
    assert {(f['url'], f['reason']) for f in failed} == {(srv.url('train-000003.tar'), 'http 404')}


def test_fetch_flags_are_checked_naming_the_flag():
    for kw, flag in (({'cache_gb': 0}, '--cache-gb'), ({'retries': -1}, '--fetch-retries'),
                     ({'timeout': 0}, '--fetch-timeout')):
        with pytest.raises(ValueError, match=flag):
            FetchConfig(**kw)
    opts = FetchConfig(cache_dir='/x', cache_gb=0.5, retries=2, timeout=3).options()
    assert (opts.cache_dir, opts.cache_bytes, opts.retry.retries, opts.retry.timeout) == \
        ('/x', 2**29, 2, 3)


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EROFS])
def test_a_refused_checkpoint_write_is_named_and_leaves_the_previous_one(tmp_path, monkeypatch,
                                                                         code):
    path = tmp_path / 'model.pt'
    checkpoint.save_checkpoint(path, {'it': 1, 'w': torch.arange(1000.0)})
    old = path.read_bytes()

    def failing_save(obj, f):
        f.write(b'x' * 100)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.torch, 'save', failing_save)
    with pytest.raises(checkpoint.OutputError, match='cannot write checkpoint') as e:
        checkpoint.save_checkpoint(path, {'it': 2})
    assert e.value.filename == str(path) and e.value.errno == code
    assert path.read_bytes() == old and os.listdir(tmp_path) == ['model.pt']
    assert torch.load(path, weights_only=True)['it'] == 1


def test_too_little_free_space_stops_before_writing(tmp_path, monkeypatch):
    path = tmp_path / 'model.pt'
    checkpoint.save_checkpoint(path, {'w': torch.arange(1000.0)})
    old = path.read_bytes()
    real = os.statvfs(tmp_path)
    monkeypatch.setattr(checkpoint.os, 'statvfs', lambda p: os.statvfs_result(
        (real.f_bsize, 1, 0, 0, len(old) // 1, 0, 0, 0, 0, 255)))  # len(old) bytes free
    monkeypatch.setattr(checkpoint.torch, 'save', lambda *a: pytest.fail('wrote anyway'))
    with pytest.raises(checkpoint.OutputError, match='needed'):
        checkpoint.save_checkpoint(path, {'w': torch.arange(1000.0)})
    assert path.read_bytes() == old


def test_the_trainer_stops_on_a_full_disk_and_the_previous_checkpoint_resumes(nmr_shards,
                                                                              tmp_path):
    config = write_config(tmp_path / 'tiny.yaml', max_it=2, checkpoint_every=1, num_workers=0)
    run = tmp_path / 'run'
    # torch.save fails with ENOSPC from the second checkpoint on (the one at iteration 2).
    code = ('import errno, os, sys, torch\nfrom srt import checkpoint, train\nreal = torch.save\n'
            'calls = []\n'
            'def save(obj, f):\n    calls.append(1)\n    if len(calls) > 1:\n'
            '        f.write(b"partial")\n        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n'
            '    real(obj, f)\n'
            'checkpoint.torch.save = save\n'
            f'sys.exit(train.main({["--shards", str(nmr_shards), "--config", str(config), "--out", str(run)]!r}))\n')
    proc = subprocess.run([sys.executable, '-c', code], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f'{run / "model.pt"}: cannot write checkpoint: No space left on device' in proc.stderr
    assert sorted(os.listdir(run)) == ['metrics.jsonl', 'model.pt', 'resolved_config.yaml']
    assert torch.load(run / 'model.pt', weights_only=True)['it'] == 1
    proc = train(nmr_shards, config, run)
    assert proc.returncode == 0 and 'at iteration 1' in proc.stdout, proc.stderr[-3000:]
    assert torch.load(run / 'model.pt', weights_only=True)['it'] == 2


def test_a_refused_metrics_append_is_named(tmp_path, monkeypatch):
    from srt import runlog
    log = runlog.RunLog(str(tmp_path))

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runlog, 'open', full, raising=False)
    with pytest.raises(checkpoint.OutputError, match='metrics.jsonl: cannot write metrics.jsonl'):
        log.write({'it': 1})
