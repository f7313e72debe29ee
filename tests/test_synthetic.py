"""Synthetic scenes: the renderer's geometry, and each writer's output read back independently, the
way the reference loaders read the real datasets (their formulas re-implemented here)."""
import filecmp
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import cameras as C
from pipeline import synthetic as S
from pipeline import synthetic as W
from tests.conftest import ROOT, TESTVECTORS

SRC = TESTVECTORS / 'sources'
TOL = 1e-5


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    """One tiny dataset per format, written once for the module (in this process)."""
    base = tmp_path_factory.mktemp('synthetic')
    return {
        'nmr': W.write_nmr(base / 'nmr', 3, seed=5, workers=1),
        'obsurf': W.write_obsurf(base / 'obsurf', 3, seed=5, variant='clevr3d', workers=1),
        'obsurf-msn': W.write_obsurf(base / 'obsurf-msn', 3, seed=5, variant='msn', workers=1),
        'msn': W.write_msn(base / 'msn', 3, seed=5, split_sizes={'train': 2, 'test': 1},
                           scenes_per_file=1, workers=1),
    }


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# ----------------------------------------------------------------------------- scenes and renderer

@pytest.mark.parametrize('style', sorted(S.STYLES))
def test_scenes_are_deterministic_and_physically_valid(style):
    for index in range(6):
        a = S.sample_scene(style, 1, 'train', index)
        b = S.sample_scene(style, 1, 'train', index)
        for field in ('kind', 'center', 'radius', 'half_height', 'yaw', 'color', 'light_dir'):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        lo, hi = S.STYLES[style].num_objects
        assert lo <= a.num_objects <= hi
        # resting on one plane (the ground z = 0, or NMR's invisible floor), footprints apart
        floors = a.center[:, 2] - a.half_height
        np.testing.assert_allclose(floors, floors[0] if style == 'nmr' else 0.0, atol=1e-12)
        bounds = np.where(a.kind == S.KINDS.index('box'), a.radius * math.sqrt(2), a.radius)
        for i in range(a.num_objects):
            for j in range(i):
                assert np.hypot(*(a.center[i, :2] - a.center[j, :2])) > bounds[i] + bounds[j]
        chroma = a.color.max(1) - a.color.min(1)
        assert np.all(chroma > 0.4), 'objects must be clearly coloured'
    for other in (S.sample_scene(style, 1, 'train', 1), S.sample_scene(style, 1, 'val', 0),
                  S.sample_scene(style, 2, 'train', 0)):
        assert not np.array_equal(S.sample_scene(style, 1, 'train', 0).color, other.color)
    with pytest.raises(ValueError, match='unknown split'):
        S.sample_scene(style, 1, 'dev', 0)


def _camera(eye, target, size, focal_px):
    K = np.array([[focal_px, 0, size / 2], [0, focal_px, size / 2], [0, 0, 1.0]])
    return K, C.look_at(eye, target)


@pytest.mark.parametrize('style', ['clevr', 'msn', 'nmr'])
def test_a_surface_point_has_the_same_colour_in_two_views(style):
    """Render view A without noise, take points where its pixel rays hit the scene, and look at each
    from a second camera aimed exactly at it (the centre pixel of an odd-sized image): where that
    ray reaches the point unoccluded, object id and colour agree."""
    scene = S.sample_scene(style, 2, 'train', 3)
    dist, height = (2.7, 1.35) if style == 'nmr' else (11.0, 6.0)
    eye_a = np.array([dist * 0.8, 0.0, height])
    size = 48
    K_a, pose_a = _camera(eye_a, np.zeros(3), size, size * 1.1)
    view_a = S.render(scene, K_a, pose_a, size, size)
    _, dirs_a = C.image_rays(K_a, pose_a, size, size)
    rng = np.random.default_rng(0)
    on_objects = np.argwhere(view_a['object_id'] > 0)
    pixels = on_objects[rng.choice(len(on_objects), min(30, len(on_objects)), replace=False)]
    if style != 'nmr':  # the ground too: textured and shadowed as a function of x, y
        ground = np.argwhere((view_a['object_id'] == 0) & np.isfinite(view_a['depth']))
        pixels = np.concatenate([pixels, ground[rng.choice(len(ground), 20, replace=False)]])
    compared = 0
    for v, u in pixels:
        point = eye_a + float(view_a['depth'][v, u]) * dirs_a[v, u]
        angle = rng.uniform(0.6, 1.6) * rng.choice([-1, 1])
        c, s = math.cos(angle), math.sin(angle)
        eye_b = np.array([c * eye_a[0] - s * eye_a[1], s * eye_a[0] + c * eye_a[1], eye_a[2] * 1.2])
        K_b, pose_b = _camera(eye_b, point, 5, 60.0)
        view_b = S.render(scene, K_b, pose_b, 5, 5)
        if abs(view_b['depth'][2, 2] - np.linalg.norm(point - eye_b)) > 1e-4:
            continue  # occluded in view B
        assert view_b['object_id'][2, 2] == view_a['object_id'][v, u]
        diff = np.abs(view_b['rgb'][2, 2].astype(int) - view_a['rgb'][v, u].astype(int)).max()
        assert diff <= 1, f'point {point} differs by {diff} levels between the views'
        compared += 1
    assert compared >= 15


