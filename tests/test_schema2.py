"""Schema version 2: JPEG views, per-view image sizes, timestamps, header checks without decoding,
meta v2 keys, manifests v2; readers still accept schema 1 shards, converters refuse to mix versions."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline import tario
from pipeline.convert import ConvertConfig, ConvertError, convert
from pipeline.decode import decode_image
from pipeline.reader import Scene, ShardError, iter_shard, read_manifest, shard_urls
from pipeline.schema import (DATASETS, SCHEMA_VERSION, SourceError, SourceScene, encode_scene,
                             image_info, jpeg_info, rgb_view)
from pipeline.verify import verify
from tests.conftest import TESTVECTORS

SRC = TESTVECTORS / 'sources'


def jpeg(h, w, seed=0, **kw):
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(128, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img if kw.pop('channels', 3) == 3 else img[..., 0]).save(buf, 'JPEG', **kw)
    return buf.getvalue()


def png(h, w):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, 'PNG')
    return buf.getvalue()


def camera(h, w):
    K = np.array([[w * 0.9, 0, w / 2], [0, h * 0.9 * 16 / 9, h / 2], [0, 0, 1.0]])
    return K, np.eye(4)


def scene_of(images, dataset='re10k', **kw):
    sizes = []
    for b in images:  # a damaged view gets the first view's camera
        try:
            sizes.append(image_info(b, 'test')[:2])
        except SourceError:
            sizes.append(sizes[0])
    Ks = np.stack([camera(h, w)[0] for w, h in sizes])
    c2w = np.stack([np.eye(4)] * len(images))
    c2w[:, 2, 3] = np.arange(len(images))
    return SourceScene(dataset=dataset, split='test', scene_id='abc', reference_index=0,
                       view_names=[str(v) for v in range(len(images))], images=images, K=Ks,
                       c2w=c2w, origin='mem', **kw)


def sample_of(scene):
    key, members = encode_scene(scene)
    return {'__key__': key, '__url__': 'mem', **{n[len(key) + 1:]: d for n, d in members}}


def test_jpeg_headers_are_read_without_decoding_and_damage_is_named():
    for kw, mode in (({}, 'RGB'), ({'progressive': True}, 'RGB'), ({'channels': 1}, 'L')):
        data = jpeg(36, 64, **kw)
        assert jpeg_info(data, 'x')[:3] == (64, 36, mode)
        assert image_info(data, 'x') == (64, 36, mode, 'jpeg')
    data = jpeg(36, 64)
    with pytest.raises(SourceError, match=r'view 3: undecodable JPEG \(truncated'):
        jpeg_info(data[:len(data) // 2], 'view 3')
    with pytest.raises(SourceError, match='view 3: undecodable JPEG'):
        jpeg_info(data[:100], 'view 3')
    with pytest.raises(SourceError, match='neither a PNG nor a JPEG'):
        image_info(b'GIF89a' + data, 'view 3')
    assert rgb_view('rgb_007.jpg') == 7


def test_decode_image_gives_pillows_pixels():
    for kw in ({}, {'progressive': True}, {'subsampling': 0}):
        data = jpeg(36, 64, **kw)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
        np.testing.assert_array_equal(decode_image(data, 3), ref)
    grey = jpeg(20, 30, channels=1)
    assert decode_image(grey).shape == (20, 30, 1) and decode_image(grey, 3).shape == (20, 30, 3)


def test_jpeg_views_of_several_sizes_are_kept_with_their_sizes_and_timestamps():
    images = [jpeg(36, 64, 0), jpeg(36, 64, 1), jpeg(48, 48, 2)]
    scene = Scene(sample_of(scene_of(images, timestamps=[10, 20, 30],
                                     source_format='pixelsplat_chunks')))
    meta = scene.meta
    assert meta['schema_version'] == SCHEMA_VERSION == 2
    assert meta['height'] is None and meta['width'] is None
    assert meta['image_sizes'] == [[36, 64], [36, 64], [48, 48]]
    assert meta['image_format'] == 'jpeg' and meta['timestamps'] == [10, 20, 30]
    assert meta['up_axis'] is None and meta['near'] is None
    assert meta['canonical_frame'] == 'input_view_pose'
    assert meta['source_format'] == 'pixelsplat_chunks'
    for key in ('source_camera_convention', 'camera_conversion', 'distortion', 'world_frame',
                'extras_info'):
        assert key in meta
    assert sorted(k for k in scene.sample if k.startswith('rgb')) == \
        ['rgb_000.jpg', 'rgb_001.jpg', 'rgb_002.jpg']
    assert scene.sample['rgb_002.jpg'] == images[2]  # bytes unchanged
    assert scene.image_size(2) == (48, 48) and scene.timestamps == [10, 20, 30]
    assert scene.image(2).shape == (48, 48, 3)
    with pytest.raises(ShardError, match='sample re10k_test_abc: its views differ in size'):
        scene.height
    with pytest.raises(ShardError, match=r'views \[0, 2\] differ in size'):
        scene.images([0, 2])
    assert scene.images([0, 1]).shape == (2, 36, 64, 3)
    flat = np.array([0, 36 * 64 + 5])
    got = scene.gather([1, 0], flat)
    np.testing.assert_array_equal(got, [scene.image(1)[0, 0], scene.image(0)[0, 5]])


def test_scene_level_errors_name_the_view():
    with pytest.raises(SourceError, match='view 1: a PNG image in a scene whose first view is a JPEG'):
        encode_scene(scene_of([jpeg(36, 64), png(36, 64)]))
    with pytest.raises(SourceError, match='2 timestamps for 3 views'):
        encode_scene(scene_of([jpeg(36, 64)] * 3, timestamps=[1, 2]))
    data = jpeg(36, 64)
    with pytest.raises(SourceError, match=r'scene abc view 1: undecodable JPEG \(truncated'):
        encode_scene(scene_of([data, data[:-300]]))
    # SRT's datasets keep one size per scene (their reference loaders stack the views).
    with pytest.raises(SourceError, match='view 1: wrong image size 48x48'):
        encode_scene(scene_of([jpeg(36, 64), jpeg(48, 48)], dataset='msn'))


def test_srt_sets_state_their_provenance_and_msn_hard_is_known():
    meta = json.loads(sample_of(scene_of([png(8, 8)], dataset='nmr'))['meta.json'])
    assert meta['source_format'] == 'nmr' and meta['up_axis'] == [0.0, 0.0, 1.0]
    assert meta['world_frame']['applied_transform'][1] == [0.0, 0.0, -1.0, 0.0]
    assert meta['near'] == 2.0 and meta['image_format'] == 'png' and meta['timestamps'] is None
    hard = DATASETS['msn_hard']
    assert (hard['near'], hard['far'], hard['canonical_frame']) == (0.0, 20.0, 'center_columns_rays')
    assert 'osrt/data/multishapenet.py' in hard['near_far_source']


def _as_schema_1(out, split):
    """Rewrite a converted split as schema 1 wrote it: meta.json and manifest without v2 keys."""
    v2_keys = ('image_sizes', 'image_format', 'timestamps', 'source_format', 'distortion',
               'source_camera_convention', 'camera_conversion', 'world_frame', 'extras_info')
    for url in shard_urls(str(out), split):
        members = []
        for sample in iter_shard(url):
            meta = json.loads(sample['meta.json'])
            meta = {k: v for k, v in meta.items() if k not in v2_keys}
            meta['schema_version'] = 1
            sample['meta.json'] = json.dumps(meta, sort_keys=True).encode()
            members += [(f'{sample["__key__"]}.{n}', d) for n, d in sample.items()
                        if not n.startswith('__')]
        data = tario.encode_members(members) + tario.END_OF_ARCHIVE
        with open(url, 'wb') as f:
            f.write(data)
        os.remove(url[:-len('.tar')] + '.idx')  # schema 1's converter wrote no member index
    path = out / f'{split}.manifest.json'
    manifest = json.loads(path.read_text())
    for k in ('min_views', 'max_views', 'image_format', 'near', 'far'):
        manifest.pop(k)
    manifest['schema_version'] = 1
    import hashlib
    for shard in manifest['shards']:
        data = (out / shard['name']).read_bytes()
        shard.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    path.write_text(json.dumps(manifest))


def test_schema_1_shards_are_read_and_mixing_versions_is_refused(tmp_path):
    out = tmp_path / 'nmr'
    convert(ConvertConfig(dataset='nmr', src=str(SRC / 'nmr'), out=str(out), splits=['val'],
                          progress=False))
    manifest = read_manifest(str(out), 'val')
    assert manifest['members'] is not None and manifest['min_views'] == manifest['max_views'] == 24
    assert (manifest['near'], manifest['far'], manifest['image_format']) == (2.0, 4.0, 'png')
    v2 = Scene(next(iter_shard(shard_urls(str(out), 'val')[0])))
    _as_schema_1(out, 'val')
    assert read_manifest(str(out), 'val')['schema_version'] == 1
    v1 = Scene(next(iter_shard(shard_urls(str(out), 'val')[0])))
    assert v1.meta['schema_version'] == 1 and 'image_sizes' not in v1.meta
    assert (v1.height, v1.width, v1.image_size(3), v1.image_format) == (64, 64, (64, 64), 'png')
    assert v1.timestamps is None
    np.testing.assert_array_equal(v1.images(), v2.images())
    np.testing.assert_array_equal(v1.c2w, v2.c2w)
    assert verify(str(out), progress=False) == []
    with pytest.raises(ConvertError, match='val.manifest.json: existing output has schema version 1'):
        convert(ConvertConfig(dataset='nmr', src=str(SRC / 'nmr'), out=str(out), splits=['test'],
                              progress=False))
    assert not os.path.exists(out / 'test.manifest.json')
