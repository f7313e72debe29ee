"""Conversion when the output fails: disk full, a file-size limit, a read-only output. Each ends in
an OutputError naming the path, no partial shard or manifest is visible, and a rerun completes with
the bytes of an undisturbed conversion."""
import errno
import hashlib
import io
import os
import subprocess
import sys
import textwrap

import pytest

import pipeline.convert as convert_mod
import pipeline.durable as durable_mod
from pipeline.convert import ConvertConfig, convert
from pipeline.durable import OutputError
from tests.conftest import ROOT, TESTVECTORS

SRC = TESTVECTORS / 'sources' / 'nmr'


def run(out, **kw):
    return convert(ConvertConfig(dataset='nmr', src=str(SRC), out=str(out), scenes_per_shard=1,
                                 progress=False, **kw))


def visible(out) -> dict[str, str]:
    """sha256 of every file a reader sees (not the hidden work directory)."""
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in sorted(os.listdir(out))
            if n.endswith(('.tar', '.json', '.jsonl', 'README.md'))}


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp('clean')
    run(out)
    return visible(out)


def leftovers(out) -> list[str]:
    work = out / '.work'
    return sorted(n for n in os.listdir(work) if '.partial' in n or '.tmp-' in n) + \
        sorted(n for n in os.listdir(out) if '.tmp-' in n)


class _FullDisk(io.FileIO):
    """A file on a disk with ``budget[0]`` bytes free: a write beyond them fails with ENOSPC."""

    def __init__(self, path, mode, budget):
        super().__init__(path, mode)
        self.budget = budget

    def write(self, data):
        if len(data) > self.budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= len(data)
        return super().write(data)


def test_disk_full_while_writing_shards(tmp_path, monkeypatch, clean):
    budget = [150_000]  # two or three shards fit (55 or 64 KB each), then the disk is full
    monkeypatch.setattr(convert_mod, 'open', lambda p, m='r', *a, **k: _FullDisk(p, m, budget)
                        if 'w' in m else open(p, m, *a, **k), raising=False)
    with pytest.raises(OutputError, match=r'/(\w+-\d{6}\.tar): cannot write shard \1: No space '
                       r'left on device \(free space') as e:
        run(tmp_path)
    assert e.value.errno == errno.ENOSPC
    assert leftovers(tmp_path) == []
    # What is there is complete: the shards and the manifests of the splits done before (the card
    # lists those), and no manifest for the split that stopped.
    partial = {n: h for n, h in visible(tmp_path).items() if n != 'README.md'}
    assert partial and all(clean[n] == h for n, h in partial.items())
    failed_split = os.path.basename(e.value.filename).split('-')[0]
    assert f'{failed_split}.manifest.json' not in partial
    monkeypatch.undo()
    run(tmp_path)
    assert visible(tmp_path) == clean


def test_disk_full_while_writing_the_manifest(tmp_path, monkeypatch, clean):
    real_open = open

    def failing_open(path, mode='r', *a, **k):
        if 'w' in mode and '.manifest.json' in str(path):
            return _FullDisk(path, mode, [0])
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(durable_mod, 'open', failing_open, raising=False)
    with pytest.raises(OutputError, match=r'train\.manifest\.json: cannot write train\.manifest'):
        run(tmp_path, splits=['train'])
    assert leftovers(tmp_path) == [] and not (tmp_path / 'train.manifest.json').exists()
    monkeypatch.undo()
    run(tmp_path, splits=['train'])
    assert {n: h for n, h in visible(tmp_path).items() if n != 'README.md'} == \
        {n: h for n, h in clean.items() if n.startswith('train')}


def test_read_only_output(tmp_path, monkeypatch, clean):
    real_makedirs = os.makedirs

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(a[0]))

    monkeypatch.setattr(os, 'makedirs', read_only)
    with pytest.raises(OutputError, match='cannot write the output directory: Read-only file sys'):
        run(tmp_path / 'new')
    monkeypatch.setattr(os, 'makedirs', real_makedirs)
    real_open = open

    def ro_open(path, mode='r', *a, **k):  # an existing output remounted read-only
        if 'w' in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *a, **k)

    (tmp_path / 'ro' / '.work').mkdir(parents=True)
    for mod in (convert_mod, durable_mod):
        monkeypatch.setattr(mod, 'open', ro_open, raising=False)
    with pytest.raises(OutputError, match=r'plan\.json: cannot write .*Read-only file system'):
        run(tmp_path / 'ro')
    assert leftovers(tmp_path / 'ro') == []
    monkeypatch.undo()
    run(tmp_path / 'ro')
    assert visible(tmp_path / 'ro') == clean


def test_file_size_limit_is_a_named_error_from_the_command_line(tmp_path, clean):
    """A real OS error (EFBIG under ulimit -f), through the converter's command line."""
    script = textwrap.dedent(f'''
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        from pipeline.cli import convert_format_main
        sys.exit(convert_format_main('nmr', ['--src', {str(SRC)!r}, '--out', {str(tmp_path)!r},
                                     '--scenes-per-shard', '1', '--no-progress']))
    ''')
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert 'cannot write shard' in proc.stderr and 'File too large' in proc.stderr
    assert 'no partial shard is visible' in proc.stderr
    assert leftovers(tmp_path) == []
    assert all(clean[n] == h for n, h in visible(tmp_path).items())
    run(tmp_path)
    assert visible(tmp_path) == clean
