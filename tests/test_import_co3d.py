"""The CO3D v2 importer (pipeline/sources/co3d.py) on generated CO3D-like categories
(pipeline/synthetic/co3d.py): cameras against the generator's true rays and PyTorch3D's own
projection (re-implemented below from its code, file:line cited), bytes of images and extras, the
float16 depth rule, set lists as splits, and bad input."""
import gzip
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import cameras as C
from pipeline.convert import ConvertConfig, convert
from pipeline.reader import Scene, iter_shard, shard_urls
from pipeline.schema import SourceError
from pipeline.synthetic.co3d import co3d_sequence, write_co3d
from pipeline.synthetic.common import resolve_splits, tasks_of

SEED, N = 4, 6


def convert_co3d(src, out, **kw):
    kwargs = {k: kw.pop(k) for k in ('subset',) if k in kw}
    return convert(ConvertConfig(dataset=kw.pop('dataset', 'co3d'), source_format='co3d',
                                 src=str(src), out=str(out), progress=False,
                                 source_kwargs=kwargs, **kw))


def scenes_of(out, split):
    return [Scene(s) for url in shard_urls(str(out), split) for s in iter_shard(url)]


def true_sequences(seed=SEED, n=N):
    """{'<category>/<sequence>': the generator's cameras} of a written set."""
    sizes = resolve_splits('co3d', n, None)
    out = {}
    for g, (_, _, split, i) in enumerate(tasks_of('co3d', seed, sizes)):
        seq = co3d_sequence(seed, split, i, g)
        out[f'{seq["category"]}/{seq["name"]}'] = seq
    return out


def pytorch3d_project(X, vp, H, W):
    """PyTorch3D's projection of world points X [n, 3] by a CO3D viewpoint: legacy NDC made
    isotropic (implicitron/dataset/frame_data.py:756-763), X_view = X @ R + T (renderer/cameras.py
    :1564-1602), NDC = f X_view[:2] / X_view[2] + p (the K of :1542-1554), screen = (W, H) / 2 -
    s NDC with s = min(H, W) / 2 (get_ndc_to_screen_transform with the xy flip, :1763-1830)."""
    f, p = np.asarray(vp['focal_length']), np.asarray(vp['principal_point'])
    if vp['intrinsics_format'] == 'ndc_norm_image_bounds':
        scale = np.array([W, H]) / min(W, H)
        f, p = f * scale, p * scale
    Xv = X @ np.asarray(vp['R']) + np.asarray(vp['T'])
    ndc = f * Xv[:, :2] / Xv[:, 2:] + p
    return np.array([W, H]) / 2.0 - min(H, W) / 2.0 * ndc


def annotations(src, category):
    with gzip.open(src / category / 'frame_annotations.jgz', 'rt') as f:
        return json.load(f)


@pytest.fixture(scope='module')
def co3d(tmp_path_factory):
    src = tmp_path_factory.mktemp('co3d_src')
    write_co3d(src, N, seed=SEED, workers=1)
    out = tmp_path_factory.mktemp('co3d_shards')
    convert_co3d(src, out)  # the only subsets are fewview_dev and manyview_dev_0: fewview_dev
    return src, out


def test_cameras_reproduce_true_rays_and_pytorch3d_projection(co3d):
    src, out = co3d
    truth = true_sequences()
    formats = set()
    rng = np.random.default_rng(0)
    for split in ('train', 'val', 'test'):
        for scene in scenes_of(out, split):
            seq = truth[scene.meta['scene_id']]
            H, W = seq['height'], seq['width']
            frames = {f['frame_number']: f for f in annotations(src, seq['category'])
                      if f['sequence_name'] == seq['name']}
            formats.add(seq['intrinsics_format'])
            assert scene.meta['image_sizes'] == [[H, W]] * len(seq['K'])
            for v in range(scene.num_views):
                o, d = C.image_rays(scene.K[v], scene.c2w[v], H, W)
                o_true, d_true = C.image_rays(seq['K'][v], seq['world_from_cam'][v], H, W)
                np.testing.assert_allclose(d, d_true, atol=1e-5)
                np.testing.assert_allclose(o, o_true, atol=1e-5)
                # points seen at known pixels project there through ours and through PyTorch3D's
                rows, cols = rng.integers(0, H, 30), rng.integers(0, W, 30)
                X = o_true[0, 0] + d_true[rows, cols] * rng.uniform(1, 10, (30, 1))
                want = np.stack([cols, rows], -1) + 0.5
                Xc = C.transform_points(X, C.invert_pose(scene.c2w[v]))
                ours = Xc[:, :2] / Xc[:, 2:] @ scene.K[v][:2, :2].T + scene.K[v][:2, 2]
                np.testing.assert_allclose(ours, want, atol=1e-5)
                np.testing.assert_allclose(pytorch3d_project(X, frames[v]['viewpoint'], H, W),
                                           want, atol=1e-5)
    assert formats == {'ndc_norm_image_bounds', 'ndc_isotropic'}


