"""SRT on the importers' datasets (srt/data.py generic mode): random input and target views of JPEG
shards, inputs resized with K scaled, the training stream, the default config, and
``python -m srt.train --shards <re10k shards>``."""
import io
import json
import subprocess

import numpy as np
import pytest
import torch
import yaml

from pipeline import cameras as C
from pipeline.convert import ConvertConfig, convert
from pipeline.reader import Scene, iter_shard, shard_urls
from pipeline.schema import META, rgb_member
from pipeline.synthetic import write_re10k
from srt import config as run_config
from srt.data import (DataConfig, collate, make_item, scene_item, sorted_sample,
                      to_model_inputs)
from srt.loader import TrainStream, shard_table
from tests.conftest import ENV, ROOT, TINY_TRAIN, losses, train_cmd


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    src = tmp_path_factory.mktemp('gen') / 're10k'
    write_re10k(src, 6, 1, split_sizes={'train': 4, 'test': 2}, views=(5, 7), workers=1)
    out = tmp_path_factory.mktemp('gen_shards') / 're10k'
    convert(ConvertConfig(dataset='re10k', src=str(src), out=str(out), scenes_per_shard=2,
                          progress=False, source_format='pixelsplat'))
    return out


def first_scene(shards):
    return Scene(next(iter_shard(shard_urls(str(shards), 'train')[0])))


