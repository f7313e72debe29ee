"""SRT MultiShapeNet format: a TFDS directory ``DIR/multi_shapenet_frames/2.3.3/`` in sunds' frame
layout with the test vector's ``features.json`` (10 cameras: ``color_image`` PNG 128x128x3,
``category_image`` 128x128x1 labelled ``CATEGORY_NAMES``, ``intrinsics``, ``extrinsics`` =
camera_from_frame (``cameras.opencv_to_sunds``), identity frame ``pose``, ``scene_name`` =
``frame_name`` = ``scene_<n>``), tfrecord files ``multi_shapenet_frames-<split>.tfrecord-
XXXXX-of-YYYYY`` and ``dataset_info.json``. Splits ``train`` and ``test`` as in MSN 2.3.3 (the
reference's training script evaluates on split ``val``: pass ``split_sizes`` with a ``val`` entry
to write one). Scene numbers: train from 0, val from 400000, test from 500000 (the test vector's
test scenes are ``scene_5000xx``). Variant ``msn-demo``: the same layout at 32x32 with the plain
'demo' scene style (1-2 objects near the centre) and a ring of cameras (``rigs.ring_cameras``).

Variants ``msn-hard`` / ``msn-hard-demo``: OSRT's MSN-Hard layout, ``DIR/multi_shapenet_frames/
2.8.0/`` with the TFDS name of sunds' builder (``kubric_frames``, tfrecords ``kubric_frames-<split>
.tfrecord-...``) and per camera also ``instance_image`` (``LabeledImage`` (h, w, 1) uint8, no label
names, as sunds declares it) and ``depth_image`` (``Image`` (h, w, 1) float32, which TFDS stores as
the float's 4 bytes in an RGBA PNG). Instance ids as OSRT reads them: 1 for the background (the
ground), objects from 2 (object i is i + 2), and 0 where a ray hits nothing (OSRT: "rendering
errors", background too); depth is the ray distance (inf where nothing is hit).

Only ``write_msn`` and ``msn_features`` import TensorFlow / tensorflow_datasets, inside the function.
"""
from __future__ import annotations

import itertools
import json
import math
import pathlib
from typing import Callable

import numpy as np

from pipeline.synthetic.common import (MSN_HARD_NAME, MSN_HARD_VERSION, MSN_NAME,
                                       MSN_SCENE_OFFSET, MSN_SIZE, MSN_SIZES, MSN_VERSION, MSN_VIEWS,
                                       WriteResult, png_bytes, render_all, render_scene,
                                       resolve_splits, tasks_of, write_marker)
from pipeline.synthetic.scene import CATEGORY_NAMES


def _encode(task: tuple[str, int, str, int]) -> dict:
    """Worker: render one scene and encode what MSN stores (module level: picklable)."""
    fmt, seed, split, index = task
    r = render_scene(fmt, seed, split, index)
    out = {'pngs': [png_bytes(im) for im in r['rgb']],
           'category_pngs': [png_bytes(c) for c in r['category']],  # 1-channel PNG
           'K32': r['K32'], 'R': r['R'], 't': r['t'], 'size': r['rgb'].shape[1]}
    if fmt.startswith('msn-hard'):
        out['instance'] = instance_ids(r['object_id'], r['depth'])[..., None]  # [v, h, w, 1]
        out['depth'] = r['depth'][..., None].astype(np.float32)  # tfds encodes it (RGBA PNG)
    return out