def test_render_is_deterministic_and_noise_is_per_view():
    scene = S.sample_scene('msn', 0, 'test', 4)
    K, poses = S.msn_cameras(S.scene_rng(0, 'test', 4, S.STREAM_CAMERAS), num_views=2,
                             height=32, width=32)
    K = K * np.array([[0.25], [0.25], [1.0]])  # a 32x32 view of the same field of view
    a = S.render_views(scene, K, poses, 32, 32, seed=0, split='test', index=4)
    b = S.render_views(scene, K, poses, 32, 32, seed=0, split='test', index=4)
    clean = S.render_views(scene, K, poses, 32, 32, noise=False)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    noise = a['rgb'].astype(int) - clean['rgb'].astype(int)
    assert 1.0 < noise.std() < 4.0  # a few levels of 255
    assert np.abs(noise[0] - noise[1]).max() > 0  # seeded per view
    assert set(np.unique(a['category'])) <= set(range(len(S.CATEGORY_NAMES)))


def test_nmr_background_stays_white():
    r = W.render_scene('nmr', 0, 'train', 0)
    background = r['object_id'] == 0
    assert background.mean() > 0.3
    assert np.all(r['rgb'][background] == 255)
    assert np.all(np.isinf(r['depth'][background]))


# ----------------------------------------------------------------------------- NMR

def _reference_nmr_rays(cams: dict, i: int, height: int = 64, width: int = 64):
    """The reference NMR loader's ray formula: rotated world, edge-to-edge linspace grid."""
    rot = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    world_mat_inv = rot @ cams[f'world_mat_inv_{i}']
    x, y = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    grid = np.stack([x, y, np.ones_like(x), np.zeros_like(x)], -1)
    rays = np.einsum('nm,...m->...n', world_mat_inv @ cams[f'camera_mat_inv_{i}'], grid)[..., :3]
    rays = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    return world_mat_inv[:3, -1].astype(np.float32), rays.astype(np.float32)


