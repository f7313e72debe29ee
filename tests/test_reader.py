"""The one shard parser (pipeline.reader) and what it refuses: damaged cameras, a corrupt camera
member, undecodable views and a shard replaced behind its index are each reported with the shard
URL, the sample key and (where one is concerned) the view, through every way of reading a scene."""
import io
import json
import pickle
import re
import shutil

import numpy as np
import pytest

from pipeline import tario
from pipeline.index import SceneIndex, read_scene
from pipeline.reader import Scene, ShardError, iter_shard, render_range, shard_table, shard_urls
from pipeline.schema import CAMERAS, META, npz_bytes, rgb_member
from pipeline.stream import scene_stream
from pipeline.verify import verify


def rewrite(shard, edit) -> None:
    """Re-encode a shard after ``edit(sample) -> sample`` (members keep their order and sizes
    unless the edit changes them, so the index's offsets stay valid)."""
    members = []
    for sample in iter_shard(str(shard)):
        sample = edit(dict(sample))
        members += [(f'{sample["__key__"]}.{name}', data) for name, data in sample.items()
                    if not name.startswith('__')]
    shard.write_bytes(tario.encode_members(members) + tario.END_OF_ARCHIVE)


def cameras_of(sample):
    with np.load(io.BytesIO(sample[CAMERAS])) as npz:
        return npz['K'].copy(), npz['c2w'].copy()


def first_sample(directory):
    return next(iter_shard(shard_urls(str(directory), 'train')[0]))


def test_scene_decodes_lazily_and_gathers_pixels(converted):
    sample = first_sample(converted / 'clevr3d')
    scene = Scene(sample)
    assert (scene.num_views, scene.height, scene.width) == (3, 240, 320)
    assert scene.meta['image_mode'] == 'RGBA' and scene._pixels is None  # nothing decoded yet
    image = scene.image(1)
    assert image.shape == (240, 320, 3) and image.dtype == np.uint8  # alpha dropped on read
    images = scene.images([2, 0])
    np.testing.assert_array_equal(images[1], scene.image(0))
    flat = np.random.default_rng(0).choice(2 * 240 * 320, 500, replace=False)
    np.testing.assert_array_equal(scene.gather([2, 0], flat), images.reshape(-1, 3)[flat])
    with pytest.raises(IndexError, match='no view 3'):
        scene.image(3)
    # Into and out of a DataLoader worker: decoded views travel, the others decode on arrival.
    partial = Scene(sample).decode([1])
    back = pickle.loads(pickle.dumps(partial))
    assert back._decoded == [False, True, False]
    np.testing.assert_array_equal(back.images(), scene.images())
    np.testing.assert_array_equal(back.K, scene.K)


@pytest.mark.parametrize('damage, message', [
    ('nan', 'view 3: bad camera in cameras.npz: c2w has non-finite values'),
    ('scaled', 'view 1: bad camera in cameras.npz: c2w rotation block is not orthonormal'),
    ('reflection', 'view 2: bad camera in cameras.npz: c2w rotation has det -1'),
    ('focal', 'view 4: bad camera in cameras.npz: intrinsics K is singular'),
])
def test_bad_cameras_are_named_by_every_reader(nmr, damage, message):
    key = first_sample(nmr)['__key__']
    url = shard_urls(str(nmr), 'train')[0]

    def edit(sample):  # written with the schema's own npz writer, as a converter bug would
        K, c2w = cameras_of(sample)
        if damage == 'nan':
            c2w[3, 0, 3] = np.nan
        elif damage == 'scaled':
            c2w[1, :3, :3] *= 1.1
        elif damage == 'reflection':
            c2w[2, :3, 0] *= -1
        else:
            K[4, 0, 0] = 0.0
        sample[CAMERAS] = npz_bytes({'K': K, 'c2w': c2w})
        return sample

    rewrite(nmr / 'train-000000.tar', edit)  # same size: the index still points at the scene
    want = f'{url}: sample {key} {message}'
    with pytest.raises(ShardError, match=re.escape(want)):
        Scene(first_sample(nmr))
    with pytest.raises(ShardError, match=message):
        list(scene_stream(str(nmr), 'train', shuffle=False))
    with pytest.raises(ShardError, match=message):
        read_scene(str(nmr), 'train', key)
    assert any(message in p for p in verify(str(nmr), progress=False))
    # the other shard is sound and still reads
    assert read_scene(str(nmr), 'train', 1).c2w.shape == (24, 4, 4)


@pytest.mark.parametrize('layout', ['stored', 'deflated'])
def test_a_corrupt_camera_member_fails_its_crc(nmr, layout):
    sample = first_sample(nmr)
    data = bytearray(sample[CAMERAS])
    if layout == 'deflated':  # another writer's npz: parsed by numpy.load, which checks the CRC
        K, c2w = cameras_of(sample)
        buf = io.BytesIO()
        np.savez_compressed(buf, K=K, c2w=c2w)
        data = bytearray(buf.getvalue())
        assert Scene({**sample, CAMERAS: bytes(data)}).K.shape == (24, 3, 3)
        data[60] ^= 0x01  # inside K's compressed bytes
        message = 'unreadable cameras.npz'
    else:  # the converter's layout, parsed directly: the stored CRC-32 is checked all the same
        npy = data.index(b'\x93NUMPY')
        body = npy + 10 + int.from_bytes(data[npy + 8:npy + 10], 'little')
        data[body + 3] ^= 0x01  # one bit of K[0, 0, 0]: still a finite, valid-looking camera
        message = 'corrupt cameras.npz'
    with pytest.raises(ShardError, match=f'sample {sample["__key__"]}: {message}'):
        Scene({**sample, CAMERAS: bytes(data)})


