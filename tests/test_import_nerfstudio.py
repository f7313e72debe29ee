"""The nerfstudio / DL3DV importer (pipeline/sources/nerfstudio.py) on generated DL3DV-like captures
(pipeline/synthetic/dl3dv.py): cameras against the generator's true rays and against nerfstudio's
own ray formula (re-implemented below from its code, file:line cited), bytes, layouts, frame order,
both intrinsics and distortion spellings, and bad input."""
import json
import pathlib
import shutil

import numpy as np
import pytest

from pipeline import cameras as C
from pipeline.convert import ConvertConfig, convert
from pipeline.reader import Scene, iter_shard, shard_urls
from pipeline.schema import SourceError
from pipeline.synthetic.dl3dv import (APPLIED_TRANSFORM, DOWNSCALE, SUBSET, capture_name,
                                      capture_rays, dl3dv_capture, write_dl3dv)

GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def convert_ns(src, out, **kw):
    kwargs = {k: kw.pop(k) for k in ('downscale', 'split') if k in kw}
    return convert(ConvertConfig(dataset=kw.pop('dataset', 'dl3dv'), source_format='nerfstudio',
                                 src=str(src), out=str(out), progress=False,
                                 source_kwargs=kwargs, **kw))


def scenes_of(out, split='train'):
    return [Scene(s) for url in shard_urls(str(out), split) for s in iter_shard(url)]


# ----------------------------------------------------------------------------- nerfstudio's way

def ns_undistort(xd, yd, k):
    """nerfstudio camera_utils.py:375-417 radial_and_tangential_undistort (its 10 Newton steps,
    eps 1e-3 on the denominator), with _compute_residual_and_jacobian (:340-373)."""
    k1, k2, k3, k4, p1, p2 = k
    x, y = xd.copy(), yd.copy()
    for _ in range(10):
        r = x * x + y * y
        d = 1.0 + r * (k1 + r * (k2 + r * (k3 + r * k4)))
        fx = d * x + 2 * p1 * x * y + p2 * (r + 2 * x * x) - xd
        fy = d * y + 2 * p2 * x * y + p1 * (r + 2 * y * y) - yd
        d_r = k1 + r * (2.0 * k2 + r * (3.0 * k3 + r * 4.0 * k4))
        d_x, d_y = 2.0 * x * d_r, 2.0 * y * d_r
        fx_x = d + d_x * x + 2.0 * p1 * y + 6.0 * p2 * x
        fx_y = d_y * x + 2.0 * p1 * x + 2.0 * p2 * y
        fy_x = d_x * y + 2.0 * p2 * y + 2.0 * p1 * x
        fy_y = d + d_y * y + 2.0 * p2 * x + 6.0 * p1 * y
        den = fy_x * fx_y - fx_x * fy_y
        ok = np.abs(den) > 1e-3
        x = x + np.where(ok, (fx * fy_y - fy * fx_y) / np.where(ok, den, 1), 0)
        y = y + np.where(ok, (fy * fx_x - fx * fy_x) / np.where(ok, den, 1), 0)
    return x, y


def ns_distort(x, y, k):
    k1, k2, k3, k4, p1, p2 = k
    r = x * x + y * y
    d = 1.0 + r * (k1 + r * (k2 + r * (k3 + r * k4)))
    return x * d + 2 * p1 * x * y + p2 * (r + 2 * x * x), y * d + 2 * p2 * x * y + p1 * (r + 2 * y * y)


def ns_frames(capture_dir, N):
    """nerfstudio_dataparser.py:124-131 (frames re-ordered by np.argsort of the resolved image
    Paths, :461-491 _get_fname keeping only the file name under images_N) and :104-167 (top-level
    intrinsics and distortion), :314-315 + cameras.py:987-1015 (fx, fy, cx, cy times 1/N)."""
    meta = json.loads((capture_dir / 'transforms.json').read_text())
    fnames = [capture_dir / f'images_{N}' / pathlib.Path(f['file_path']).name for f in meta['frames']]
    frames = [meta['frames'][i] for i in np.argsort(fnames)]
    k = [meta.get(n, 0.0) for n in ('k1', 'k2', 'k3', 'k4', 'p1', 'p2')]
    intr = [meta[n] / N for n in ('fl_x', 'fl_y', 'cx', 'cy')]
    return frames, intr, k, (int(meta['h'] / N), int(meta['w'] / N))