def test_nmr_reads_back_as_the_reference_reads_it(written):
    result = written['nmr']
    root = result.root
    meta = yaml.safe_load((root / 'metadata.yaml').read_text())
    assert all(isinstance(k, str) and v['id'] == k for k, v in meta.items())
    assert [v['name'] for v in meta.values()] == list(W.NMR_CLASSES.values())
    reference_zip = zipfile.ZipFile(SRC / 'nmr/02958343/scene00007/cameras.npz')
    for split in ('train', 'val', 'test'):
        # the reference's scene list: classes in metadata order, then each class's lst file
        listed = [f'{c}/{line.strip()}' for c in (v['id'] for v in meta.values())
                  for line in (root / c / f'softras_{split}.lst').read_text().splitlines()
                  if len(line) > 1]
        assert sorted(listed) == sorted(result.scenes[split])
        assert len(listed) == 1
        rendered = W.render_scene('nmr', 5, split, 0)
        scene_dir = root / listed[0]
        assert scene_dir.parent.name == list(W.NMR_CLASSES)[rendered['scene'].kind[0]]
        with zipfile.ZipFile(scene_dir / 'cameras.npz') as zf:  # same members, order, storage
            assert [(i.filename, i.compress_type) for i in zf.infolist()] == \
                [(i.filename, i.compress_type) for i in reference_zip.infolist()]
        cams = dict(np.load(scene_dir / 'cameras.npz'))
        assert all(m.dtype == np.float64 and m.shape == (4, 4) for m in cams.values())
        _, ref_dirs = C.image_rays(rendered['K'], rendered['world_from_cam'], 64, 64)
        for i in range(24):
            np.testing.assert_array_equal(cams[f'camera_mat_{i}'],
                                          np.diag([S.NMR_FOCAL, S.NMR_FOCAL, 1.0, 1.0]))
            pos, rays = _reference_nmr_rays(cams, i)
            np.testing.assert_allclose(rays, ref_dirs[i], atol=TOL)
            np.testing.assert_allclose(pos, rendered['world_from_cam'][i, :3, 3], atol=TOL)
            image = _png(scene_dir / 'image' / f'{i:04d}.png')
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            np.testing.assert_array_equal(image, rendered['rgb'][i])
        # DVR's circle: 30 degrees elevation, distance 2.5-2.9, looking at the origin
        positions = rendered['world_from_cam'][:, :3, 3]
        radius = np.linalg.norm(positions, axis=1)
        np.testing.assert_allclose(positions[:, 2] / radius, 0.5, atol=1e-9)
        assert np.all((radius > 2.45) & (radius < 2.95))


# ----------------------------------------------------------------------------- ObSuRF