def test_bytes_extras_and_depth_rule(co3d):
    src, out = co3d
    truth = true_sequences()
    scene = scenes_of(out, 'train')[0]
    seq = truth[scene.meta['scene_id']]
    base = src / scene.meta['scene_id']
    assert scene.meta['views'] == [f'frame{v + 1:06d}.jpg' for v in range(6)]
    assert scene.meta['source']['frame_numbers'] == list(range(6))
    assert scene.meta['extras'] == ['depth', 'depth_mask', 'mask']
    info = scene.meta['extras_info']
    assert info['depth']['scale_adjustment'] == pytest.approx(list(seq['scale_adjustment']))
    for v in range(6):
        stem = f'frame{v + 1:06d}'
        assert scene.sample[f'rgb_{v:03d}.jpg'] == (base / 'images' / f'{stem}.jpg').read_bytes()
        assert scene.sample[f'mask_{v:03d}.png'] == (base / 'masks' / f'{stem}.png').read_bytes()
        assert scene.sample[f'depth_mask_{v:03d}.png'] == \
            (base / 'depth_masks' / f'{stem}.png').read_bytes()
        data = scene.sample[f'depth_{v:03d}.png']
        assert data == (base / 'depths' / f'{stem}.jpg.geometric.png').read_bytes()
        # the documented rule: float16 bits of a uint16 PNG, times the view's scale_adjustment
        pil = Image.open(io.BytesIO(data))
        depth = np.frombuffer(np.array(pil, dtype=np.uint16), dtype=np.float16).astype(
            np.float64).reshape(pil.size[1], pil.size[0]) * info['depth']['scale_adjustment'][v]
        _, dirs = C.image_rays(seq['K'][v], seq['world_from_cam'][v], seq['height'], seq['width'])
        hit = depth > 0
        assert hit.mean() > 0.3
        # the ray of each pixel reaches the depth's z at a point in front of the camera
        z_axis = seq['world_from_cam'][v][:3, 2]
        assert np.all((dirs[hit] @ z_axis) > 0)
    m = scene.meta
    assert m['source_format'] == 'co3d_v2' and m['source']['category'] == seq['category']
    assert m['source']['sequence_annotation']['sequence_name'] == seq['name']
    assert m['height'] == seq['height'] and m['image_format'] == 'jpeg'


def test_many_view_subset_puts_a_sequence_in_two_splits(co3d, tmp_path):
    src, _ = co3d
    convert_co3d(src, tmp_path, subset='manyview_dev_0')
    train, test = scenes_of(tmp_path, 'train'), scenes_of(tmp_path, 'test')
    assert [s.meta['scene_id'] for s in train] == [s.meta['scene_id'] for s in test]
    for a, b in zip(train, test):
        fa, fb = a.meta['source']['frame_numbers'], b.meta['source']['frame_numbers']
        assert fa == [1, 2, 4, 5] and fb == [0, 3]
        assert a.meta['source']['frames_in_other_splits'] == {'test': [0, 3]}
        assert b.meta['source']['frames_in_other_splits'] == {'train': [1, 2, 4, 5]}
        assert a.key != b.key


def test_verify_and_plain_webdataset(co3d):
    import webdataset as wds

    from pipeline import verify
    _, out = co3d
    assert verify.verify(str(out), progress=False) == []
    samples = list(wds.WebDataset(shard_urls(str(out), 'train'), shardshuffle=False).decode('rgb8'))
    assert len(samples) == 4
    assert samples[0]['rgb_000.jpg'].ndim == 3 and samples[0]['mask_000.png'].ndim >= 2


