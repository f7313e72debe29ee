"""pixelSplat exporter (pipeline/export/pixelsplat.py): chunks load with weights_only=True, pixelSplat's
own pose/image/ray code (re-implemented below, file:line cited) gives the shards' rays on a pixel
grid, the pixelSplat importer gives back the same scenes, cameras and image bytes, --size resizes and
crops with exact intrinsics, the evaluation index is carried, and runs are resumable, deterministic
and refuse a foreign directory."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import cameras as C
from pipeline.cli import export_format_main
from pipeline.export.common import ExportError
from pipeline.export.pixelsplat import export_pixelsplat
from pipeline.reader import Scene, iter_shard, shard_urls
from pipeline.verify import splits_in
from tests.conftest import reimported

DATASETS = ['nmr', 'clevr3d', 'msn', 're10k']


def scenes(shards, split):
    return [Scene(s) for url in shard_urls(str(shards), split) for s in iter_shard(url)]


def pixelsplat_load(stage_dir):
    """pixelSplat's reading of one stage: the sorted *.torch files (dataset_re10k.py:56-63), each
    torch.load-ed (weights_only here); per scene convert_poses (:179-200: K_n from row[:4],
    w2c 3x4 from row[6:], extrinsics = w2c.inverse()) and convert_images (:202-210: PIL.Image.open of
    the bytes, ToTensor). Returns {key: (extrinsics [V,4,4], K_n [V,3,3], images [V, 3, H, W])}."""
    out = {}
    for path in sorted(p for p in os.listdir(stage_dir) if p.endswith('.torch')):
        for entry in torch.load(os.path.join(stage_dir, path), weights_only=True):
            poses = entry['cameras']
            b = poses.shape[0]
            K = torch.eye(3, dtype=torch.float32).repeat(b, 1, 1)
            fx, fy, cx, cy = poses[:, :4].T
            K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2] = fx, fy, cx, cy
            w2c = torch.eye(4, dtype=torch.float32).repeat(b, 1, 1)
            w2c[:, :3] = poses[:, 6:].reshape(b, 3, 4)
            images = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(t.numpy().tobytes())),
                                                  np.float32) / 255).permute(2, 0, 1)
                      for t in entry['images']]
            assert entry['timestamps'].dtype == torch.int64 and isinstance(entry['url'], str)
            out[entry['key']] = (w2c.inverse(), K, images)
    return out


def pixelsplat_rays(extrinsics, K_n, h, w):
    """pixelSplat's rays at every pixel centre (src/geometry/projection.py:74-137): image point
    ((j + .5) / W, (i + .5) / H), d = normalize(K_n^-1 [x, y, 1]) in the camera, rotated by the c2w
    extrinsics; origin = its translation."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing='ij')
    xy1 = torch.stack([xs, ys, torch.ones_like(xs)], -1).double()
    d = xy1 @ torch.linalg.inv(K_n.double()).T
    d = torch.nn.functional.normalize(d, dim=-1) @ extrinsics[:3, :3].double().T
    return extrinsics[:3, 3].double().expand_as(d).numpy(), d.numpy()


@pytest.fixture(scope='module')
def exported(shards_of, tmp_path_factory):
    made = {}
    for name in DATASETS:
        out = tmp_path_factory.mktemp(f'ps_{name}')
        shutil.rmtree(out)
        export_pixelsplat(str(shards_of(name)), str(out), chunk_bytes=30_000, progress=False)
        made[name] = out
    return made


@pytest.mark.parametrize('name', DATASETS)
def test_pixelsplats_loader_gives_the_shards_rays_and_pixels(name, shards_of, exported):
    shards = shards_of(name)
    for split in splits_in(str(shards)):
        ours = scenes(shards, split)
        if not ours:
            continue
        theirs = pixelsplat_load(exported[name] / split)
        index = json.loads((exported[name] / split / 'index.json').read_text())
        assert set(theirs) == set(index) == {s.key for s in ours}  # named by our sample keys
        assert all((exported[name] / split / index[s.key]).is_file() for s in ours)
        for scene in ours:
            extrinsics, K_n, images = theirs[scene.key]
            assert len(images) == scene.num_views
            for v in range(0, scene.num_views, 3):  # every 3rd view: enough, and fast
                h, w = scene.image_size(v)
                assert tuple(images[v].shape) == (3, h, w)  # RGB, also from RGBA sources
                assert np.array_equal((images[v].permute(1, 2, 0).numpy() * 255).round()
                                      .astype(np.uint8), scene.image(v))
                o, d = pixelsplat_rays(extrinsics[v], K_n[v], h, w)
                o_ref, d_ref = C.image_rays(scene.K[v], scene.c2w[v], h, w)
                assert np.abs(d - d_ref).max() < 1e-5  # float32 cameras
                assert np.abs(o - o_ref).max() < 1e-5 * max(1.0, np.abs(o_ref).max())


