"""SRT batches from shards equal the reference loaders' batches for the same view choices."""
import json

import numpy as np
import pytest
import torch

from pipeline.convert import ConvertConfig, convert
from pipeline.index import SceneIndex
from pipeline.reader import Scene
from srt.data import DataConfig, collate, make_item, to_model_inputs
from tests.conftest import TESTVECTORS

REF = TESTVECTORS / 'reference'
INDEX = json.loads((REF / 'index.json').read_text())


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp('shards')
    for dataset, src in (('nmr', 'nmr'), ('clevr3d', 'clevr3d'), ('msn', 'msn')):
        convert(ConvertConfig(dataset=dataset, src=str(TESTVECTORS / 'sources' / src),
                              out=str(out / dataset), splits=['train'], progress=False))
    return out


def _cases():
    for name, info in INDEX.items():
        if 'sunds' in name:
            continue
        canonical = name.endswith('_canonical.npz')
        if info['dataset'] == 'msn':
            inputs = info['input_views']
            key = f'msn_train_{info["scene"]}'
        elif info['dataset'] == 'nmr':
            inputs = [info['input_view']]
            key = f'nmr_train_{info["scene"].replace("/", "-")}'
        else:
            inputs = [info['input_view']]
            key = f'clevr3d_train_{info["scene"]}'
        yield pytest.param(info['dataset'], key, inputs, canonical, name, id=name[:-4])


@pytest.mark.parametrize('dataset, key, inputs, canonical, ref_name', list(_cases()))
def test_batch_equals_reference(shards, dataset, key, inputs, canonical, ref_name):
    ref = np.load(REF / ref_name)
    cfg = DataConfig(dataset=dataset, canonical_view=canonical, full_scale=True)
    scene = Scene(SceneIndex(str(shards / dataset), 'train').read_sample(key))
    V = scene.num_views
    targets = ([v for v in range(V) if v not in inputs] if dataset != 'clevr3d' else list(range(V)))
    batch = to_model_inputs(collate([make_item(cfg, scene, inputs, targets, None)]))
    rows = ref['target_index']
    for name in ('input_rays', 'input_camera_pos'):
        assert np.abs(batch[name][0].numpy() - ref[name]).max() <= 1e-5, name
    for name in ('target_rays', 'target_camera_pos'):
        assert np.abs(batch[name][0].numpy()[rows] - ref[name]).max() <= 1e-5, name
    np.testing.assert_array_equal(batch['input_images'][0].numpy(), ref['input_images'])
    np.testing.assert_array_equal(batch['target_pixels'][0].numpy()[rows], ref['target_pixels'])
    assert ('transform' in batch) == canonical
    if canonical:
        assert np.abs(batch['transform'][0].numpy() - ref['transform']).max() <= 1e-5
    assert batch['input_images'].dtype == torch.float32


def test_sampled_targets_are_without_replacement_and_consistent(shards):
    cfg = DataConfig(dataset='msn', num_points=3000)
    scene = Scene(SceneIndex(str(shards / 'msn'), 'train').read_sample('msn_train_scene_7'))
    rng = np.random.default_rng(0)
    item = make_item(cfg, scene, [3, 0, 7, 9, 1], [2, 4, 5, 6, 8], rng)
    flat = (item['target_view'].astype(int) * 128 + item['target_uv'][:, 1]) * 128 + item['target_uv'][:, 0]
    assert len(np.unique(flat)) == 3000
    full = make_item(DataConfig(dataset='msn', full_scale=True), scene, [3, 0, 7, 9, 1],
                     [2, 4, 5, 6, 8], None)
    b_sampled = to_model_inputs(collate([item]))
    b_full = to_model_inputs(collate([full]))
    for name in ('target_rays', 'target_camera_pos', 'target_pixels'):
        np.testing.assert_allclose(b_sampled[name][0].numpy(), b_full[name][0].numpy()[flat], atol=1e-6)


def test_clevr_downsample_takes_every_second_pixel_from_one(shards):
    index = SceneIndex(str(shards / 'clevr3d'), 'train')
    scene = Scene(index.read_sample('clevr3d_train_0'))
    full = to_model_inputs(collate([make_item(DataConfig('clevr3d', full_scale=True), scene, [1],
                                              [0, 1, 2], None)]))
    half = to_model_inputs(collate([make_item(DataConfig('clevr3d', full_scale=True, downsample=1),
                                              scene, [1], [0, 1, 2], None)]))
    assert half['input_images'].shape == (1, 1, 3, 120, 160)
    torch.testing.assert_close(half['input_images'], full['input_images'][..., 1::2, 1::2])
    torch.testing.assert_close(half['input_rays'], full['input_rays'][:, :, 1::2, 1::2],
                               atol=1e-6, rtol=0)


def test_msn_input_view_count_and_downsample_are_configurable(shards):
    cfg = DataConfig.from_yaml({'dataset': 'msn', 'num_points': 16,
                                'kwargs': {'num_input_views': 3, 'downsample': 1}})
    scene = Scene(SceneIndex(str(shards / 'msn'), 'train').read_sample('msn_train_scene_8'))
    from srt.data import choose_views
    inputs, targets = choose_views(cfg, 10, 0, np.random.default_rng(0))
    assert len(inputs) == 3 and sorted(inputs + targets) == list(range(10))
    batch = to_model_inputs(collate([make_item(cfg, scene, inputs, targets, np.random.default_rng(0))]))
    assert batch['input_images'].shape == (1, 3, 3, 64, 64)
    with pytest.raises(ValueError, match='msn only'):
        DataConfig('nmr', num_input_views=2)


def test_msn_train_on_inputs_targets_every_view_but_evaluation_scores_novel_views(shards):
    from srt.data import choose_views
    from srt.loader import EvalStream, shard_table
    cfg = DataConfig.from_yaml({'dataset': 'msn', 'num_points': 16,
                                'kwargs': {'num_input_views': 3, 'train_on_inputs': True}})
    inputs, targets = choose_views(cfg, 10, 0, np.random.default_rng(0))
    assert len(inputs) == 3 and targets == list(range(10))
    plain, _ = choose_views(DataConfig('msn', num_input_views=3), 10, 0, np.random.default_rng(0))
    assert plain == inputs  # the same draw: only the targets differ
    cfg = DataConfig.from_yaml({'dataset': 'msn', 'num_points': 16,
                                'kwargs': {'num_input_views': 3, 'train_on_inputs': True}},
                               full_scale=True)
    batches = list(EvalStream(cfg, shard_table(str(shards / 'msn'), 'train'), 2))
    for batch in batches:  # 7 novel views of 128x128 pixels each, none of the inputs
        assert batch['target_pixels'].shape[1] == 7 * 128 * 128
