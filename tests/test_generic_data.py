"""SRT on the importers' datasets (srt/data.py generic mode): random input and target views of JPEG
shards, inputs resized with K scaled, the training stream, the default config, and
``python -m srt.train --shards <re10k shards>``."""
import json
import subprocess

import numpy as np
import pytest
import torch
import yaml

from pipeline import cameras as C
from pipeline.convert import ConvertConfig, convert
from pipeline.reader import Scene, iter_shard, shard_urls
from pipeline.synthetic import write_re10k
from srt import config as run_config
from srt.data import DataConfig, collate, make_item, scene_item, to_model_inputs
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
