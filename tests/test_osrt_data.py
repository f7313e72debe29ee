"""OSRT's data on shards: MSN-Hard (TFDS 2.8.0) and CLEVR3D instance masks carried unchanged, and
items whose masks are what OSRT's loaders build, re-implemented here from stelzner/osrt (a4764e8):
``osrt/data/multishapenet.py:109-121`` (MSN-Hard, read through sunds as OSRT reads it) and
``osrt/data/obsurf.py:91-94,117-119,126,146-147`` (CLEVR3D)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import convert_format_main
from pipeline.convert import ConvertConfig, convert
from pipeline.decode import float32_from_rgba
from pipeline.index import SceneIndex
from pipeline.reader import Scene
from pipeline.synthetic import write_obsurf
from srt import config as run_config
from srt.data import DataConfig, collate, make_item, to_model_inputs

INPUTS, TARGETS = [3, 0, 7, 9, 1], [2, 4, 5, 6, 8]


def osrt_msn_masks(instance_image: np.ndarray) -> np.ndarray:
    """multishapenet.py:112-114: one-hot over 34 channels of clip(id, 1, 34) - 1 ([10, h, w, 1] ->
    [10, h, w, 34]; OSRT writes the shape as (10, 128, 128, 34), the data's own size here)."""
    instance_indexes = instance_image.clip(1, 34) - 1
    masks = np.zeros(instance_image.shape[:3] + (34,), dtype=np.uint8)
    np.put_along_axis(masks, instance_indexes, 1, axis=-1)
    return masks


def batch_of(cfg, scene, inputs, targets, rng=None):
    return to_model_inputs(collate([make_item(cfg, scene, inputs, targets, rng)]))


def sunds_examples(root):
    """OSRT's read of MSN-Hard (multishapenet.py:24-31): sunds' Nerf task, stacked cameras."""
    import sunds
    builder = sunds.builder('multi_shapenet', data_dir=str(root))
    ds = builder.as_dataset(split='train', task=sunds.tasks.Nerf(
        yield_mode='stacked', additional_camera_specs={'instance_image'}))
    return list(ds.as_numpy_iterator())


def test_msn_hard_masks_are_osrts(msn_hard_source, msn_hard_shards):
    examples = sunds_examples(msn_hard_source.root)
    assert len(examples) == 2
    index = SceneIndex(str(msn_hard_shards), 'train')
    for ex in examples:
        scene = Scene(index.read_sample(f'msn_hard_train_{ex["scene_name"].decode()}'))
        ref = osrt_msn_masks(ex['instance_image'])  # [10, h, w, 34]
        assert ref[..., 0].any() and ref[..., 1:].any()  # background and objects both present
        cfg = DataConfig('msn_hard', canonical_view=False, full_scale=True)  # masks: on for msn_hard
        batch = batch_of(cfg, scene, INPUTS, TARGETS)
        inputs = torch.nn.functional.one_hot(batch['input_mask_ids'][0], 34).numpy()
        np.testing.assert_array_equal(inputs, ref[INPUTS])  # input_masks [5, h, w, 34]
        np.testing.assert_array_equal(batch['target_masks'][0].numpy(), ref[TARGETS].reshape(-1, 34))
        colour = ex['color_image'].astype(np.float32) / 255.  # multishapenet.py:63
        np.testing.assert_array_equal(batch['input_images'][0].numpy(),
                                      colour[INPUTS].transpose(0, 3, 1, 2))
        # Cameras as OSRT reads them in world coordinates (multishapenet.py:64-65, :71-72).
        np.testing.assert_allclose(batch['input_rays'][0].numpy(), ex['ray_directions'][INPUTS],
                                   atol=1e-5)
        np.testing.assert_allclose(batch['input_camera_pos'][0].numpy(),
                                   ex['ray_origins'][INPUTS][:, 0, 0], atol=1e-5)
        np.testing.assert_allclose(batch['target_rays'][0].numpy(),
                                   ex['ray_directions'][TARGETS].reshape(-1, 3), atol=1e-5)
        np.testing.assert_allclose(batch['target_camera_pos'][0].numpy(),
                                   ex['ray_origins'][TARGETS].reshape(-1, 3), atol=1e-5)
        # Sampled targets: masks at the same pixel indices as the pixels (multishapenet.py:116-120).
        sampled = DataConfig('msn_hard', canonical_view=False, num_points=300)
        item = make_item(sampled, scene, INPUTS, TARGETS, np.random.default_rng(0))
        h, w = scene.height, scene.width
        flat = item['target_view'] * h * w + item['target_uv'][:, 1] * w + item['target_uv'][:, 0]
        batch = to_model_inputs(collate([item]))
        np.testing.assert_array_equal(batch['target_masks'][0].numpy(),
                                      ref[TARGETS].reshape(-1, 34)[flat])
        np.testing.assert_array_equal(item['target_pixels'],
                                      ex['color_image'][TARGETS].reshape(-1, 3)[flat])


def test_msn_hard_extras_are_the_sources_bytes(msn_hard_source, msn_hard_shards):
    """instance/category PNGs byte for byte; depth (TFDS's float32 image: the float's bytes in an
    RGBA PNG) decodes to exactly what tfds decodes."""
    from pipeline.sources.msn import import_tensorflow
    import_tensorflow()
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(str(msn_hard_source.dataset_dir))
    skip = {f'camera_{i}': {k: tfds.decode.SkipDecoding() for k in
                            ('instance_image', 'category_image', 'depth_image')} for i in range(10)}
    raw = {ex['scene_name'].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(
        split='train', decoders={'cameras': skip}))}
    decoded = {ex['scene_name'].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split='train'))}
    index = SceneIndex(str(msn_hard_shards), 'train')
    for name in raw:
        sample = index.read_sample(f'msn_hard_train_{name}')
        scene = Scene(sample)
        assert scene.meta['extras'] == ['category', 'depth', 'instance']
        for v in range(10):
            cam = raw[name]['cameras'][f'camera_{v}']
            for kind in ('instance', 'category', 'depth'):
                assert sample[f'{kind}_{v:03d}.png'] == cam[f'{kind}_image'], (name, v, kind)
            depth = decoded[name]['cameras'][f'camera_{v}']['depth_image']
            assert depth.dtype == np.float32 and np.isfinite(depth).any()
            np.testing.assert_array_equal(float32_from_rgba(scene.extra('depth', v)), depth)