def test_an_undecodable_view_is_named(nmr):
    def edit(sample):
        sample[rgb_member(5)] = sample[rgb_member(5)][:200]
        return sample

    rewrite(nmr / 'train-000000.tar', edit)
    sample = first_sample(nmr)
    scene = Scene(sample)  # parsing does not decode
    scene.image(4)
    with pytest.raises(ShardError, match=f'sample {sample["__key__"]} view 5: undecodable PNG '
                                         'rgb_005.png'):
        scene.image(5)
    with pytest.raises(ShardError, match='view 5: undecodable PNG'):
        list(scene_stream(str(nmr), 'train', shuffle=False, views=[5]))
    assert len(list(scene_stream(str(nmr), 'train', shuffle=False, views=[4]))) == 2
    assert any('view 5: undecodable PNG' in p for p in verify(str(nmr), progress=False))


def test_bad_metadata_and_missing_members_are_named():
    sample = {'__key__': 'k', '__url__': 'x.tar', META: b'{"num_views": 2'}
    with pytest.raises(ShardError, match='x.tar: sample k: unreadable meta.json'):
        Scene(sample)
    with pytest.raises(ShardError, match='x.tar: sample k: no meta.json member'):
        Scene({'__key__': 'k', '__url__': 'x.tar'})
    meta = json.dumps({'num_views': 2, 'height': 4, 'width': 4}).encode()
    with pytest.raises(ShardError, match='x.tar: sample k: no cameras.npz member'):
        Scene({**sample, META: meta})
    K = np.tile(np.array([[4.0, 0, 2], [0, 4, 2], [0, 0, 1]]), (3, 1, 1))
    c2w = np.tile(np.eye(4), (3, 1, 1))
    with pytest.raises(ShardError, match=r'holds K \[3, 3, 3\] and c2w \[3, 4, 4\] for 2 views'):
        Scene({**sample, META: meta, CAMERAS: npz_bytes({'K': K, 'c2w': c2w})})
    scene = Scene({**sample, META: meta, CAMERAS: npz_bytes({'K': K[:2], 'c2w': c2w[:2]})})
    with pytest.raises(ShardError, match='x.tar: sample k view 1: no rgb_001.png member'):
        scene.image(1)


def test_an_index_that_no_longer_matches_its_shard_says_so(nmr):
    keys = [s['__key__'] for url in shard_urls(str(nmr), 'train') for s in iter_shard(url)]
    shard0 = nmr / 'train-000000.tar'
    original = shard0.read_bytes()
    # 1. another shard copied over it (other size)
    shutil.copy(nmr / 'train-000001.tar', shard0)
    with pytest.raises(ShardError, match=f'index does not match shard {shard0}: .* bytes now'):
        read_scene(str(nmr), 'train', keys[0])
    # 2. same size, but the bytes at the indexed offset are another scene's
    shard0.write_bytes(original)
    rewrite(shard0, lambda s: {**s, '__key__': s['__key__'][:-1] + 'X'})
    with pytest.raises(ShardError, match=f'index does not match shard {shard0}: the member at the '
                                         f"indexed bytes is '{keys[0][:-1]}X.meta.json'"):
        read_scene(str(nmr), 'train', 0)
    # 3. reconverted (the manifest lists a new sha256) while the index stayed behind
    shard0.write_bytes(original)
    assert read_scene(str(nmr), 'train', keys[0]).key == keys[0]
    manifest = json.loads((nmr / 'train.manifest.json').read_text())
    manifest['shards'][0]['sha256'] = '0' * 64
    (nmr / 'train.manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match='index does not match shard .* the manifest lists sha256'):
        SceneIndex(str(nmr), 'train').read(keys[0])
    assert read_scene(str(nmr), 'train', keys[1]).key == keys[1]  # the other shard is unaffected


def test_missing_directory_and_split_are_named(nmr, tmp_path):
    with pytest.raises(FileNotFoundError, match=f'{tmp_path / "nope"}: no such shard directory'):
        read_scene(str(tmp_path / 'nope'), 'train', 0)
    with pytest.raises(FileNotFoundError, match='no index'):
        read_scene(str(nmr), 'val', 0)
    with pytest.raises(FileNotFoundError,
                       match=r"no manifest for split 'val' \(splits here: \['train'\]"):
        shard_urls(str(nmr), 'val')


def test_render_range_comes_from_the_manifest_or_the_scenes(nmr):
    assert render_range(str(nmr)) == (2.0, 4.0)  # NMR scenes' meta.json
    assert shard_table(str(nmr), 'train') == [(str(nmr / 'train-000000.tar'), 1),
                                              (str(nmr / 'train-000001.tar'), 1)]
    manifest = json.loads((nmr / 'train.manifest.json').read_text())
    (nmr / 'train.manifest.json').write_text(json.dumps({**manifest, 'near': 0.5, 'far': 9.0}))
    assert render_range(str(nmr), 'train') == (0.5, 9.0)  # a dataset that carries its own


def test_one_index_opened_twice_in_a_process(nmr_shards):
    # LMDB refuses a second environment on an open file: index objects of one split share one
    a = SceneIndex(str(nmr_shards), 'train')
    b = SceneIndex(str(nmr_shards), 'train')
    key = a.read(0).key
    assert b.read(0).key == key
    a.close()
    assert b.read(1).c2w.shape == (24, 4, 4)  # still open for its other user
    b.close()
    c = SceneIndex(str(nmr_shards), 'train')  # opened again after its last user closed it
    assert c.read(0).key == key
    c.close()