@pytest.mark.parametrize('name', DATASETS)
def test_reimport_gives_back_scenes_cameras_and_bytes(name, shards_of, exported, tmp_path):
    shards = shards_of(name)
    for ours, back in reimported(shards, exported[name], 'pixelsplat', tmp_path):
        assert sorted(back) == sorted(s.key for s in ours)
        for scene in ours:
            got = back[scene.key]
            assert got.num_views == scene.num_views
            # float32 storage: relative to each matrix's scale
            assert np.abs(got.K - scene.K).max() <= 1e-6 * np.abs(scene.K).max()
            assert np.abs(got.c2w - scene.c2w).max() <= 1e-6 * max(1.0, np.abs(scene.c2w).max())
            assert got.timestamps == (scene.timestamps or list(range(scene.num_views)))
            for v in range(scene.num_views):
                if scene.meta['image_mode'] == 'RGB':  # the codec was kept: the same bytes
                    assert got.image_bytes(v) == scene.image_bytes(v)
                else:  # RGBA -> RGB PNG: the same pixels
                    assert np.array_equal(got.image(v), scene.image(v))
    if name == 're10k':  # the carried evaluation index comes back under the new keys
        carried = json.loads((shards / 'test.evaluation_index.json').read_text())
        exported_index = json.loads((exported[name] / 'evaluation_index_re10k.json').read_text())
        assert exported_index == carried and None in carried.values()
        again = json.loads((tmp_path / 'test.evaluation_index.json').read_text())
        assert again == {f'back_test_{k}': v for k, v in carried.items()}


def test_size_resizes_and_crops_with_exact_intrinsics(shards_of, tmp_path):
    shards = shards_of('re10k')  # views of 72x128 and 60x80
    export_pixelsplat(str(shards), str(tmp_path / 'o'), splits=['test'], size=(48, 64),
                      progress=False)
    theirs = pixelsplat_load(tmp_path / 'o' / 'test')
    sizes = set()
    for scene in scenes(shards, 'test'):
        extrinsics, K_n, images = theirs[scene.key]
        h, w = scene.image_size(0)
        sizes.add((h, w))
        scale = max(48 / h, 64 / w)
        rh, rw = round(h * scale), round(w * scale)
        r0, c0 = (rh - 48) // 2, (rw - 64) // 2
        for v in range(scene.num_views):
            assert tuple(images[v].shape) == (3, 48, 64)
            o, d = pixelsplat_rays(extrinsics[v], K_n[v], 48, 64)
            # an output pixel centre is the source image point ((j + .5 + c0) w / rw, ...)
            pts = (C.pixel_centers(48, 64) + [c0, r0]) * [w / rw, h / rh]
            o_ref, d_ref = C.rays_from_image_points(scene.K[v], scene.c2w[v], pts)
            assert np.abs(d - d_ref).max() < 1e-5
            # and its colour is the source's there, up to resampling (smooth renders)
            src = scene.image(v).astype(np.float64)
            got = images[v].permute(1, 2, 0).numpy() * 255
            ii, jj = np.clip(pts[..., 1].astype(int), 0, h - 1), np.clip(pts[..., 0].astype(int),
                                                                          0, w - 1)
            assert np.median(np.abs(got - src[ii, jj])) < 12
    assert len(sizes) == 2


def test_jpeg_quality_reencodes_png_views(shards_of, tmp_path):
    export_pixelsplat(str(shards_of('nmr')), str(tmp_path), splits=['val'], jpeg_quality=95,
                      progress=False)
    theirs = pixelsplat_load(tmp_path / 'val')
    for scene in scenes(shards_of('nmr'), 'val'):
        images = theirs[scene.key][2]
        entry_bytes = [t for f in sorted(os.listdir(tmp_path / 'val')) if f.endswith('.torch')
                       for e in torch.load(tmp_path / 'val' / f, weights_only=True)
                       if e['key'] == scene.key for t in e['images']]
        assert all(bytes(t[:2].tolist()) == b'\xff\xd8' for t in entry_bytes)  # JPEG
        err = np.abs(images[0].permute(1, 2, 0).numpy() * 255 - scene.image(0)).mean()
        assert 0 < err < 3


def test_runs_are_deterministic_resumable_and_refuse_foreign_dirs(shards_of, tmp_path):
    shards = str(shards_of('re10k'))
    a, b = tmp_path / 'a', tmp_path / 'b'
    export_pixelsplat(shards, str(a), chunk_bytes=20_000, progress=False)
    export_pixelsplat(shards, str(b), chunk_bytes=20_000, progress=False)
    # a run stopped after its first chunk of test: the later chunks and index.json are missing
    record = b / '.export' / 'test.chunks.json'
    done = json.loads(record.read_text())
    assert len(done) >= 3
    record.write_text(json.dumps(done[:1]))
    for r in done[1:]:
        (b / 'test' / r['chunk']).unlink()
    (b / 'test' / 'index.json').unlink()
    assert export_format_main('pixelsplat', [shards, '--out', str(b), '--chunk-mb', '0.02',
                                             '--no-progress']) == 0
    files = sorted(p.relative_to(a) for p in a.rglob('*') if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob('*') if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    with pytest.raises(ExportError, match='other settings'):
        export_pixelsplat(shards, str(a), chunk_bytes=10_000, progress=False)
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'notes.txt').write_text('mine')
    with pytest.raises(ExportError, match='not written by srt-shards export'):
        export_pixelsplat(shards, str(tmp_path / 'foreign'), progress=False)
    assert export_format_main('pixelsplat', [shards, '--out', str(tmp_path / 'foreign')]) == 1
