"""pixelSplat chunks importer (pipeline/sources/pixelsplat.py): cameras reproduce the generator's true
rays and project points where pixelSplat's own formula does, JPEG bytes are kept, scenes of another
size convert, the evaluation index is carried, bad data is a named error or a --skip-bad record (never
a silent drop), and a chunk holding a pickled object is refused without being unpickled."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import cameras as C
from pipeline.convert import ConvertConfig, convert
from pipeline.reader import Scene, iter_shard, read_manifest, shard_urls
from pipeline.schema import SourceError, rgb_member
from pipeline.synthetic import scene_cameras, video_key, write_re10k
from tests.conftest import ROOT

SEED, VIEWS, SIZES = 3, (5, 8), {'train': 3, 'test': 4}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp('ps') / 're10k'
    write_re10k(root, 7, SEED, split_sizes=SIZES, scenes_per_chunk=2, views=VIEWS, workers=1)
    return root


@pytest.fixture(scope='module')
def shards(source, tmp_path_factory):
    out = tmp_path_factory.mktemp('ps_shards')
    convert(ConvertConfig(dataset='re10k', src=str(source), out=str(out), progress=False,
                          source_format='pixelsplat'))
    return out


def scenes(out, split):
    return [Scene(s) for url in shard_urls(str(out), split) for s in iter_shard(url)]


def chunk_entries(root, split):
    return [e for f in sorted(os.listdir(root / split)) if f.endswith('.torch')
            for e in torch.load(root / split / f, weights_only=True)]


def convert_to(src, out, **kw):
    return convert(ConvertConfig(dataset='re10k', src=str(src), out=str(out), progress=False,
                                 source_format='pixelsplat', **kw))


def test_cameras_reproduce_the_true_rays_and_jpeg_bytes_are_kept(source, shards):
    for split, n in SIZES.items():
        got = {s.meta['scene_id']: s for s in scenes(shards, split)}
        entries = {e['key']: e for e in chunk_entries(source, split)}
        assert len(got) == n
        for index in range(n):
            key = video_key(SEED, split, index)
            scene, entry = got[key], entries[key]
            true = scene_cameras('re10k', SEED, split, index, VIEWS)
            h, w = true['size']
            assert scene.meta['image_sizes'] == [[h, w]] * scene.num_views
            assert (h, w) == ((60, 80) if index == 1 else (72, 128))  # another size converts
            assert scene.meta['timestamps'] == entry['timestamps'].tolist()
            assert scene.meta['image_format'] == 'jpeg'
            assert scene.meta['source_format'] == 'pixelsplat_chunks'
            for v in range(scene.num_views):
                assert scene.sample[rgb_member(v, 'jpg')] == entry['images'][v].numpy().tobytes()
                o, d = C.image_rays(scene.K[v], scene.c2w[v], h, w)
                o_true, d_true = C.image_rays(true['K'][v], true['world_from_cam'][v], h, w)
                assert np.abs(d - d_true).max() <= 1e-5 and np.abs(o - o_true).max() <= 1e-5


def _pixelsplat_project(row, X, W, H):
    """Pixel (column, row) indices where pixelSplat puts world points X [n, 3] (FORMATS.md 1.7):
    K_n and w2c from the row (src/dataset/dataset_re10k.py:188-200, extrinsics = inv(w2c)),
    transform_world2cam with extrinsics.inverse() and project_camera_space's divide by
    z + eps (src/geometry/projection.py:47-71), pixel (i, j) centred at ((j + .5) / W, (i + .5) / H)
    (sample_image_grid, projection.py:117-137)."""
    r = torch.as_tensor(row, dtype=torch.float32)
    K_n = torch.eye(3)
    K_n[0, 0], K_n[1, 1], K_n[0, 2], K_n[1, 2] = r[0], r[1], r[2], r[3]
    w2c = torch.eye(4)
    w2c[:3] = r[6:].reshape(3, 4)
    extrinsics = w2c.inverse()
    Xh = torch.cat([torch.as_tensor(X, dtype=torch.float32), torch.ones(len(X), 1)], -1)
    cam = (Xh @ extrinsics.inverse().T)[:, :3]
    cam = cam / (cam[:, -1:] + torch.finfo(torch.float32).eps)
    xy = (cam @ K_n.T)[:, :2]
    return (xy * torch.tensor([W, H]) - 0.5).double().numpy()


def test_points_project_to_the_same_pixels_through_pixelsplats_formula(source, shards):
    rng = np.random.default_rng(0)
    entries = {e['key']: e for e in chunk_entries(source, 'test')}
    for scene in scenes(shards, 'test'):
        for v in range(scene.num_views):
            h, w = scene.image_size(v)
            rows, cols = rng.integers(0, h, 50), rng.integers(0, w, 50)
            o, d = C.pixel_rays(scene.K[v], scene.c2w[v], rows, cols)
            X = o + d * rng.uniform(1.0, 10.0, (50, 1))  # points seen at our pixel centres
            got = _pixelsplat_project(entries[scene.meta['scene_id']]['cameras'][v], X, w, h)
            assert np.abs(got - np.stack([cols, rows], -1)).max() < 2e-3  # float32 pixels


def test_evaluation_index_is_carried_by_sample_keys_with_nulls(source, shards):
    theirs = json.loads((source / 'evaluation_index_re10k.json').read_text())
    ours = json.loads((shards / 'test.evaluation_index.json').read_text())
    assert ours == {f're10k_test_{k}': v for k, v in theirs.items()}
    assert None in ours.values() and any(v is not None for v in ours.values())
    assert not (shards / 'train.evaluation_index.json').exists()
    manifest = read_manifest(str(shards), 'test')
    assert manifest['members'] is None and manifest['image_format'] == 'jpeg'
    counts = [len(e['images']) for e in chunk_entries(source, 'test')]
    assert (manifest['min_views'], manifest['max_views']) == (min(counts), max(counts))
    assert min(counts) < max(counts)
    assert manifest['near'] is None and manifest['source']['evaluation_index']['file'] == \
        'evaluation_index_re10k.json'


def _rewrite_chunk(path, edit):
    chunk = torch.load(path, weights_only=True)
    edit(chunk)
    torch.save(chunk, path)


def test_what_pixelsplat_ignores_or_only_indexes_may_take_other_shapes(source, shards, tmp_path):
    """Chunks from other writers: url None, extra numeric fields, images as a tuple, timestamps as
    a list of ints and a one-element tensor key (LVSM's process_data.py reads keys so) convert to
    the same scenes; pixelSplat reads only key, cameras and images (dataset_re10k.py)."""
    src = tmp_path / 're10k'
    shutil.copytree(source, src)
    first = src / 'test/000000.torch'
    keys = [e['key'] for e in torch.load(first, weights_only=True)]

    def other_writer(chunk):
        for e in chunk:
            e.update(url=None, fps=30.0, num_frames=len(e['images']), flags=(True, None),
                     images=tuple(e['images']), timestamps=e['timestamps'].tolist())
    _rewrite_chunk(first, other_writer)
    convert_to(src, tmp_path / 'out', splits=['test'])
    want = {s.meta['scene_id']: s for s in scenes(shards, 'test')}
    got = {s.meta['scene_id']: s for s in scenes(tmp_path / 'out', 'test')}
    assert sorted(got) == sorted(want)
    for key in keys:
        a, b = got[key], want[key]
        np.testing.assert_array_equal(a.K, b.K)
        np.testing.assert_array_equal(a.c2w, b.c2w)
        assert a.meta['timestamps'] == b.meta['timestamps']
        assert [a.sample[k] for k in sorted(a.sample) if k.startswith('rgb_')] == \
            [b.sample[k] for k in sorted(b.sample) if k.startswith('rgb_')]
        assert a.meta['source']['url'] is None
        assert a.meta['source']['other_fields'] == ['flags', 'fps', 'num_frames']
    _rewrite_chunk(first, lambda chunk: chunk[0].__setitem__('key', torch.tensor(12345)))
    convert_to(src, tmp_path / 'out2', splits=['test'], skip_bad=True)
    assert '12345' in {s.meta['scene_id'] for s in scenes(tmp_path / 'out2', 'test')}


def test_bad_scenes_are_named_errors_or_skip_records(source, tmp_path):
    src = tmp_path / 're10k'
    shutil.copytree(source, src)
    first = src / 'train/000000.torch'
    keys = [e['key'] for e in torch.load(first, weights_only=True)]

    def truncate(chunk):
        chunk[0]['images'][2] = chunk[0]['images'][2][:300].clone()
    _rewrite_chunk(first, truncate)
    with pytest.raises(SourceError, match=rf'000000.torch: scene {keys[0]} view 2 .*undecodable JPEG'):
        convert_to(src, tmp_path / 'a')
    convert_to(src, tmp_path / 'b', skip_bad=True)
    records = [json.loads(line) for line in (tmp_path / 'b/train.skipped.jsonl').read_text().splitlines()]
    assert [(r['scene_id'], r['source_file']) for r in records] == [(keys[0], 'train/000000.torch')]
    assert 'undecodable JPEG' in records[0]['error']
    assert read_manifest(str(tmp_path / 'b'), 'train')['num_scenes'] == SIZES['train'] - 1

    for name, edit, says in (
            ('nan', lambda c: c[1]['cameras'].__setitem__((3, 9), float('nan')),
             'view 3 .*non-finite camera row'),
            ('shear', lambda c: c[1]['cameras'].__setitem__((0, 6), 1.7),
             'view 0 .*not a rigid transform'),
            ('frames', lambda c: c[1]['images'].pop(), '"images" must be a list of .* uint8 tensors')):
        shutil.copy(source / 'train/000000.torch', first)
        _rewrite_chunk(first, edit)
        with pytest.raises(SourceError, match=rf'scene {keys[1]}: {says}'):
            convert_to(src, tmp_path / name)


def test_a_chunk_with_a_pickled_object_is_refused_and_never_unpickled(source, tmp_path):
    src = tmp_path / 're10k'
    shutil.copytree(source, src)
    marker = tmp_path / 'unpickled'
    chunk = torch.load(src / 'test/000001.torch', weights_only=True)
    chunk[0]['extra'] = Boom(str(marker))
    torch.save(chunk, src / 'test/000001.torch')
    with pytest.raises(SourceError, match='000001.torch: refused: the chunk holds an object other '
                                          'than tensors'):
        convert_to(src, tmp_path / 'a', splits=['test'])
    convert_to(src, tmp_path / 'b', splits=['test'], skip_bad=True)
    records = [json.loads(line) for line in (tmp_path / 'b/test.skipped.jsonl').read_text().splitlines()]
    assert [r['source_file'] for r in records] == ['test/000001.torch'] * 3
    assert 'refused' in records[0]['error'] and 'scene_id' not in records[0]
    # index.json lists the refused chunk's scenes: each is recorded, none silently dropped
    lost = [e['key'] for e in torch.load(source / 'test/000001.torch', weights_only=True)]
    assert sorted(r['scene_id'] for r in records[1:]) == sorted(lost)
    assert all('which could not be read' in r['error'] for r in records[1:])
    assert read_manifest(str(tmp_path / 'b'), 'test')['num_scenes'] == SIZES['test'] - len(lost)
    assert not marker.exists()


def test_index_json_is_cross_checked_not_trusted(source, tmp_path):
    src = tmp_path / 're10k'
    shutil.copytree(source, src)
    os.remove(src / 'train/000001.torch')  # index.json still lists its scene
    lost = video_key(SEED, 'train', 2)
    with pytest.raises(SourceError, match=f'index.json lists scene {lost} in chunk 000001.torch, '
                                          'but no chunk of train/ holds it'):
        convert_to(src, tmp_path / 'a', splits=['train'])
    convert_to(src, tmp_path / 'b', splits=['train'], skip_bad=True)
    records = [json.loads(line) for line in (tmp_path / 'b/train.skipped.jsonl').read_text().splitlines()]
    assert [r['scene_id'] for r in records] == [lost]


class Boom:
    """Unpickling this would create a file: the importer must never do it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_command_line_converts_finds_the_evaluation_index_and_verifies(source, tmp_path):
    out = tmp_path / 'shards'
    for tool, args in (('convert_pixelsplat.py', ['--src', source, '--out', out, '--workers', '2',
                                                 '--shard-mb', '0.05', '--no-progress']),
                       ('inspect_shards.py', [out, '--verify'])):
        proc = subprocess.run([sys.executable, str(ROOT / 'tools' / tool), *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'verify: OK' in proc.stdout and 'dataset re10k' in proc.stdout
    assert (out / 'test.evaluation_index.json').exists()
    assert len(read_manifest(str(out), 'train')['shards']) > 1


def test_plain_webdataset_reads_the_jpeg_shards(shards):
    import webdataset as wds
    ds = wds.WebDataset(shard_urls(str(shards), 'test'), shardshuffle=False).decode('rgb8')
    samples = list(ds)
    assert len(samples) == SIZES['test']
    for s in samples:
        sizes = s['meta.json']['image_sizes']
        assert s['rgb_000.jpg'].shape == (*sizes[0], 3)
        assert s['cameras.npz']['K'].shape == (s['meta.json']['num_views'], 3, 3)


def test_the_reader_in_docs_reads_jpeg_views_of_any_size(shards):
    from tests.test_convert import _docs_reader
    ns, _ = _docs_reader()
    got = {key: (meta, rgb, K) for url in shard_urls(str(shards), 'test')
           for key, meta, rgb, K, _ in ns['scenes'](url)}
    ours = {s.meta['key']: s for s in scenes(shards, 'test')}
    assert sorted(got) == sorted(ours)
    sizes = set()
    for key, (meta, rgb, K) in got.items():
        for v in range(meta['num_views']):
            assert (np.asarray(rgb[v]) == ours[key].image(v)[..., :3]).all()
            sizes.add(tuple(np.asarray(rgb[v]).shape[:2]))
        assert np.array_equal(K, ours[key].K)
    assert len(sizes) == 2  # the generator's other-size scene is read too


def test_hugging_face_refuses_a_split_of_differing_member_sets_as_documented(shards, tmp_path):
    """docs/SHARDS.md: HF datasets' webdataset builder needs one member set (RE10K-like splits,
    manifest members null, are read with webdataset or pipeline.reader instead)."""
    from tests.test_interop import DOC_API
    assert read_manifest(str(shards), 'test')['members'] is None
    with pytest.raises(ValueError, match='same prefix or the same types'):
        DOC_API['hf_dataset'](shard_urls(str(shards), 'test'), str(tmp_path / 'hf'))