def ns_rays(frame, intr, k, h, w):
    """cameras.py: pixel centres i + 0.5 (:293-318), coord = ((x - cx) / fx, (y - cy) / fy)
    (:622), undistort (:646-653), coord_y *= -1 (:656), d_cam = [x, y, -1] (:783-787),
    d = normalise(R @ d_cam) (:889-896), o = t (:898)."""
    fx, fy, cx, cy = intr
    y, x = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing='ij')
    cxn, cyn = ns_undistort((x - cx) / fx, (y - cy) / fy, k)
    d_cam = np.stack([cxn, -cyn, -np.ones_like(cxn)], -1)
    T = np.asarray(frame['transform_matrix'])
    d = d_cam @ T[:3, :3].T
    return T[:3, 3], d / np.linalg.norm(d, axis=-1, keepdims=True)


def our_rays(K, c2w, k, h, w):
    """Our stored pinhole camera plus the stored distortion: the pixel's undistorted position
    through K^-1, rotated by c2w (docs/SHARDS.md ray formula)."""
    uv = C.pixel_centers(h, w)
    xu, yu = ns_undistort((uv[..., 0] - K[0, 2]) / K[0, 0], (uv[..., 1] - K[1, 2]) / K[1, 1], k)
    undist = np.stack([xu * K[0, 0] + K[0, 2], yu * K[1, 1] + K[1, 2]], -1)
    return C.rays_from_image_points(K, c2w, undist)


def stored_k(meta):
    return [meta['distortion']['coeffs'][n] for n in ('k1', 'k2', 'k3', 'k4', 'p1', 'p2')]


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope='module')
def dl3dv(tmp_path_factory):
    src = tmp_path_factory.mktemp('dl3dv_src')
    write_dl3dv(src, 2, seed=3, workers=1)
    out = tmp_path_factory.mktemp('dl3dv_shards')
    convert_ns(src, out, downscale=DOWNSCALE)
    return src, out


def test_cameras_reproduce_true_rays_and_nerfstudio_rays(dl3dv):
    src, out = dl3dv
    scenes = scenes_of(out)
    assert [s.meta['scene_id'] for s in scenes] == [f'{SUBSET}/{capture_name(3, i)}' for i in range(2)]
    for i, scene in enumerate(scenes):
        cap = dl3dv_capture(3, i)
        saved_from_world = cap['saved_from_world']
        h, w = cap['height'], cap['width']
        k = stored_k(scene.meta)
        frames, intr, k_ns, size = ns_frames(src / SUBSET / capture_name(3, i), DOWNSCALE)
        assert size == (h, w) and k == pytest.approx(k_ns)
        for v in range(scene.num_views):
            # the pinhole part is the generator's camera, in the saved (applied_transform) world
            np.testing.assert_allclose(scene.K[v], cap['K'], atol=1e-9)
            np.testing.assert_allclose(scene.c2w[v], saved_from_world @ cap['world_from_cam'][v],
                                       atol=1e-9)
            o, d = our_rays(scene.K[v], scene.c2w[v], k, h, w)
            o_true, d_true = capture_rays(cap, v)  # the rays the image was rendered with
            np.testing.assert_allclose(d, d_true @ saved_from_world[:3, :3].T, atol=1e-5)
            np.testing.assert_allclose(o[0, 0], saved_from_world[:3, :3] @ o_true
                                       + saved_from_world[:3, 3], atol=1e-9)
            o_ns, d_ns = ns_rays(frames[v], intr, k_ns, h, w)
            np.testing.assert_allclose(d, d_ns, atol=1e-5)
            np.testing.assert_allclose(o[0, 0], o_ns, atol=1e-9)