@pytest.fixture(scope='module')
def clevr3d_with_masks(tmp_path_factory):
    src = write_obsurf(tmp_path_factory.mktemp('clevr3d_src'), 1, seed=2, variant='clevr3d',
                       split_sizes={'train': 1}, workers=1)
    out = tmp_path_factory.mktemp('clevr3d_shards')
    convert(ConvertConfig(dataset='clevr3d', src=str(src.root), out=str(out), progress=False))
    return src.root, out


def test_clevr3d_masks_are_osrts(clevr3d_with_masks):
    root, shards = clevr3d_with_masks
    sample = SceneIndex(str(shards), 'train').read_sample('clevr3d_train_0')
    scene = Scene(sample)
    files = [root / 'masks' / f'masks_0_{v}.png' for v in range(3)]
    assert [sample[f'instance_{v:03d}.png'] for v in range(3)] == [f.read_bytes() for f in files]
    # obsurf.py:91-94 (11 channels for CLEVR3D, obsurf.py:46), :117-119 (input: downsampled
    # x[1::2, 1::2]), :126 + :146-147 (targets: all views, row-major).
    mask_idxs = [np.asarray(Image.open(f)) for f in files]
    masks = np.zeros((3, 240, 320, 11), dtype=np.uint8)
    np.put_along_axis(masks, np.expand_dims(mask_idxs, -1), 1, axis=-1)
    assert masks[..., 0].any() and masks[..., 1:].any()
    # masks: None turns them on for the OSRT model (model_masks), as OSRT's loader always has them
    cfg = run_config.build(run_config.reference_config('clevr3d', 'osrt'), full_scale=True).data
    for view in range(3):
        batch = batch_of(cfg, scene, [view], [0, 1, 2])
        inputs = torch.nn.functional.one_hot(batch['input_mask_ids'][0], 11).numpy()
        np.testing.assert_array_equal(inputs, masks[view][1::2, 1::2][None])
        np.testing.assert_array_equal(batch['target_masks'][0].numpy(), masks.reshape(-1, 11))
    # SRT's config of the same data leaves them out (stelzner/srt's loader has none).
    srt = run_config.build(run_config.reference_config('clevr3d', 'srt'), full_scale=True).data
    assert 'target_masks' not in batch_of(srt, scene, [0], [0, 1, 2])


def test_mask_settings_and_errors(msn_hard_shards):
    scene = Scene(SceneIndex(str(msn_hard_shards), 'train').read_sample(0))
    assert 'target_masks' not in batch_of(DataConfig('msn_hard', masks=False), scene, INPUTS,
                                          TARGETS, np.random.default_rng(0))
    item = make_item(DataConfig('msn_hard', num_points=50), scene, INPUTS, TARGETS,
                     np.random.default_rng(0))
    assert item['input_mask_ids'].dtype == np.uint8 and item['input_mask_ids'].shape == (5, 64, 64)
    assert item['target_mask_ids'].dtype == np.uint8 and item['target_mask_ids'].shape == (50,)
    scene.meta = {**scene.meta, 'extras': ['category']}  # a scene without instance masks
    assert 'target_mask_ids' not in make_item(DataConfig('msn_hard'), scene, INPUTS, TARGETS,
                                              np.random.default_rng(0))
    with pytest.raises(ValueError, match='no instance masks.*data.kwargs.masks is true'):
        make_item(DataConfig('msn_hard', masks=True), scene, INPUTS, TARGETS, np.random.default_rng(0))
    with pytest.raises(ValueError, match='data.kwargs.masks: nmr has no instance masks'):
        DataConfig('nmr', masks=True)
    # The reference's OSRT config for MSN-Hard ('dataset: osrt') resolves to ours with masks.
    cfg = run_config.resolve('msn_hard', str(run_config_path('msn_hard')), 'osrt')
    assert cfg.data.dataset == 'msn_hard' and cfg.data.model_masks and cfg.training.init == 'reference'
    assert run_config.resolve('msn_hard', None, 'osrt').model == cfg.model


def run_config_path(dataset):
    from tests.conftest import ROOT
    return ROOT / 'runs' / dataset / 'osrt' / 'config.yaml'


def test_convert_msn_picks_msn_hard_by_version(msn_hard_source, tmp_path):
    out = tmp_path / 'shards'
    args = ['--src', str(msn_hard_source.root), '--out', str(out), '--no-progress']
    assert convert_format_main('msn', args) == 0  # only 2.8.0 there: MSN-Hard
    manifest = json.loads((out / 'test.manifest.json').read_text())
    assert manifest['dataset'] == 'msn_hard' and manifest['num_scenes'] == 1
    assert any(m.startswith('instance_') for m in manifest['members'])
    assert convert_format_main('msn', args[:2] + ['--out', str(tmp_path / 'x'), '--version',
                                                  '2.3.3']) == 1