def _break(src, category, edit):
    frames = annotations(src, category)
    edit(frames)
    with gzip.open(src / category / 'frame_annotations.jgz', 'wt') as f:
        json.dump(frames, f)


def test_missing_image_duplicate_frame_and_wrong_size(co3d, tmp_path):
    src = tmp_path / 'src'
    shutil.copytree(co3d[0], src)
    lists = json.loads((src / 'synth_a/set_lists/set_lists_fewview_dev.json').read_text())
    victim = 'synth_a/' + sorted({seq for seq, _, _ in lists['train']})[0]
    # a frame whose image file is missing
    (src / victim / 'images' / 'frame000003.jpg').unlink()
    with pytest.raises(SourceError, match=r'frame000003\.jpg: missing view image'):
        convert_co3d(src, tmp_path / 'out', splits=['train'])
    convert_co3d(src, tmp_path / 'out2', splits=['train'], skip_bad=True)
    skipped = [json.loads(x) for x in (tmp_path / 'out2' / 'train.skipped.jsonl').read_text().splitlines()]
    assert [s['source_ref'] for s in skipped] == [victim]
    assert skipped[0]['scene_id'] == victim and skipped[0]['source_file'].endswith('frame000003.jpg')
    assert victim not in [s.meta['scene_id'] for s in scenes_of(tmp_path / 'out2', 'train')]
    # two frames with one frame_number
    name = victim.split('/')[1]

    def duplicate(frames):
        mine = [f for f in frames if f['sequence_name'] == name]
        mine[1]['frame_number'] = mine[0]['frame_number']
    _break(src, 'synth_a', duplicate)
    with pytest.raises(SourceError, match=f'sequence {name} has frame_number .* twice'):
        convert_co3d(src, tmp_path / 'out3', splits=['train'])


def test_annotation_size_must_match_the_image(co3d, tmp_path):
    src = tmp_path / 'src'
    shutil.copytree(co3d[0], src)

    def wrong(frames):
        frames[0]['image']['size'] = [frames[0]['image']['size'][0] + 2, frames[0]['image']['size'][1]]
    _break(src, 'synth_b', wrong)
    with pytest.raises(SourceError, match=r'image is \d+x\d+, the annotation says image.size'):
        convert_co3d(src, tmp_path / 'out')


def test_null_viewpoint_and_categories_without_a_common_subset_are_named(co3d, tmp_path):
    """A frame whose viewpoint is null (data_types.py allows it) is named, not a TypeError; two
    categories that share no set list are named with what each has."""
    src = tmp_path / 'src'
    shutil.copytree(co3d[0], src)
    _break(src, 'synth_b', lambda frames: frames[0].__setitem__('viewpoint', None))
    with pytest.raises(SourceError, match=r'frame_annotations\.jgz: sequence \S+ frame \d+: '
                                          r'viewpoint is null'):
        convert_co3d(src, tmp_path / 'out')
    for lists in (src / 'synth_b' / 'set_lists').glob('set_lists_*.json'):
        lists.rename(lists.with_name('set_lists_fewview_other.json'))
    with pytest.raises(SourceError, match=r"share no set list \(synth_a: \['fewview_dev'.*synth_b: "
                                          r"\['fewview_other'\]\)"):
        convert_co3d(src, tmp_path / 'out2')


def test_command_line(co3d, tmp_path, capsys):
    from pipeline.cli import convert_main
    src, _ = co3d
    assert convert_main(['co3d', '--src', str(src / 'synth_b'), '--out', str(tmp_path / 'out'),
                         '--subset', 'manyview_dev_0', '--dataset', 'co3d', '--no-progress']) == 0
    out = capsys.readouterr().out
    assert 'train: 1 scenes' in out and 'test: 1 scenes' in out
    assert scenes_of(tmp_path / 'out', 'test')[0].key.startswith('co3d_test_synth_b-')
    assert convert_main(['co3d', '--src', str(src), '--out', str(tmp_path / 'out2'),
                         '--subset', 'nosuch', '--no-progress']) == 1
    assert 'set_lists_nosuch.json' in capsys.readouterr().err