def test_points_project_to_the_same_pixels_as_through_nerfstudio(dl3dv):
    src, out = dl3dv
    scene = scenes_of(out)[1]
    cap = dl3dv_capture(3, 1)
    frames, intr, k, _ = ns_frames(src / SUBSET / capture_name(3, 1), DOWNSCALE)
    rng = np.random.default_rng(0)
    for v in range(scene.num_views):
        o, d = capture_rays(cap, v)
        rows, cols = rng.integers(0, cap['height'], 40), rng.integers(0, cap['width'], 40)
        X = o + d[rows, cols] * rng.uniform(1, 20, (40, 1))
        X = X @ cap['saved_from_world'][:3, :3].T + cap['saved_from_world'][:3, 3]
        want = np.stack([cols, rows], -1) + 0.5
        # ours: OpenCV camera, then the stored distortion
        Xc = C.transform_points(X, C.invert_pose(scene.c2w[v]))
        xd, yd = ns_distort(Xc[:, 0] / Xc[:, 2], Xc[:, 1] / Xc[:, 2], stored_k(scene.meta))
        K = scene.K[v]
        ours = np.stack([K[0, 0] * xd + K[0, 2], K[1, 1] * yd + K[1, 2]], -1)
        # nerfstudio's: the inverse of its ray (camera looks down -z, y up), same distortion
        Xg = C.transform_points(X, np.linalg.inv(np.asarray(frames[v]['transform_matrix'])))
        xd, yd = ns_distort(Xg[:, 0] / -Xg[:, 2], -Xg[:, 1] / -Xg[:, 2], k)
        theirs = np.stack([intr[0] * xd + intr[2], intr[1] * yd + intr[3]], -1)
        np.testing.assert_allclose(ours, want, atol=1e-5)
        np.testing.assert_allclose(theirs, want, atol=1e-5)


def test_bytes_order_and_meta(dl3dv):
    src, out = dl3dv
    scene = scenes_of(out)[0]
    cdir = src / SUBSET / capture_name(3, 0)
    names = sorted(p.name for p in (cdir / 'images_4').iterdir())
    assert scene.meta['views'] == [f'images/{n}' for n in names]  # file order, not the JSON's
    assert scene.sample[f'rgb_{0:03d}.png'] == (cdir / 'images_4' / names[0]).read_bytes()
    for v, n in enumerate(names):
        assert scene.sample[f'rgb_{v:03d}.png'] == (cdir / 'images_4' / n).read_bytes()
    m = scene.meta
    assert m['source_format'] == 'nerfstudio' and m['dataset'] == 'dl3dv'
    assert m['world_frame']['applied_transform'] == APPLIED_TRANSFORM.tolist()
    assert m['world_frame']['applied_scale'] is None
    assert m['distortion']['model'] == 'OPENCV' and 'as captured' in m['distortion']['note']
    assert m['image_sizes'] == [[54, 96]] * 8 and m['image_format'] == 'png'
    assert m['up_axis'] is None and m['source']['downscale'] == 4


def test_verify_and_plain_webdataset(dl3dv):
    import webdataset as wds

    from pipeline import verify
    _, out = dl3dv
    assert verify.verify(str(out), progress=False) == []
    samples = list(wds.WebDataset(shard_urls(str(out), 'train'), shardshuffle=False).decode('rgb8'))
    assert len(samples) == 2
    assert samples[0]['rgb_007.png'].shape == (54, 96, 3)
    assert samples[0]['cameras.npz']['c2w'].shape == (8, 4, 4)


def test_jpeg_capture_per_frame_intrinsics_and_distortion_params(tmp_path):
    """Intrinsics in every frame and the distortion_params spelling give the same cameras; JPEG
    bytes are kept."""
    write_dl3dv(tmp_path / 'a', 1, seed=5, image_format='jpeg', workers=1)
    cdir = tmp_path / 'a' / SUBSET / capture_name(5, 0)
    convert_ns(cdir, tmp_path / 'out_a', downscale=4)  # a single capture folder as --src
    t = json.loads((cdir / 'transforms.json').read_text())
    shared = {k: t.pop(k) for k in ('fl_x', 'fl_y', 'cx', 'cy', 'w', 'h', 'k1', 'k2', 'p1', 'p2')}
    for f in t['frames']:
        f.update({k: shared[k] for k in ('fl_x', 'fl_y', 'cx', 'cy', 'w', 'h')})
        f['distortion_params'] = [shared['k1'], shared['k2'], 0, 0, shared['p1'], shared['p2']]
    (cdir / 'transforms.json').write_text(json.dumps(t))
    convert_ns(cdir, tmp_path / 'out_b', downscale=4)
    a, b = scenes_of(tmp_path / 'out_a')[0], scenes_of(tmp_path / 'out_b')[0]
    assert a.meta['scene_id'] == capture_name(5, 0) and a.meta['image_format'] == 'jpeg'
    np.testing.assert_array_equal(a.K, b.K)
    np.testing.assert_array_equal(a.c2w, b.c2w)
    assert a.meta['distortion']['coeffs'] == b.meta['distortion']['coeffs']
    assert a.sample['rgb_002.jpg'] == (cdir / 'images_4' / 'frame_00003.jpg').read_bytes()


