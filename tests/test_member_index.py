"""Reading only the members a stream uses (pipeline/tario.py): members left in a regular shard file
(``FileMember``, read by pread) equal the plain walk's bytes and fail with a named error once the
file is closed or shrank; the converter's member index (``<split>-NNNNNN.idx``, DALI's v1.2
format) equals DALI's rebuilt one, malformed and stale indexes are refused or ignored, and the
training streams give the same batches with or without the indexes."""
import io
import os
import pickle
import re
import shutil
import threading

import numpy as np
import pytest

from pipeline import multiview, tario
from pipeline.dali import dali_index_lines
from pipeline.multiview import MultiViewStream, split_shards
from pipeline.reader import Scene, ShardError, iter_shard, shard_urls
from srt.data import DataConfig
from srt.loader import TrainStream, shard_table

DEFER = 1024  # NMR's PNG views are 0.8-1.6 KB: some stay in the file, some are read at once


def idx_of(shard) -> str:
    return str(shard)[:-len('.tar')] + '.idx'


def newer_than_shard(idx, shard) -> None:
    """Make ``idx`` one second newer than ``shard`` (an index written after its shard)."""
    t = os.stat(shard).st_mtime_ns + 10**9
    os.utime(idx, ns=(t, t))


def plain_members(shard):
    with open(shard, 'rb') as f:
        return list(tario.iter_members(io.BytesIO(f.read()), str(shard)))


# ----------------------------------------------------------------------------- FileMember

def test_deferred_members_read_the_plain_walks_bytes(converted, tmp_path):
    shard = shard_urls(str(converted / 'nmr'), 'train')[0]
    plain = plain_members(shard)
    with open(shard, 'rb') as f:
        walked = list(tario.iter_members(f, shard))  # defer=None: all bytes
        f.seek(0)  # a walk starts where the stream is
        deferred = list(tario.iter_members(f, shard, defer=DEFER))
        assert [(n, o) for n, _, o in deferred] == [(n, o) for n, _, o in plain] == \
            [(n, o) for n, _, o in walked]
        kinds = set()
        for (name, data, _), (_, want, _), (_, got, _) in zip(plain, walked, deferred):
            assert data == want and type(want) is bytes
            assert len(got) == len(data)
            if len(data) >= DEFER:
                assert isinstance(got, tario.FileMember)
                assert got.read() == data and bytes(got) == data
                assert pickle.loads(pickle.dumps(got)) == data  # into a worker: its bytes
            else:
                assert type(got) is bytes and got == data
            kinds.add(type(got))
        assert kinds == {bytes, tario.FileMember}  # both paths exercised
    # A tar starting inside a file (an offset base): offsets stay relative to the stream's start.
    prefixed = tmp_path / 'prefixed.bin'
    prefixed.write_bytes(b'x' * 1536 + open(shard, 'rb').read())
    with open(prefixed, 'rb') as f:
        f.seek(1536)
        got = [(n, bytes(d), o) for n, d, o in tario.iter_members(f, 'prefixed', defer=DEFER)]
    assert got == plain


def test_streams_that_are_not_regular_files_are_walked_eagerly(converted):
    shard = shard_urls(str(converted / 'nmr'), 'train')[0]
    plain = plain_members(shard)
    data = open(shard, 'rb').read()
    got = list(tario.iter_members(io.BytesIO(data), shard, defer=DEFER))
    assert got == plain and all(type(d) is bytes for _, d, _ in got)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        with open(r, 'rb') as pipe:
            got = list(tario.iter_members(pipe, shard, defer=DEFER))
    finally:
        writer.join()
    assert got == plain and all(type(d) is bytes for _, d, _ in got)


def deferred_of(f, shard):
    members = [(n, d) for n, d, _ in tario.iter_members(f, shard, defer=DEFER)
               if isinstance(d, tario.FileMember)]
    assert members
    return members


def test_file_member_read_after_close_names_the_member(converted):
    shard = shard_urls(str(converted / 'nmr'), 'train')[0]
    with open(shard, 'rb') as f:
        members = deferred_of(f, shard)
    name, member = members[-1]
    with pytest.raises(tario.TarFormatError, match=re.escape(repr(name))):
        member.read()
    with pytest.raises(tario.TarFormatError, match=re.escape(repr(name))):
        pickle.dumps(member)


