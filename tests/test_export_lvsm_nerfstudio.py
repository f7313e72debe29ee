"""LVSM and nerfstudio exporters (pipeline/export/lvsm.py, nerfstudio.py): each output is parsed with a
re-implementation of the consumer's own loader (file:line cited) from another working directory,
its rays equal the shards' rays on the pixel grid, images are 3-channel where the consumer needs it,
the LVSM importer gives back the same cameras and image bytes, and nerfstudio gets per-frame
intrinsics where views differ and the source's distortion."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import cameras as C
from pipeline.cli import export_format_main
from pipeline.export.common import ExportError
from pipeline.export.lvsm import export_lvsm
from pipeline.export.nerfstudio import export_nerfstudio
from pipeline.reader import Scene, iter_shard, shard_urls
from pipeline.verify import splits_in
from tests.conftest import reimported

DATASETS = ['nmr', 'clevr3d', 'msn', 're10k']


def scenes(shards, split):
    return [Scene(s) for url in shard_urls(str(shards), split) for s in iter_shard(url)]


def close(a, b, tol=1e-9):
    return np.abs(np.asarray(a) - np.asarray(b)).max() <= tol


# ----------------------------------------------------------------------------- LVSM

def lvsm_load(list_file):
    """LVSM data/dataset_scene.py: the list file's lines, blank ones dropped (:20-27), each JSON
    opened verbatim (:153-154); per frame PIL.Image.open(image_path) verbatim (:62), np.array / 255
    then permute(2, 0, 1) (:77-78: no mode conversion), fxfycxcy, c2w = inv(w2c) (:92-94)."""
    with open(list_file) as f:
        paths = [p for p in f.read().splitlines() if p.strip()]
    out = {}
    for path in paths:
        scene = json.load(open(path))
        frames = []
        for frame in scene['frames']:
            image = np.array(Image.open(frame['image_path'])) / 255.0
            frames.append((image.transpose(2, 0, 1), np.array(frame['fxfycxcy'], np.float64),
                           np.linalg.inv(np.array(frame['w2c'], np.float64))))
        out[scene['scene_name']] = frames
    return out


def lvsm_rays(fxfycxcy, c2w, h, w):
    """LVSM utils/data_utils.py:67-77: x = (j + .5 - cx) / fx, y = (i + .5 - cy) / fy,
    d = normalize(R_c2w [x, y, 1]), o = t_c2w."""
    fx, fy, cx, cy = fxfycxcy
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    d = np.stack([(j + 0.5 - cx) / fx, (i + 0.5 - cy) / fy, np.ones((h, w))], -1) @ c2w[:3, :3].T
    return np.broadcast_to(c2w[:3, 3], d.shape), d / np.linalg.norm(d, axis=-1, keepdims=True)


def lvsm_normalise(c2ws, scale_factor=1.35):
    """LVSM's mean-pose normalisation (dataset_scene.py:97-131), returning (normalised c2w [V,4,4],
    the world_from_normalised similarity (A, s))."""
    t, z, y = c2ws[:, :3, 3], c2ws[:, :3, 2], c2ws[:, :3, 1]
    center = t.mean(0)
    f = z.mean(0) / np.linalg.norm(z.mean(0))
    r = np.cross(y.mean(0), f)
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    d /= np.linalg.norm(d)
    A = np.eye(4)
    A[:3, :3] = np.stack([r, d, f], 1)
    A[:3, 3] = center
    out = np.linalg.inv(A) @ c2ws
    s = scale_factor * np.abs(out[:, :3, 3]).max()
    out[:, :3, 3] /= s
    return out, (A, s)


@pytest.fixture(scope='module')
def lvsm_exported(shards_of, tmp_path_factory):
    made = {}
    for name in DATASETS:
        out = tmp_path_factory.mktemp(f'lvsm_{name}') / 'out'
        export_lvsm(str(shards_of(name)), str(out), progress=False)
        made[name] = out
    return made


@pytest.mark.parametrize('name', DATASETS)
def test_lvsms_loader_gives_the_shards_rays_from_another_cwd(name, shards_of, lvsm_exported,
                                                              tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LVSM opens every path verbatim: they must be absolute
    shards = shards_of(name)
    for split in splits_in(str(shards)):
        ours = scenes(shards, split)
        lines = (lvsm_exported[name] / split / 'full_list.txt').read_text().splitlines()
        assert lines == sorted(lines) and all(os.path.isabs(p) for p in lines)
        theirs = lvsm_load(lvsm_exported[name] / split / 'full_list.txt')
        assert set(theirs) == {s.key for s in ours} and not any('.' in k for k in theirs)
        for scene in ours:
            frames = theirs[scene.key]
            assert len(frames) == scene.num_views
            for v in range(0, scene.num_views, 3):
                image, fxfycxcy, c2w = frames[v]
                h, w = scene.image_size(v)
                assert image.shape == (3, h, w)  # RGB, also from RGBA sources
                assert np.array_equal((image.transpose(1, 2, 0) * 255).round().astype(np.uint8),
                                      scene.image(v))  # JPEG views re-encoded losslessly
                o, d = lvsm_rays(fxfycxcy, c2w, h, w)
                o_ref, d_ref = C.image_rays(scene.K[v], scene.c2w[v], h, w)
                assert close(d, d_ref) and close(o, o_ref)
            # the loader's normalisation is a similarity of the shards' world: rays map through it
            views = list(range(min(4, scene.num_views)))
            normalised, (A, s) = lvsm_normalise(np.stack([frames[v][2] for v in views]))
            for k, v in enumerate(views):
                h, w = scene.image_size(v)
                o, d = lvsm_rays(frames[v][1], normalised[k], h, w)
                o_ref, d_ref = C.image_rays(scene.K[v], scene.c2w[v], h, w)
                assert close(d, d_ref @ A[:3, :3], 1e-8)
                assert close(o, (o_ref - A[:3, 3]) @ A[:3, :3] / s, 1e-8)


@pytest.mark.parametrize('name', DATASETS)
def test_lvsm_reimport_gives_back_cameras_and_bytes(name, shards_of, lvsm_exported, tmp_path):
    shards = shards_of(name)
    for ours, back in reimported(shards, lvsm_exported[name], 'lvsm', tmp_path):
        assert sorted(back) == sorted(s.key for s in ours)
        for scene in ours:
            got = back[scene.key]
            assert close(got.K, scene.K, 1e-9 * np.abs(scene.K).max())
            assert close(got.c2w, scene.c2w, 1e-9 * max(1.0, np.abs(scene.c2w).max()))
            for v in range(scene.num_views):
                if scene.image_format == 'png' and scene.meta['image_mode'] == 'RGB':
                    assert got.image_bytes(v) == scene.image_bytes(v)
                assert np.array_equal(got.image(v), scene.image(v))


def test_lvsm_size_resizes_and_crops_with_exact_intrinsics(shards_of, tmp_path):
    shards = shards_of('re10k')  # 72x128 and 60x80 views, JPEG: written as PNG
    export_lvsm(str(shards), str(tmp_path), splits=['test'], size=(40, 40), progress=False)
    theirs = lvsm_load(tmp_path / 'test' / 'full_list.txt')
    for scene in scenes(shards, 'test'):
        h, w = scene.image_size(0)
        scale = max(40 / h, 40 / w)
        rh, rw = round(h * scale), round(w * scale)
        r0, c0 = (rh - 40) // 2, (rw - 40) // 2
        for v, (image, fxfycxcy, c2w) in enumerate(theirs[scene.key]):
            assert image.shape == (3, 40, 40)
            o, d = lvsm_rays(fxfycxcy, c2w, 40, 40)
            pts = (C.pixel_centers(40, 40) + [c0, r0]) * [w / rw, h / rh]
            assert close(d, C.rays_from_image_points(scene.K[v], scene.c2w[v], pts)[1])


def test_lvsm_resumes_and_refuses_other_settings(shards_of, lvsm_exported, tmp_path):
    shards = str(shards_of('re10k'))
    out = tmp_path / 'out'
    export_lvsm(shards, str(out), progress=False)
    first = sorted((out / 'test' / 'metadata').iterdir())[0]
    first.unlink()  # a scene whose JSON was never written is redone
    (out / 'test' / 'full_list.txt').unlink()
    assert export_format_main('lvsm', [shards, '--out', str(out), '--no-progress']) == 0
    assert first.is_file()
    ref = lvsm_exported['re10k']
    for f in sorted(p.relative_to(ref) for p in ref.rglob('*') if p.is_file()):
        if f.suffix == '.png':
            assert (out / f).read_bytes() == (ref / f).read_bytes()
    with pytest.raises(ExportError, match='other settings'):
        export_lvsm(shards, str(out), size=(32, 32), progress=False)


# ----------------------------------------------------------------------------- nerfstudio

def nerfstudio_load(folder):
    """nerfstudio's dataparser (nerfstudio_dataparser.py): frames sorted by image path (:124-131),
    fl_x, fl_y, cx, cy, w, h at the top level or in every frame (:104-109,137-154), distortion keys
    (:110-114,155-167); rays (cameras/cameras.py): pixel (i + .5, j + .5) (:293-318),
    ((x - cx) / fx, (y - cy) / fy) (:622), y negated (:656), d = [x, y, -1] (:783-787) rotated by the
    transform_matrix and normalised (:889-896), origin its translation (:898)."""
    meta = json.loads((folder / 'transforms.json').read_text())
    frames = sorted(meta['frames'], key=lambda f: str(folder / f['file_path']))
    out = []
    for frame in frames:
        cam = {k: frame.get(k, meta.get(k)) for k in ('fl_x', 'fl_y', 'cx', 'cy', 'w', 'h')}
        assert None not in cam.values()
        T = np.array(frame['transform_matrix'])
        i, j = np.meshgrid(np.arange(cam['h']) + 0.5, np.arange(cam['w']) + 0.5, indexing='ij')
        x, y = (j - cam['cx']) / cam['fl_x'], (i - cam['cy']) / cam['fl_y']
        d = np.stack([x, -y, -np.ones_like(x)], -1) @ T[:3, :3].T
        image = np.array(Image.open(folder / frame['file_path']))
        out.append((image, np.broadcast_to(T[:3, 3], d.shape),
                    d / np.linalg.norm(d, axis=-1, keepdims=True), frame))
    return meta, out


@pytest.mark.parametrize('name', DATASETS)
def test_nerfstudios_dataparser_gives_the_shards_rays(name, shards_of, tmp_path):
    shards = shards_of(name)
    split = splits_in(str(shards))[-1]
    ours = scenes(shards, split)
    keys = [ours[0].key]
    export_nerfstudio(str(shards), str(tmp_path), scenes=keys, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == keys
    meta, frames = nerfstudio_load(tmp_path / keys[0])
    scene = ours[0]
    assert meta['camera_model'] == 'PINHOLE' and len(frames) == scene.num_views
    for v, (image, o, d, frame) in enumerate(frames):
        assert frame['file_path'].startswith('images/frame_')
        assert (tmp_path / keys[0] / frame['file_path']).read_bytes() == scene.image_bytes(v)
        h, w = scene.image_size(v)
        assert image.shape[:2] == (h, w)
        o_ref, d_ref = C.image_rays(scene.K[v], scene.c2w[v], h, w)
        assert close(d, d_ref) and close(o, o_ref)
    # a rerun resumes: a scene without transforms.json is redone, to the same bytes
    done = (tmp_path / keys[0] / 'transforms.json').read_bytes()
    (tmp_path / keys[0] / 'transforms.json').unlink()
    assert export_format_main('nerfstudio', [str(shards), '--out', str(tmp_path), '--scenes',
                                             *keys, '--no-progress']) == 0
    assert (tmp_path / keys[0] / 'transforms.json').read_bytes() == done
    with pytest.raises(ExportError, match='no scene'):
        export_nerfstudio(str(shards), str(tmp_path / 'x'), scenes=['nope'], progress=False)


def _rewrite_first_sample(shards, out, change):
    """A copy of the shard directory whose first sample's members pass through ``change``
    (a test-only tar rewrite; the exporter still reads it through pipeline.reader)."""
    import shutil
    shutil.copytree(shards, out)
    url = shard_urls(str(out), splits_in(str(out))[0])[0]
    samples = list(iter_shard(url))
    with tarfile.open(url, 'w') as tar:
        for n, sample in enumerate(samples):
            members = {k: v for k, v in sample.items() if not k.startswith('__')}
            if n == 0:
                members = change(members)
            for member, data in sorted(members.items()):
                info = tarfile.TarInfo(f'{sample["__key__"]}.{member}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return samples[0]['__key__']


def test_nerfstudio_per_frame_intrinsics_and_distortion(shards_of, tmp_path):
    coeffs = {'k1': 0.01, 'k2': -0.002, 'k3': 0.0, 'k4': 0.0, 'p1': 1e-4, 'p2': -2e-4}

    def change(members):
        meta = json.loads(members['meta.json'])
        meta['distortion'] = {'model': 'OPENCV', 'coeffs': coeffs, 'note': 'test'}
        members['meta.json'] = json.dumps(meta).encode()
        with np.load(io.BytesIO(members['cameras.npz'])) as npz:
            K, c2w = npz['K'].copy(), npz['c2w']
        K[1, 0, 0] *= 1.5  # view 1 differs
        buf = io.BytesIO()
        np.savez(buf, K=K, c2w=c2w)
        members['cameras.npz'] = buf.getvalue()
        return members

    shards = tmp_path / 'shards'
    key = _rewrite_first_sample(shards_of('nmr'), shards, change)
    export_nerfstudio(str(shards), str(tmp_path / 'out'), scenes=[key], progress=False)
    meta, frames = nerfstudio_load(tmp_path / 'out' / key)
    assert meta['camera_model'] == 'OPENCV' and {k: meta[k] for k in coeffs} == coeffs
    assert 'fl_x' not in meta and all('fl_x' in f and 'w' in f for _, _, _, f in frames)
    scene = next(s for s in scenes(shards, splits_in(str(shards))[0]) if s.key == key)
    for v, (_, o, d, _) in enumerate(frames):
        h, w = scene.image_size(v)
        assert close(d, C.image_rays(scene.K[v], scene.c2w[v], h, w)[1])