def test_symlinked_captures_and_a_frames_own_perspective_camera_model(tmp_path):
    """A capture reached through a symlink converts (a link loop and a second link to the same
    capture add nothing); a frame's own camera_model is ignored as nerfstudio ignores it
    (nerfstudio_dataparser.py reads only meta["camera_model"])."""
    write_dl3dv(tmp_path / 'data', 2, seed=8, workers=1)
    names = [capture_name(8, i) for i in range(2)]
    src = tmp_path / 'src'
    (src / 'real').mkdir(parents=True)
    shutil.move(str(tmp_path / 'data' / SUBSET / names[0]), src / 'real' / names[0])
    (src / 'linked').symlink_to(tmp_path / 'data' / SUBSET, target_is_directory=True)
    (src / 'again').symlink_to(tmp_path / 'data' / SUBSET, target_is_directory=True)
    (src / 'real' / 'loop').symlink_to(src, target_is_directory=True)
    linked = tmp_path / 'data' / SUBSET / names[1] / 'transforms.json'
    t = json.loads(linked.read_text())
    model = t.pop('camera_model')
    for f in t['frames']:
        f['camera_model'] = model
    linked.write_text(json.dumps(t))
    convert_ns(src, tmp_path / 'out', downscale=4)
    got = {s.meta['scene_id']: s for s in scenes_of(tmp_path / 'out')}
    assert sorted(got) == [f'again/{names[1]}', f'real/{names[0]}']
    assert got[f'again/{names[1]}'].meta['distortion']['model'].startswith('PERSPECTIVE')
    cap = dl3dv_capture(8, 1)
    np.testing.assert_allclose(got[f'again/{names[1]}'].c2w,
                               cap['saved_from_world'] @ cap['world_from_cam'], atol=1e-9)


def test_benchmark_layout_lexicographic_order_and_auto_downscale(tmp_path):
    """DL3DV's benchmark layout <hash>/nerfstudio/; frames sorted as nerfstudio sorts paths
    (frame_10 before frame_9); without --downscale the one images_N folder is used."""
    write_dl3dv(tmp_path / 'gen', 1, seed=1, workers=1)
    cdir = tmp_path / 'bench' / 'abc' / 'nerfstudio'
    shutil.copytree(tmp_path / 'gen' / SUBSET / capture_name(1, 0), cdir)
    t = json.loads((cdir / 'transforms.json').read_text())
    for f in t['frames']:
        n = int(f['file_path'][-9:-4])
        f['file_path'] = f'images/frame_{n + 5}.png'  # frame_6 .. frame_13: not zero-padded
        (cdir / 'images_4' / f'frame_{n:05d}.png').rename(cdir / 'images_4' / f'frame_{n + 5}.png')
    (cdir / 'transforms.json').write_text(json.dumps(t))
    convert_ns(tmp_path / 'bench', tmp_path / 'out', dataset='dl3dv_bench')
    scene = scenes_of(tmp_path / 'out')[0]
    assert scene.meta['scene_id'] == 'abc/nerfstudio' and scene.meta['source']['downscale'] == 4
    assert scene.meta['views'] == [f'images/frame_{n}.png' for n in (10, 11, 12, 13, 6, 7, 8, 9)]
    cap = dl3dv_capture(1, 0)
    for v, n in enumerate((10, 11, 12, 13, 6, 7, 8, 9)):
        np.testing.assert_allclose(scene.c2w[v], cap['saved_from_world'] @ cap['world_from_cam'][n - 6],
                                   atol=1e-9)


