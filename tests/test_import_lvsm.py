"""LVSM scenes importer (pipeline/sources/lvsm.py): cameras reproduce the generator's true rays and
LVSM's own ray formula, PNG bytes are kept, list entries and image paths resolve (absolute, relative,
a moved dataset), bad scenes are named errors or --skip-bad records."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline import cameras as C
from pipeline.convert import ConvertConfig, convert
from pipeline.reader import Scene, iter_shard, read_manifest, shard_urls
from pipeline.schema import SourceError, rgb_member
from pipeline.synthetic import scene_cameras, video_key, write_lvsm
from tests.conftest import ROOT

SEED, VIEWS, SIZES = 5, (4, 6), {'train': 2, 'test': 2}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp('lvsm') / 'lvsm_re10k'
    write_lvsm(root, 4, SEED, split_sizes=SIZES, views=VIEWS, workers=1)
    return root


def convert_to(src, out, **kw):
    return convert(ConvertConfig(dataset='re10k', src=str(src), out=str(out), progress=False,
                                 source_format='lvsm', **kw))


def scenes(out, split):
    return [Scene(s) for url in shard_urls(str(out), split) for s in iter_shard(url)]


def scene_json(root, split, index):
    return root / split / 'metadata' / f'{video_key(SEED, split, index)}.json'


def _lvsm_rays(frame, h, w):
    """LVSM utils/data_utils.py compute_rays (:67-77): x = (j + 0.5 - cx) / fx,
    y = (i + 0.5 - cy) / fy, d = normalize(R_c2w @ [x, y, 1]), o = t_c2w, with c2w = inv(w2c)
    (data/dataset_scene.py:92-94)."""
    fx, fy, cx, cy = frame['fxfycxcy']
    c2w = np.linalg.inv(np.array(frame['w2c']))
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    d = np.stack([(j + 0.5 - cx) / fx, (i + 0.5 - cy) / fy, np.ones((h, w))], -1) @ c2w[:3, :3].T
    return np.broadcast_to(c2w[:3, 3], d.shape), d / np.linalg.norm(d, axis=-1, keepdims=True)


def test_cameras_reproduce_true_and_lvsm_rays_and_png_bytes_are_kept(source, tmp_path):
    convert_to(source, tmp_path)
    for split, n in SIZES.items():
        got = {s.meta['scene_id']: s for s in scenes(tmp_path, split)}
        assert len(got) == n
        for index in range(n):
            scene = got[video_key(SEED, split, index)]
            true = scene_cameras('lvsm', SEED, split, index, VIEWS)
            frames = json.loads(scene_json(source, split, index).read_text())['frames']
            h, w = true['size']
            assert scene.meta['image_sizes'] == [[h, w]] * len(frames)
            assert scene.meta['image_format'] == 'png' and scene.meta['source_format'] == 'lvsm_scenes'
            for v, frame in enumerate(frames):
                with open(frame['image_path'], 'rb') as f:
                    assert scene.sample[rgb_member(v)] == f.read()
                o, d = C.image_rays(scene.K[v], scene.c2w[v], h, w)
                o_true, d_true = C.image_rays(true['K'][v], true['world_from_cam'][v], h, w)
                o_lvsm, d_lvsm = _lvsm_rays(frame, h, w)
                for a, b in ((o, o_true), (d, d_true), (o, o_lvsm), (d, d_lvsm)):
                    assert np.abs(a - b).max() <= 1e-5
            # 3D points project where LVSM's pinhole puts them: j + 0.5 = fx Xc / Zc + cx
            X = scene.c2w[0, :3, 3] + d[5, 7] * 3.0
            w2c = np.array(frames[0]['w2c'])
            Xc = w2c[:3, :3] @ X + w2c[:3, 3]
            fx, fy, cx, cy = frames[0]['fxfycxcy']
            assert abs(fx * Xc[0] / Xc[2] + cx - 7.5) < 1e-6 and abs(fy * Xc[1] / Xc[2] + cy - 5.5) < 1e-6


def test_relative_entries_and_a_moved_dataset_resolve(source, tmp_path):
    # relative list entries (against the list file's folder) and image paths relative to the JSON
    rel = tmp_path / 'rel'
    shutil.copytree(source, rel)
    for split in SIZES:
        lines = (rel / split / 'full_list.txt').read_text().split()
        (rel / split / 'full_list.txt').write_text(
            '\n\n'.join('metadata/' + os.path.basename(p) for p in lines) + '\n')
        for path in (rel / split / 'metadata').iterdir():
            data = json.loads(path.read_text())
            for frame in data['frames']:
                parts = frame['image_path'].split(os.sep)
                frame['image_path'] = os.path.join('..', 'images', *parts[-2:])
            path.write_text(json.dumps(data))
    # a moved dataset: the absolute paths written on another machine no longer exist
    moved = tmp_path / 'moved'
    shutil.copytree(source, moved)
    for split in SIZES:
        for path in (moved / split / 'metadata').iterdir():
            path.write_text(path.read_text().replace(str(source), '/elsewhere/lvsm_re10k'))
        text = (moved / split / 'full_list.txt').read_text()
        (moved / split / 'full_list.txt').write_text(text.replace(str(source), '/elsewhere/x'))
    convert_to(source, tmp_path / 'a')
    for src, out in ((rel, tmp_path / 'b'), (moved, tmp_path / 'c')):
        convert_to(src, out)
        for split in SIZES:
            for x, y in zip(scenes(tmp_path / 'a', split), scenes(out, split)):
                assert x.key == y.key and np.array_equal(x.c2w, y.c2w)
                assert all(x.sample[rgb_member(v)] == y.sample[rgb_member(v)]
                           for v in range(x.num_views))


def test_process_data_output_folder_is_found_one_level_down(source, tmp_path):
    """--src may be process_data.py's output folder (<out>/center_crop_<n>/<split>/); two such
    folders are named instead of one being picked."""
    out = tmp_path / 'processed'
    out.mkdir()
    (out / 'center_crop_256').symlink_to(source, target_is_directory=True)
    convert_to(source, tmp_path / 'a')
    convert_to(out, tmp_path / 'b')
    for split in SIZES:
        assert [(x.key, x.c2w.tolist()) for x in scenes(tmp_path / 'a', split)] == \
            [(y.key, y.c2w.tolist()) for y in scenes(tmp_path / 'b', split)]
    (out / 'center_crop_512').symlink_to(source, target_is_directory=True)
    with pytest.raises(SourceError, match=r"\['center_crop_256', 'center_crop_512'\]: pass one"):
        convert_to(out, tmp_path / 'c')


def test_bad_scenes_are_named_errors_or_skip_records(source, tmp_path):
    key = video_key(SEED, 'train', 1)
    for name, edit, says in (
            ('missing', lambda d: os.remove(d['frames'][2]['image_path']), 'frame 2: missing image'),
            ('nan', lambda d: d['frames'][1]['w2c'][0].__setitem__(3, float('nan')),
             'frame 1: non-finite camera'),
            ('shear', lambda d: d['frames'][0]['w2c'][0].__setitem__(1, 0.9),
             'frame 0: bad camera: .*orthonormal')):
        src = tmp_path / name / 'src'
        shutil.copytree(source, src)
        listing = src / 'train/full_list.txt'
        listing.write_text(listing.read_text().replace(str(source), str(src)))
        path = scene_json(src, 'train', 1)
        data = json.loads(path.read_text().replace(str(source), str(src)))
        edit(data)
        path.write_text(json.dumps(data))
        with pytest.raises(SourceError, match=f'{key}.json: scene {key}: {says}'):
            convert_to(src, tmp_path / name / 'a', splits=['train'])
        convert_to(src, tmp_path / name / 'b', splits=['train'], skip_bad=True)
        lines = (tmp_path / name / 'b/train.skipped.jsonl').read_text().splitlines()
        assert [json.loads(line)['scene_id'] for line in lines] == [key]
        assert read_manifest(str(tmp_path / name / 'b'), 'train')['num_scenes'] == 1


def test_command_line_converts_and_verifies(source, tmp_path):
    out = tmp_path / 'shards'
    for tool, args in (('convert_lvsm.py', ['--src', source, '--out', out, '--no-progress']),
                       ('inspect_shards.py', [out, '--verify'])):
        proc = subprocess.run([sys.executable, str(ROOT / 'tools' / tool), *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'verify: OK' in proc.stdout and 'dataset lvsm_re10k' in proc.stdout