def instance_ids(object_id: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """MSN-Hard instance ids (uint8) of rendered object ids (0 background / ground, i + 1 object i):
    1 ground, i + 2 object i, 0 where the ray hits nothing (depth inf)."""
    ids = np.where(object_id > 0, object_id.astype(np.int64) + 1, 1)
    return np.where(np.isfinite(depth), ids, 0).astype(np.uint8)


def msn_features(num_views: int = MSN_VIEWS, height: int = MSN_SIZE, width: int = MSN_SIZE,
                 labels=CATEGORY_NAMES, hard: bool = False):
    """The ``tfds.features.FeaturesDict`` of multi_shapenet_frames 2.3.3 as the test vector
    declares it; ``hard``: with MSN-Hard's (2.8.0) instance and depth images, as sunds'
    ``camera_spec`` declares them (imports tensorflow_datasets)."""
    from pipeline.sources.msn import import_tensorflow
    import_tensorflow()
    import tensorflow_datasets as tfds
    F = tfds.features

    def rigid():
        return F.FeaturesDict({'R': F.Tensor(shape=(3, 3), dtype=np.float32),
                               't': F.Tensor(shape=(3,), dtype=np.float32)})

    def camera():
        hard_images = {'instance_image': F.LabeledImage(labels=None, shape=(height, width, 1)),
                       'depth_image': F.Image(shape=(height, width, 1), dtype=np.float32)}
        return F.FeaturesDict({
            **(hard_images if hard else {}),
            'category_image': F.LabeledImage(labels=list(labels), shape=(height, width, 1)),
            'color_image': F.Image(shape=(height, width, 3)),
            'extrinsics': rigid(),
            'intrinsics': F.FeaturesDict({
                'K': F.Tensor(shape=(3, 3), dtype=np.float32),
                'distortion': F.FeaturesDict({
                    'radial': F.Tensor(shape=(3,), dtype=np.float32),
                    'tangential': F.Tensor(shape=(2,), dtype=np.float32)}),
                'image_height': F.Tensor(shape=(), dtype=np.int32),
                'image_width': F.Tensor(shape=(), dtype=np.int32),
                'type': F.Text()}),
        })

    return F.FeaturesDict({
        'cameras': F.FeaturesDict({f'camera_{i}': camera() for i in range(num_views)}),
        'frame_name': F.Text(), 'pose': rigid(), 'scene_name': F.Text()})


def _msn_example(name: str, r: dict) -> dict:
    """The example dict of one rendered scene (PNG bytes pass through tfds' Image unchanged)."""
    cams = {}
    for i in range(MSN_VIEWS):
        cams[f'camera_{i}'] = {
            'category_image': r['category_pngs'][i], 'color_image': r['pngs'][i],
            'extrinsics': {'R': r['R'][i], 't': r['t'][i]},
            'intrinsics': {'K': r['K32'][i], 'image_height': np.int32(r['size']),
                           'image_width': np.int32(r['size']), 'type': 'PERSPECTIVE',
                           'distortion': {'radial': np.zeros(3, np.float32),
                                          'tangential': np.zeros(2, np.float32)}}}
        if 'instance' in r:
            cams[f'camera_{i}'].update(instance_image=r['instance'][i], depth_image=r['depth'][i])
    return {'cameras': cams, 'frame_name': name, 'scene_name': name,
            'pose': {'R': np.eye(3, dtype=np.float32), 't': np.zeros(3, np.float32)}}


def write_msn(out_dir, num_scenes: int, seed: int = 0, *, split_sizes: dict[str, int] | None = None,
              variant: str = 'msn',
              scenes_per_file: int = 256, workers: int | None = None,
              progress: Callable[[int], None] | None = None) -> WriteResult:
    """Write ``num_scenes`` MSN-format scenes as the TFDS dataset ``out_dir/multi_shapenet_frames/
    2.3.3`` (MSN-Hard variants: ``2.8.0``; see the module docstring); each split in
    ceil(n / scenes_per_file) tfrecord files.
    Open it with ``tfds.builder_from_directory(result.dataset_dir)`` or
    ``sunds.builder('multi_shapenet', data_dir=result.root)``."""
    if scenes_per_file < 1:
        raise ValueError(f'scenes_per_file must be >= 1, got {scenes_per_file}')
    if variant not in MSN_SIZES:
        raise ValueError(f'MSN variant must be one of {sorted(MSN_SIZES)}, got {variant!r}')
    sizes = resolve_splits(variant, num_scenes, split_sizes)
    tasks = tasks_of(variant, seed, sizes)
    from pipeline.sources.msn import import_tensorflow
    tf = import_tensorflow()  # CPU only, loaded safely beside PyTorch
    from tensorflow_datasets.core import example_serializer

    hard = variant.startswith('msn-hard')
    tfds_name, version = (MSN_HARD_NAME, MSN_HARD_VERSION) if hard else (MSN_NAME, MSN_VERSION)
    root = pathlib.Path(out_dir)
    ds_dir = root / MSN_NAME / version  # MSN-Hard too sits in multi_shapenet_frames/ (OSRT README)
    ds_dir.mkdir(parents=True, exist_ok=True)
    features = msn_features(height=MSN_SIZES[variant], width=MSN_SIZES[variant], hard=hard)
    features.save_config(str(ds_dir))  # features.json
    features.save_metadata(str(ds_dir))  # cameras-camera_<i>-category_image.labels.txt
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    scenes = {s: [] for s in sizes}
    split_infos = []
    num_images = image_bytes = 0
    results = render_all(_encode, tasks, workers, progress)  # spawned workers: safe beside TensorFlow
    try:
        for split, n in sizes.items():
            num_files = max(1, math.ceil(n / scenes_per_file))
            lengths, num_bytes = [], 0
            for j in range(num_files):
                count = (j + 1) * n // num_files - j * n // num_files  # balanced files
                path = ds_dir / f'{tfds_name}-{split}.tfrecord-{j:05d}-of-{num_files:05d}'
                with tf.io.TFRecordWriter(str(path)) as writer:
                    for r in itertools.islice(results, count):
                        name = f'scene_{MSN_SCENE_OFFSET[split] + len(scenes[split])}'
                        encoded = features.encode_example(_msn_example(name, r))
                        record = serializer.get_tf_example(encoded).SerializeToString(
                            deterministic=True)  # sorted feature map: same seed, same bytes
                        writer.write(record)
                        num_bytes += len(record)
                        num_images += len(r['pngs'])
                        image_bytes += sum(len(p) for p in r['pngs'])
                        scenes[split].append(name)
                lengths.append(str(count))
            # numBytes counts the serialized examples without the tfrecord framing, as tfds does
            split_infos.append({'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
                                'name': split, 'numBytes': str(num_bytes), 'shardLengths': lengths})
    finally:
        results.close()  # stops the worker pool, also on errors
    info = {'fileFormat': 'tfrecord', 'moduleName': '__main__', 'name': tfds_name,
            'splits': split_infos, 'version': version}
    if hard:
        info['configName'] = 'multi_shapenet_conditional'
    (ds_dir / 'dataset_info.json').write_text(json.dumps(info, indent=2))
    write_marker(root, variant, seed, scenes)
    return WriteResult(variant, root, ds_dir, scenes, num_images, image_bytes)