def _reference_obsurf_rays(c_pos, width=320, height=240, focal_length=0.035, sensor_width=0.032):
    """The reference ObSuRF ray formula: a sensor plane at the focal length, pixel centres."""
    c_dir = -c_pos / np.linalg.norm(c_pos)
    horizontal = np.cross(c_dir, [0.0, 0.0, 1.0])
    horizontal /= np.linalg.norm(horizontal)
    vertical = np.cross(c_dir, horizontal)
    vertical /= np.linalg.norm(vertical)
    sensor_height = sensor_width / width * height
    hs = np.linspace(-1, 1, width + 1) * sensor_width / 2
    vs = np.linspace(-1, 1, height + 1) * sensor_height / 2
    hs, vs = (hs[:-1] + hs[1:]) / 2, (vs[:-1] + vs[1:]) / 2
    plane = (hs[None, :, None] * horizontal + vs[:, None, None] * vertical
             + c_pos + c_dir * focal_length)
    rays = plane - c_pos
    return (rays / np.linalg.norm(rays, axis=2, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize('fmt', ['obsurf', 'obsurf-msn'])
def test_obsurf_reads_back_as_the_reference_reads_it(written, fmt):
    result = written[fmt]
    variant = 'clevr3d' if fmt == 'obsurf' else 'msn'
    _, slots, ranges = W.OBSURF[variant]
    meta = dict(np.load(result.root / 'metadata.npz'))
    reference = np.load(SRC / 'clevr3d/metadata.npz')
    assert meta['shape'].dtype == reference['shape'].dtype
    assert meta['shape'].shape == (100000, slots)
    assert meta['camera_pos'].dtype == np.float32 and meta['camera_pos'].shape == (100000, 3, 3)
    assert all(len(v) == 100000 for v in meta.values())
    max_objects = 6 if variant == 'clevr3d' else 4
    for split, (lo, hi) in ranges.items():
        # the reference's selection: the fixed range, then at most max_objects objects
        num_objs = (meta['shape'][lo:hi] > 0).sum(1)
        kept = np.arange(lo, hi)[num_objs <= max_objects]
        assert kept.tolist() == [int(s) for s in result.scenes[split]] == [lo]
        if variant == 'msn':  # documented: 5 slots never exceed the default max_objects=6
            assert (num_objs <= 6).all()
        rendered = W.render_scene(fmt, 5, split, 0)
        scene, row = rendered['scene'], lo
        n = scene.num_objects
        np.testing.assert_array_equal(meta['shape'][row, :n], scene.kind + 1)
        assert np.all(meta['shape'][row, n:] == 0)
        np.testing.assert_allclose(meta['3d_coords'][row, :n], scene.center, atol=1e-6)
        np.testing.assert_allclose(meta['color'][row, :n], scene.color, atol=1e-6)
        np.testing.assert_array_equal(meta['camera_pos'][row], rendered['camera_pos'])
        _, dirs = C.image_rays(rendered['K'], rendered['world_from_cam'], 240, 320)
        for v in range(3):
            c_pos = meta['camera_pos'][row, v]
            np.testing.assert_allclose(_reference_obsurf_rays(c_pos), dirs[v], atol=TOL)
            np.testing.assert_allclose(c_pos, rendered['world_from_cam'][v, :3, 3], atol=TOL)
            image = _png(result.root / 'images' / f'img_{row}_{v}.png')
            assert image.shape == (240, 320, 4) and image.dtype == np.uint8
            assert np.all(image[..., 3] == 255)
            np.testing.assert_array_equal(image[..., :3], rendered['rgb'][v])
        assert 9.5 < np.linalg.norm(c_pos) < 13.0  # ~12 units like the test vector
    images = sorted(os.listdir(result.root / 'images'))
    assert len(images) == 9  # no images for the unused rows


def test_obsurf_split_sizes_are_checked_against_the_ranges(tmp_path):
    with pytest.raises(ValueError, match='at most 500'):
        W.write_obsurf(tmp_path, 501, variant='msn', split_sizes={'val': 501})
    with pytest.raises(ValueError, match='add up to'):
        W.write_obsurf(tmp_path, 3, split_sizes={'train': 1})
    assert not (tmp_path / 'metadata.npz').exists()


# ----------------------------------------------------------------------------- MSN

def test_msn_reads_back_with_tfds(written):
    from pipeline.sources.msn import import_tensorflow
    import_tensorflow()  # before tfds: see its docstring
    import tensorflow_datasets as tfds
    result = written['msn']
    ds_dir = result.dataset_dir
    assert ds_dir == result.root / 'multi_shapenet_frames' / '2.3.3'
    # the test vector's feature spec, with our four category labels
    ref_features = (SRC / 'msn/multi_shapenet_frames/2.3.3/features.json').read_text()
    assert (ds_dir / 'features.json').read_text() == \
        ref_features.replace('"numClasses": "3"', '"numClasses": "4"')
    for i in range(10):
        labels = (ds_dir / f'cameras-camera_{i}-category_image.labels.txt').read_text()
        assert labels.split() == list(S.CATEGORY_NAMES)
    info = json.loads((ds_dir / 'dataset_info.json').read_text())
    reference_info = json.loads((SRC / 'msn/multi_shapenet_frames/2.3.3/dataset_info.json')
                                .read_text())
    assert info.keys() == reference_info.keys()
    files = sorted(p.name for p in ds_dir.glob('*.tfrecord-*'))
    assert files == ['multi_shapenet_frames-test.tfrecord-00000-of-00001',
                     'multi_shapenet_frames-train.tfrecord-00000-of-00002',
                     'multi_shapenet_frames-train.tfrecord-00001-of-00002']
    builder = tfds.builder_from_directory(str(ds_dir))
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {'train': 2, 'test': 1}
    assert builder.info.splits['train'].num_shards == 2
    for split, offset in (('train', 0), ('test', 500000)):
        examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        assert [e['scene_name'].decode() for e in examples] == result.scenes[split]
        for index, ex in enumerate(examples):
            assert ex['scene_name'].decode() == ex['frame_name'].decode() == \
                f'scene_{offset + index}'
            np.testing.assert_array_equal(ex['pose']['R'], np.eye(3))
            rendered = W.render_scene('msn', 5, split, index)
            for v in range(10):
                cam = ex['cameras'][f'camera_{v}']
                np.testing.assert_array_equal(cam['color_image'], rendered['rgb'][v])
                np.testing.assert_array_equal(cam['category_image'][..., 0],
                                              rendered['category'][v])
                np.testing.assert_array_equal(cam['intrinsics']['K'], rendered['K32'][v])
                assert cam['intrinsics']['type'] == b'PERSPECTIVE'
                assert cam['intrinsics']['image_width'] == cam['intrinsics']['image_height'] == 128
                np.testing.assert_array_equal(cam['extrinsics']['R'], rendered['R'][v])
                np.testing.assert_array_equal(cam['extrinsics']['t'], rendered['t'][v])
            radius = np.linalg.norm(rendered['world_from_cam'][:, :3, 3], axis=1)
            assert np.all((radius > 8.9) & (radius < 13.1))  # the test vector's shell


def test_msn_reads_back_with_sunds_as_the_reference_does(written):
    import sunds
    result = written['msn']
    builder = sunds.builder('multi_shapenet', data_dir=str(result.root))
    ds = builder.as_dataset(split='train', task=sunds.tasks.Nerf(yield_mode='stacked'))
    seen = []
    for ex in ds.as_numpy_iterator():
        name = ex['scene_name'].decode()
        index = result.scenes['train'].index(name)
        rendered = W.render_scene('msn', 5, 'train', index)
        origins, dirs = C.image_rays(rendered['K'], rendered['world_from_cam'], 128, 128)
        assert ex['ray_directions'].shape == (10, 128, 128, 3)
        np.testing.assert_allclose(ex['ray_directions'], dirs, atol=TOL)
        np.testing.assert_allclose(ex['ray_origins'], origins, atol=TOL)
        np.testing.assert_array_equal(ex['color_image'], rendered['rgb'])
        seen.append(name)
    assert sorted(seen) == sorted(result.scenes['train'])


# ----------------------------------------------------------------------------- determinism

def _same_tree(a, b) -> None:
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, mismatch + errors
    for sub in cmp.common_dirs:
        _same_tree(os.path.join(a, sub), os.path.join(b, sub))


def test_same_seed_gives_identical_bytes(written, tmp_path):
    # NMR again through two spawned worker processes: the bytes do not depend on the workers
    _same_tree(written['nmr'].root, W.write_nmr(tmp_path / 'nmr', 3, seed=5, workers=2).root)
    _same_tree(written['obsurf'].root,
               W.write_obsurf(tmp_path / 'obsurf', 3, seed=5, workers=1).root)
    again = W.write_msn(tmp_path / 'msn', 3, seed=5, split_sizes={'train': 2, 'test': 1},
                        scenes_per_file=1, workers=1)
    _same_tree(written['msn'].root, again.root)
    other = W.write_nmr(tmp_path / 'nmr_seed6', 3, seed=6, workers=1)
    first = sorted((other.root).rglob('0000.png'))[0]
    assert all(first.read_bytes() != p.read_bytes()
               for p in written['nmr'].root.rglob('0000.png'))


# ----------------------------------------------------------------------------- API and CLI

def test_default_split_sizes():
    assert W.default_split_sizes('nmr', 1000) == {'train': 800, 'val': 100, 'test': 100}
    assert W.default_split_sizes('obsurf', 3) == {'train': 1, 'val': 1, 'test': 1}
    assert W.default_split_sizes('obsurf', 2) == {'train': 2, 'val': 0, 'test': 0}
    assert W.default_split_sizes('msn', 1000) == {'train': 900, 'test': 100}
    with pytest.raises(ValueError, match='unknown format'):
        W.default_split_sizes('clevr', 10)


def test_writers_module_does_not_import_tensorflow():
    code = ('import pipeline.synthetic, sys; '
            'print(any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == 'False'


def test_cli_writes_a_dataset(tmp_path):
    tool = ROOT / 'tools' / 'make_synthetic.py'
    out = subprocess.run([sys.executable, str(tool), '--help'], capture_output=True, text=True,
                         check=True)
    assert '--format' in out.stdout and '--workers' in out.stdout
    out = subprocess.run([sys.executable, str(tool), '--format', 'nmr', '--out', str(tmp_path),
                          '--scenes', '2', '--seed', '3', '--workers', '1'],
                         capture_output=True, text=True, check=True)
    assert 'scenes/s' in out.stdout + out.stderr
    marker = json.loads((tmp_path / W.SYNTHETIC_MARKER).read_text())
    assert marker['format'] == 'nmr' and marker['num_scenes'] == 2
    assert len(list(tmp_path.rglob('*.png'))) == 48
    bad = subprocess.run([sys.executable, str(tool), '--format', 'nmr', '--out', str(tmp_path),
                          '--scenes', '0'], capture_output=True, text=True)
    assert bad.returncode == 2 and '--scenes must be >= 1' in bad.stderr