def test_resized_inputs_keep_the_cameras_rays_and_targets_their_pixels(shards):
    scene = first_scene(shards)
    h, w = scene.image_size(0)
    cfg = DataConfig('re10k', num_points=64, input_size=[h // 2, w // 3])
    assert cfg.generic and cfg.num_input_views == 2
    inputs, targets = [3, 0], [1, 4]
    item = make_item(cfg, scene, inputs, targets, np.random.default_rng(0))
    x = to_model_inputs(collate([item]))
    assert x['input_images'].shape == (1, 2, 3, h // 2, w // 3)
    # input pixel (i, j) of the resized view sees along the original camera's ray through image
    # point ((j + .5) * 3, (i + .5) * 2), in the first input's frame (its own camera)
    T = C.invert_pose(scene.c2w[3])
    i, j = np.meshgrid(np.arange(h // 2), np.arange(w // 3), indexing='ij')
    pts = np.stack([(j + 0.5) * w / (w // 3), (i + 0.5) * h / (h // 2)], -1)
    for k, v in enumerate(inputs):
        _, d = C.rays_from_image_points(scene.K[v], T @ scene.c2w[v], pts)
        assert np.abs(x['input_rays'][0, k].numpy() - d).max() < 1e-5
    assert np.abs(x['input_camera_pos'][0, 0].numpy()).max() < 1e-6
    # targets: full-size pixels of the target views, rays through their pixel centres
    uv, view = item['target_uv'].astype(int), item['target_view'].astype(int)
    for n in range(0, 64, 7):
        v = targets[view[n]]
        assert (item['target_pixels'][n] == scene.image(v)[uv[n, 1], uv[n, 0]]).all()
        _, d = C.pixel_rays(scene.K[v], T @ scene.c2w[v], uv[n, 1], uv[n, 0])
        assert np.abs(x['target_rays'][0, n].numpy() - d).max() < 1e-5


def test_generic_views_and_the_training_stream(shards):
    cfg = DataConfig('re10k', num_points=32, num_target_views=3, input_size=[36, 64])
    scene = first_scene(shards)
    item = scene_item(cfg, scene, 0, np.random.default_rng(1))
    assert item['input_images'].shape == (2, 36, 64, 3) and item['target_M'].shape == (3, 3, 3)
    stream = iter(TrainStream(cfg, shard_table(str(shards), 'train'), 3, shards_per_visit=2,
                              item_buffer=4))
    for _ in range(3):  # scenes of 72x128 and 60x80 in one batch: inputs share input_size
        batch = next(stream)
        assert batch['input_images'].shape == (3, 2, 36, 64, 3)
        assert batch['target_pixels'].shape == (3, 32, 3)
    with pytest.raises(ValueError, match='differ in input_images .* set data.kwargs.input_size'):
        sizes = [scene_item(DataConfig('re10k'), Scene(s), 0, np.random.default_rng(0))
                 for url in shard_urls(str(shards), 'train') for s in iter_shard(url)]
        collate(sizes)
    with pytest.raises(ValueError, match='num_target_views applies to datasets outside SRT'):
        DataConfig('nmr', num_target_views=2)


def test_the_default_config_for_other_datasets_is_ours_and_shipped():
    cfg = run_config.resolve('re10k')
    assert cfg.data.generic and cfg.data.input_size == [180, 320]
    assert (cfg.data.num_input_views, cfg.data.num_target_views) == (2, 4)
    shipped = yaml.safe_load((ROOT / 'runs/generic/srt/config.yaml').read_text())
    assert shipped == run_config.GENERIC_CONFIGS['srt']
    via_file = run_config.resolve('acid', str(ROOT / 'runs/generic/srt/config.yaml'))
    assert via_file.data.dataset == 'acid' and via_file.to_dict()['data'] == \
        {**run_config.resolve('acid').to_dict()['data']}
    again = run_config.build(json.loads(json.dumps(cfg.to_dict())))  # as checkpoints store it
    assert again.data == cfg.data


def test_srt_trains_on_re10k_shards(shards, tmp_path):
    cfg = json.loads(json.dumps(TINY_TRAIN))
    cfg['data'] = {'dataset': 're10k', 'num_points': 32,
                   'kwargs': {'num_target_views': 2, 'input_size': [36, 64]}}
    config = tmp_path / 'tiny.yaml'
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(train_cmd(shards, config, tmp_path / 'run', '--max-it', 4,
                                    '--eval-every', 4), env=ENV, cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(losses(tmp_path / 'run')) == [1, 2, 3, 4]
    assert all(np.isfinite(v[0]) for v in losses(tmp_path / 'run').values())
    ckpt = torch.load(tmp_path / 'run/model.pt', weights_only=True)
    assert ckpt['config']['data']['dataset'] == 're10k'


# ----------------------------------------------------------------------------- fast paths

def test_sorted_sample_distinct_sorted_in_range_and_with_replacement_past_n():
    rng = np.random.default_rng(0)
    for n, k in ((2000, 100), (2000, 250), (5000, 1), (2000, 0), (500, 100), (100, 100), (9, 9)):
        for _ in range(20):  # sparse (8k <= n), near the boundary, dense (8k > n), k == n
            s = sorted_sample(rng, n, k)
            assert s.shape == (k,) and np.issubdtype(s.dtype, np.integer)
            assert (np.diff(s) > 0).all() and (k == 0 or (0 <= s[0] and s[-1] < n))
    assert sorted_sample(rng, 100, 100).tolist() == list(range(100))
    for _ in range(20):  # more than n: with replacement, sorted
        s = sorted_sample(rng, 10, 25)
        assert s.shape == (25,) and (np.diff(s) >= 0).all() and 0 <= s[0] and s[-1] < 10
        assert len(np.unique(s)) < 25


def test_sorted_sample_is_a_uniform_subset():
    """Sparse draws (n=2000, k=100) against a uniform k-subset: per-value counts (chi-square),
    each sorted position's mean (order statistics), adjacent pairs. Thresholds are 8+ standard
    deviations: a correct sampler fails with negligible probability, and the rng is seeded."""
    n, k, draws = 2000, 100, 3000
    rng = np.random.default_rng(12345)
    s = np.stack([sorted_sample(rng, n, k) for _ in range(draws)])  # [draws, k]
    counts = np.bincount(s.ravel(), minlength=n)
    expected = draws * k / n
    chi2 = ((counts - expected) ** 2 / expected).sum()  # ~ n - 1 = 1999 (sd 63)
    assert chi2 < (n - 1) + 8 * np.sqrt(2 * (n - 1)), chi2
    assert chi2 > (n - 1) - 8 * np.sqrt(2 * (n - 1)), chi2  # not too even either
    # j-th smallest of a uniform k-subset of 1..n: mean j(n+1)/(k+1), variance
    # j(k-j+1)(n+1)(n-k)/((k+1)^2 (k+2))
    j = np.arange(1, k + 1)
    mean = j * (n + 1) / (k + 1) - 1  # values from 0
    sd = np.sqrt(j * (k - j + 1) * (n + 1) * (n - k) / ((k + 1) ** 2 * (k + 2)) / draws)
    z = (s.mean(0) - mean) / sd
    assert np.abs(z).max() < 6, (np.abs(z).argmax(), np.abs(z).max())
    # both x and x + 1 drawn: k(k-1)/n adjacent pairs per draw (4.95), ~Poisson
    pairs = (np.diff(s, axis=1) == 1).sum()
    want = draws * k * (k - 1) / n
    assert abs(pairs - want) < 8 * np.sqrt(want), (pairs, want)


def test_collate_of_per_view_inputs_equals_stacked_inputs(shards):
    scene = first_scene(shards)
    cfg = DataConfig('re10k', num_points=32, num_target_views=2)  # inputs at their own size
    items = [make_item(cfg, scene, inputs, [1, 4], np.random.default_rng(i))
             for i, inputs in enumerate(([3, 0], [2, 1], [0, 0]))]
    assert all(isinstance(it['input_images'], tuple) for it in items)
    stacked = [{**it, 'input_images': np.stack(it['input_images'])} for it in items]
    got, want = collate(items), collate(stacked)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    assert got['input_images'].shape == (3, 2, *scene.image(0).shape)
    np.testing.assert_array_equal(got['input_images'][1, 0], scene.image(2))
    assert not np.shares_memory(got['input_images'], scene.image(3))  # a copy, not a view
    # mixed within a batch: per-view tuples and stacked arrays
    mixed = collate([items[0], stacked[1], items[2]])
    np.testing.assert_array_equal(mixed['input_images'], want['input_images'])
    odd = {**items[1], 'input_images': (items[1]['input_images'][0],
                                        items[1]['input_images'][1][:-1])}
    for batch in ([items[0], odd], [odd, items[0]], [odd]):
        with pytest.raises(ValueError, match='differ in input_images .* data.kwargs.input_size'):
            collate(batch)


def resized_scene(sample, h, w, mode, seed):
    """``sample`` (PNG views) with meta size h x w and views 0-2 replaced by random PNGs of that
    size in ``mode`` ('RGB' | 'RGBA')."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    meta = {**json.loads(bytes(sample[META])), 'height': h, 'width': w, 'image_mode': mode}
    meta.pop('image_sizes', None)
    out = {**sample, META: json.dumps(meta).encode()}
    for v in range(3):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(buf, 'PNG', compress_level=1)
        out[rgb_member(v)] = buf.getvalue()
    return out


def check_gather(sample, views, count, rng):
    """Scene.gather of sorted indices (per-view path) and of the same indices shuffled (general
    path) against the views' pixels."""
    scene = Scene(sample)
    h, w = scene.image_size(views[0])
    flat = np.sort(rng.integers(0, len(views) * h * w, count))  # repeats too
    perm = rng.permutation(count)
    sorted_pixels = Scene(sample).gather(views, flat)
    shuffled = Scene(sample).gather(views, flat[perm])
    np.testing.assert_array_equal(shuffled, sorted_pixels[perm])
    truth = np.concatenate([scene.image(v).reshape(-1, 3) for v in views])[flat]
    np.testing.assert_array_equal(sorted_pixels, truth)
    assert sorted_pixels.shape == (count, 3) and sorted_pixels.dtype == np.uint8
    return scene


@pytest.mark.parametrize('source', ['nmr', 'clevr3d', 'large RGB', 'large RGBA'])
def test_gather_of_sorted_indices_equals_the_general_path(shards_of, source):
    rng = np.random.default_rng(7)
    sample = next(iter_shard(shard_urls(str(shards_of('clevr3d' if 'RGBA' in source or
                                                       source == 'clevr3d' else 'nmr')),
                                        'train')[0]))
    if source.startswith('large'):  # views of >= 2**17 pixels: kept per view, not stacked
        sample = resized_scene(sample, 360, 400, source.split()[1], 1)
    scene = Scene(sample)
    assert scene._stacked == (not source.startswith('large'))
    rgba = source in ('clevr3d', 'large RGBA')
    assert (Scene(sample).decode([0])._pixels[0].shape[-1] == 4) == rgba
    for views, count in (([2, 0, 1], 3000), ([1], 500), ([0, 2], 1), ([0, 2], 0)):
        check_gather(sample, views, count, rng)
    # indices in the last view only: the other views' slices are empty
    h, w = scene.image_size(0)
    flat = np.sort(rng.choice(h * w, 50, replace=False)) + 2 * h * w
    np.testing.assert_array_equal(Scene(sample).gather([1, 0, 2], flat),
                                  scene.image(2).reshape(-1, 3)[flat - 2 * h * w])