def test_file_member_of_a_shard_rewritten_shorter_names_the_member(nmr):
    shard = shard_urls(str(nmr), 'train')[0]
    data = open(shard, 'rb').read()
    with open(shard, 'rb') as f:
        members = deferred_of(f, shard)
        name, last = members[-1]
        first_name, first = members[0]
        # Rewritten in place (same inode, O_TRUNC) ending inside the last deferred member's data.
        with open(shard, 'wb') as out:
            out.write(data[:last.offset + last.size // 2])
        with pytest.raises(tario.TarFormatError, match=re.escape(repr(name)) + '.*truncated'):
            last.read()
        assert first.read() == plain_dict(data, shard)[first_name]  # still there: still read


def plain_dict(data, where):
    return {n: d for n, d, _ in tario.iter_members(io.BytesIO(data), where)}


def test_indexed_file_member_of_a_shard_rewritten_shorter_names_the_member(nmr):
    """Through the member index the header is read with the data: a shard cut before the header
    is the same fault as one cut inside the data, and named the same way."""
    shard = shard_urls(str(nmr), 'train')[0]
    data = open(shard, 'rb').read()
    layouts = tario.read_index(idx_of(shard))
    with open(shard, 'rb') as f:
        (key, members), = tario.iter_indexed_samples(f, layouts, shard, DEFER)
        deferred = [(m, d) for m, d in members.items() if isinstance(d, tario.FileMember)]
        assert len(deferred) >= 2
        (inside_name, inside), (cut_name, cut) = deferred[-2], deferred[-1]
        assert bytes(cut) == plain_dict(data, shard)[f'{key}.{cut_name}']
        with open(shard, 'wb') as out:  # ends inside one member's data, before the next header
            out.write(data[:inside.offset + inside.size // 2])
        with pytest.raises(tario.TarFormatError, match=re.escape(repr(f'{key}.{inside_name}'))):
            inside.read()
        with pytest.raises(tario.TarFormatError, match=re.escape(repr(f'{key}.{cut_name}'))):
            cut.read()


# ----------------------------------------------------------------------------- the index file

def test_converter_writes_each_shards_index_as_dali_rebuilds_it(converted):
    for dataset in ('nmr', 'clevr3d'):
        urls = shard_urls(str(converted / dataset), 'train')
        assert len(urls) >= 1 + (dataset == 'nmr')
        for url in urls:
            text = open(idx_of(url)).read()
            assert text.splitlines() == dali_index_lines(url)
            assert os.stat(idx_of(url)).st_mtime_ns >= os.stat(url).st_mtime_ns
            # read_index gives each sample's (name, data offset, size) as the tar holds them
            walked = [(n, o + tario.BLOCK, len(d)) for n, d, o in plain_members(url)]
            assert [m for layout in tario.read_index(idx_of(url)) for m in layout] == walked
            assert len(tario.read_index(idx_of(url))) == len({n.split('.')[0] for n, *_ in walked})


def test_member_layout_and_index_text_round_trip(tmp_path):
    samples = [[('a.meta.json', b'{}'), ('a.rgb_000.png', b'x' * 700)],
               [('b.meta.json', b'{"k": 1}'), ('b.rgb_000.png', b'y' * 512)]]
    layouts, start, blob = [], 0, b''
    for members in samples:
        layouts.append(tario.member_layout(members, start))
        buf = tario.encode_members(members)
        blob += buf
        start += len(buf)
    shard = tmp_path / 'x.tar'
    shard.write_bytes(blob + tario.END_OF_ARCHIVE)
    assert [m for layout in layouts for m in layout] == \
        [(n, o + tario.BLOCK, len(d)) for n, d, o in plain_members(shard)]
    (tmp_path / 'x.idx').write_text(tario.index_text(layouts))
    assert tario.read_index(str(tmp_path / 'x.idx')) == layouts
    assert (tmp_path / 'x.idx').read_text().splitlines() == dali_index_lines(str(shard))


GOOD = 'v1.2 2\njson 512 10 a.json png 1536 700 a.png\njson 3072 10 b.json\n'


@pytest.mark.parametrize('text, where', [
    (GOOD.replace('v1.2', 'v1.1'), 'first line'),
    (GOOD.replace('v1.2 2', 'v1.2 3'), 'first line'),
    (GOOD.replace('v1.2 2', 'v1.2'), 'first line'),
    ('', 'first line'),
    (GOOD.replace(' png 1536 700 a.png', ' png 1536 700'), 'line 2'),
    (GOOD.replace('json 3072 10 b.json', 'json 3072 10 b.json extra'), 'line 3'),
    (GOOD.replace('1536', '15x6'), 'line 2'),
    (GOOD.replace('3072 10', '3072 1.5'), 'line 3'),
])
def test_malformed_index_is_refused_naming_file_and_line(tmp_path, text, where):
    good = tmp_path / 'good.idx'
    good.write_text(GOOD)
    assert tario.read_index(str(good)) == [[('a.json', 512, 10), ('a.png', 1536, 700)],
                                           [('b.json', 3072, 10)]]
    path = tmp_path / 'bad.idx'
    path.write_text(text)
    with pytest.raises(tario.TarFormatError, match=re.escape(str(path))) as e:
        tario.read_index(str(path))
    if where.startswith('line'):
        assert f'{path} {where}:' in str(e.value)


def test_sidecar_index_only_when_present_current_and_inside_the_shard(nmr):
    shard = shard_urls(str(nmr), 'train')[0]
    idx = idx_of(shard)
    layouts = tario.read_index(idx)
    with open(shard, 'rb') as f:
        newer_than_shard(idx, shard)
        assert tario.sidecar_index(shard, f) == layouts
        t = os.stat(shard).st_mtime_ns
        os.utime(idx, ns=(t, t))  # written in the same tick: current
        assert tario.sidecar_index(shard, f) == layouts
        os.utime(idx, ns=(t - 10**9, t - 10**9))  # older than the shard: a shard rewritten later
        assert tario.sidecar_index(shard, f) is None
        past = [list(layout) for layout in layouts]
        name, off, size = past[-1][-1]
        past[-1][-1] = (name, off + os.path.getsize(shard), size)
        open(idx, 'w').write(tario.index_text(past))
        newer_than_shard(idx, shard)
        assert tario.sidecar_index(shard, f) is None
        os.remove(idx)
        assert tario.sidecar_index(shard, f) is None


# ----------------------------------------------------------------------------- iter_shard

def spy_indexed(monkeypatch):
    calls = []
    real = tario.iter_indexed_samples

    def spy(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)
    monkeypatch.setattr(tario, 'iter_indexed_samples', spy)
    return calls


@pytest.mark.parametrize('dataset', ['nmr', 'clevr3d'])
@pytest.mark.parametrize('with_index', [True, False])
def test_iter_shard_deferred_equals_the_plain_walk(converted, tmp_path, monkeypatch, dataset,
                                                   with_index):
    directory = tmp_path / dataset
    shutil.copytree(converted / dataset, directory)
    if not with_index:
        for idx in directory.glob('*.idx'):
            idx.unlink()
    calls = spy_indexed(monkeypatch)
    deferred_seen = 0
    for url in shard_urls(str(directory), 'train'):
        plain = list(iter_shard(url))
        got = iter_shard(url, defer=DEFER)
        for want, sample in zip(plain, got, strict=True):  # FileMembers read while it is open
            assert sample.keys() == want.keys()
            deferred_seen += sum(isinstance(v, tario.FileMember) for v in sample.values())
            assert {k: bytes(v) if isinstance(v, tario.FileMember) else v
                    for k, v in sample.items()} == want
            a, b = Scene(want), Scene(sample)
            for v in (0, a.num_views - 1):
                assert b.image_bytes(v) == a.image_bytes(v)
                np.testing.assert_array_equal(b.image(v), a.image(v))
            np.testing.assert_array_equal(b.K, a.K)
            np.testing.assert_array_equal(b.c2w, a.c2w)
    assert deferred_seen > 0
    assert len(calls) == (len(shard_urls(str(directory), 'train')) if with_index else 0)


def stale(directory, edit):
    """Shard 0 of ``directory`` with an index changed by ``edit(layouts) -> layouts``, newer than
    the shard."""
    shard = shard_urls(str(directory), 'train')[0]
    layouts = edit([list(layout) for layout in tario.read_index(idx_of(shard))])
    open(idx_of(shard), 'w').write(tario.index_text(layouts))
    newer_than_shard(idx_of(shard), shard)
    return shard


def member_at(layouts, ext):
    """(sample, position) of the first member of ``layouts`` whose name ends with ``ext``."""
    return next((i, j) for i, layout in enumerate(layouts) for j, (n, _, _) in enumerate(layout)
                if n.endswith(ext))


def move(ext, to):
    """An index edit: the member ending with ``ext`` at offset ``to(layouts, offset)``."""
    def edit(layouts):
        i, j = member_at(layouts, ext)
        name, off, size = layouts[i][j]
        layouts[i][j] = (name, to(layouts, off), size)
        return layouts
    return edit


def next_header(layouts, off):
    """The data offset of the member after the one at ``off``: its header is a real one."""
    offsets = sorted(o for layout in layouts for _, o, _ in layout)
    return offsets[offsets.index(off) + 1]


STALE = {
    # the index of the other (smaller) shard of the split: other names at the same offsets
    'other shard': lambda layouts, d=None: None,
    # a small member (read at once) and a deferred one (read with its header) moved onto another
    # member's header
    'read member onto a header': move('rgb_000.png', next_header),
    'deferred member onto a header': move('cameras.npz', next_header),
    # ... or into the middle of another member's data (no header there)
    'read member into data': move('rgb_000.png', lambda layouts, off: off + 512),
    'deferred member into data': move('cameras.npz', lambda layouts, off: off + 1),
}


@pytest.mark.parametrize('case', list(STALE))
def test_stale_index_newer_than_its_shard_fails_saying_so(nmr, case):
    urls = shard_urls(str(nmr), 'train')
    sizes = [os.path.getsize(u) for u in urls]
    small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
    if case == 'other shard':
        shard = urls[large]
        layouts = tario.read_index(idx_of(urls[small]))
        open(idx_of(shard), 'w').write(tario.index_text(layouts))
        newer_than_shard(idx_of(shard), shard)
        names = [n for layout in layouts for n, _, _ in layout]
    else:
        shard = stale(nmr, STALE[case])
        assert shard == urls[0]
        i, j = member_at(tario.read_index(idx_of(shard)),
                         'rgb_000.png' if 'read' in case else 'cameras.npz')
        names = [tario.read_index(idx_of(shard))[i][j][0]]
    with pytest.raises((tario.TarFormatError, ShardError), match='the index is stale') as e:
        for sample in iter_shard(shard, defer=DEFER):
            scene = Scene(sample)
            scene.images()
    assert any(repr(n) in str(e.value) for n in names), str(e.value)


def test_index_of_a_larger_shard_is_ignored(nmr):
    """An index reaching past the shard's end (the other shard's, larger) is not used."""
    urls = shard_urls(str(nmr), 'train')
    small, large = sorted(urls, key=os.path.getsize)
    layouts = tario.read_index(idx_of(large))
    open(idx_of(small), 'w').write(tario.index_text(layouts))
    newer_than_shard(idx_of(small), small)
    with open(small, 'rb') as f:
        assert tario.sidecar_index(small, f) is None
    want = [s['__key__'] for s in iter_shard(small)]
    assert [s['__key__'] for s in iter_shard(small, defer=DEFER)] == want
    assert want != [layout[0][0].split('.')[0] for layout in layouts]


# ----------------------------------------------------------------------------- the streams

def arrays(batch):
    return {k: np.asarray(v) for k, v in batch.items() if not k.startswith('_')}


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x, y = arrays(x), arrays(y)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def views_of(scene, item, rng, step):
    v = rng.choice(scene.num_views, 3, replace=False)
    return {'key': scene.key, 'views': scene.images(sorted(v.tolist())),
            'bytes': np.frombuffer(scene.image_bytes(int(v[0])), np.uint8)[:64].copy()}


@pytest.mark.parametrize('defer', [DEFER, multiview.DEFER_BYTES])
def test_streams_give_the_same_batches_with_or_without_indexes(converted, tmp_path, monkeypatch,
                                                               defer):
    monkeypatch.setattr(multiview, 'DEFER_BYTES', defer)
    calls = spy_indexed(monkeypatch)
    directory = tmp_path / 'nmr'
    shutil.copytree(converted / 'nmr', directory)
    cfg = DataConfig(dataset='nmr', num_points=64)

    def batches():
        train = iter(TrainStream(cfg, shard_table(str(directory), 'train'), 2, seed=3,
                                 shards_per_visit=2, item_buffer=6))
        generic = iter(MultiViewStream(split_shards(str(directory), 'train'), 2, views_of,
                                       samples_per_scene=3, seed=5, shards_per_visit=2, buffer=4))
        return [next(train) for _ in range(4)], [next(generic) for _ in range(4)]

    indexed = batches()
    assert len(calls) > 0  # the stream went through the indexes
    for idx in directory.glob('*.idx'):
        idx.unlink()
    del calls[:]
    walked = batches()
    assert not calls
    for a, b in zip(indexed, walked):
        assert_same_batches(a, b)


def test_an_index_offset_before_the_first_header_is_refused_naming_the_line(nmr):
    """No member's data starts under byte 512 (its header comes first): such an index is not a
    stale one but a broken one, refused with its file and line."""
    shard = stale(nmr, move('rgb_000.png', lambda layouts, off: 0))
    with pytest.raises(tario.TarFormatError, match=r'\.idx line 2: a data offset under 512'):
        for sample in iter_shard(shard, defer=DEFER):
            Scene(sample).images()