BAD = {
    'nan pose': (lambda t, d: t['frames'][2]['transform_matrix'][0].__setitem__(3, float('nan')),
                 'frame images/frame_.*transform_matrix.*non-finite'),
    'not rigid': (lambda t, d: t['frames'][1].__setitem__(
        'transform_matrix', (np.diag([2.0, 2, 2, 1]) @ t['frames'][1]['transform_matrix']).tolist()),
                  'frame images/frame_.*not orthonormal'),
    'missing frame': (lambda t, d: (d / 'images_4' / 'frame_00004.png').unlink(),
                      'frame_00004.png: missing view image'),
    'per-frame fisheye': (lambda t, d: t['frames'][0].__setitem__('camera_model', 'OPENCV_FISHEYE'),
                          r'frame 0 .* has camera_model .OPENCV_FISHEYE., not a perspective model'),
    'no h': (lambda t, d: t.pop('h'), 'h is neither at the top level nor in the frame'),
    'fisheye': (lambda t, d: t.__setitem__('camera_model', 'OPENCV_FISHEYE'),
                'not a perspective model'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_capture_is_named_or_recorded_with_skip_bad(tmp_path, case):
    write_dl3dv(tmp_path / 'src', 2, seed=2, workers=1)
    cdir = tmp_path / 'src' / SUBSET / capture_name(2, 1)
    t = json.loads((cdir / 'transforms.json').read_text())
    edit, message = BAD[case]
    edit(t, cdir)
    (cdir / 'transforms.json').write_text(json.dumps(t))
    with pytest.raises(SourceError, match=message):
        convert_ns(tmp_path / 'src', tmp_path / 'out', downscale=4)
    assert not list((tmp_path / 'out').glob('*.tar'))
    convert_ns(tmp_path / 'src', tmp_path / 'out2', downscale=4, skip_bad=True)
    skipped = [json.loads(x) for x in (tmp_path / 'out2' / 'train.skipped.jsonl').read_text().splitlines()]
    assert [s['source_ref'] for s in skipped] == [f'{SUBSET}/{capture_name(2, 1)}']
    assert skipped[0]['scene_id'] == f'{SUBSET}/{capture_name(2, 1)}' and skipped[0]['source_file']
    assert [s.meta['scene_id'] for s in scenes_of(tmp_path / 'out2')] == [f'{SUBSET}/{capture_name(2, 0)}']


def test_wrong_downscale_names_the_expected_size(tmp_path):
    write_dl3dv(tmp_path / 'src', 1, seed=2, workers=1)
    (tmp_path / 'src' / SUBSET / capture_name(2, 0) / 'images_4').rename(
        tmp_path / 'src' / SUBSET / capture_name(2, 0) / 'images_8')
    with pytest.raises(SourceError, match=r'image is 96x54 .* floor\(w/N\) x floor\(h/N\) = 48x27'):
        convert_ns(tmp_path / 'src', tmp_path / 'out', downscale=8)


def test_command_line(tmp_path, capsys):
    from pipeline.cli import convert_main
    write_dl3dv(tmp_path / 'src', 1, seed=6, workers=1)
    assert convert_main(['nerfstudio', '--src', str(tmp_path / 'src'), '--out',
                         str(tmp_path / 'out'), '--dataset', 'dl3dv', '--downscale', '4',
                         '--splits', 'test', '--no-progress']) == 0
    assert 'test: 1 scenes in 1 shards' in capsys.readouterr().out
    scene = scenes_of(tmp_path / 'out', 'test')[0]
    assert scene.key == f'dl3dv_test_{SUBSET}-{capture_name(6, 0)}'
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert 'rgb_VVV.png' in card and 'dl3dv' in card
    assert convert_main(['nerfstudio', '--src', str(tmp_path / 'src'), '--out',
                         str(tmp_path / 'out2'), '--downscale', '8', '--no-progress']) == 1
    assert 'images_8/frame_00001.png: missing view image' in capsys.readouterr().err


def test_masks_are_extras_from_masks_n(tmp_path):
    """mask_path in every frame: the masks_N/ files become extras 'mask' (source bytes); in some
    frames only: named error, as nerfstudio asserts."""
    from PIL import Image
    write_dl3dv(tmp_path / 'src', 1, seed=7, workers=1)
    cdir = tmp_path / 'src' / SUBSET / capture_name(7, 0)
    (cdir / 'masks_4').mkdir()
    t = json.loads((cdir / 'transforms.json').read_text())
    for f in t['frames']:
        name = pathlib.Path(f['file_path']).name
        f['mask_path'] = f'masks/{name}'
        Image.new('L', (96, 54), 255).save(cdir / 'masks_4' / name)
    (cdir / 'transforms.json').write_text(json.dumps(t))
    convert_ns(tmp_path / 'src', tmp_path / 'out', downscale=4)
    scene = scenes_of(tmp_path / 'out')[0]
    assert scene.meta['extras'] == ['mask']
    assert scene.sample['mask_003.png'] == (cdir / 'masks_4' / 'frame_00004.png').read_bytes()
    del t['frames'][0]['mask_path']
    (cdir / 'transforms.json').write_text(json.dumps(t))
    with pytest.raises(SourceError, match='mask_path is given for 7 of 8 frames'):
        convert_ns(tmp_path / 'src', tmp_path / 'out2', downscale=4)
