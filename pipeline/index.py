"""Random access to scenes: an LMDB index per split mapping scene key and reference index to the
scene's byte range in its shard, so one scene is read without scanning (rendering and evaluating a
named scene need it). File: ``<shards>/<split>.index.lmdb`` (single file, read-only use)."""
from __future__ import annotations

import json
import os
from typing import Any

import lmdb

from pipeline import tario
from pipeline.reader import Scene, ShardError, decode_scene
from pipeline.schema import SCHEMA_VERSION, json_bytes

_INFO = b'__info__'


def index_path(directory: str, split: str) -> str:
    return os.path.join(directory, f'{split}.index.lmdb')


def build(directory: str, split: str, records: list[dict[str, Any]]) -> None:
    """Write the index from the shard records of the converter (atomically replaced)."""
    path = index_path(directory, split)
    tmp = f'{path}.tmp-{os.getpid()}'
    for p in (tmp, f'{tmp}-lock'):
        if os.path.exists(p):
            os.remove(p)
    num = sum(len(r['samples']) for r in records)
    env = lmdb.open(tmp, subdir=False, map_size=max(1 << 26, num * 4096), lock=False,
                    sync=True, metasync=True)
    with env.begin(write=True) as txn:
        for rec in records:
            for key, ref, offset, size in rec['samples']:
                value = json_bytes({'shard': rec['name'], 'offset': offset, 'size': size,
                                    'reference_index': ref})
                if not txn.put(b'key/' + key.encode(), value, overwrite=False):
                    raise ShardError(f'{directory}: duplicate scene key {key!r} in split {split!r}')
                txn.put(b'ref/%d' % ref, key.encode())
        txn.put(_INFO, json_bytes({'schema_version': SCHEMA_VERSION, 'split': split,
                                   'num_scenes': num}))
    env.sync(True)
    env.close()
    os.replace(tmp, path)


class SceneIndex:
    """Read-only index of one split: ``len``, ``keys()``, ``locate`` and ``read`` by key or by the
    reference loader's scene index (an int)."""

    def __init__(self, directory: str, split: str):
        self.directory, self.split = directory, split
        path = index_path(directory, split)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no index (convert the split first, or run the '
                                    'converter with --finalize)')
        self.env = lmdb.open(path, subdir=False, readonly=True, lock=False)
        with self.env.begin() as txn:
            self.info = json.loads(txn.get(_INFO))
        if self.info.get('schema_version') != SCHEMA_VERSION:
            raise ShardError(f'{path}: schema version {self.info.get("schema_version")} is not '
                             f'{SCHEMA_VERSION}')

    def __len__(self) -> int:
        return self.info['num_scenes']

    def keys(self) -> list[str]:
        with self.env.begin() as txn:
            cur = txn.cursor()
            cur.set_range(b'key/')
            return [k[4:].decode() for k, _ in cur if k.startswith(b'key/')]

    def key_of(self, scene: str | int) -> str:
        if isinstance(scene, str):
            return scene
        with self.env.begin() as txn:
            key = txn.get(b'ref/%d' % scene)
        if key is None:
            raise KeyError(f'{self.directory}: split {self.split!r} has no scene with reference '
                           f'index {scene} (it has {len(self)} scenes)')
        return key.decode()

    def locate(self, scene: str | int) -> dict[str, Any]:
        """{'shard', 'offset', 'size', 'reference_index'} of a scene key or reference index."""
        key = self.key_of(scene)
        with self.env.begin() as txn:
            value = txn.get(b'key/' + key.encode())
        if value is None:
            raise KeyError(f'{self.directory}: split {self.split!r} has no scene {key!r}')
        return json.loads(value)

    def read_sample(self, scene: str | int) -> dict[str, Any]:
        """The scene's members as a WebDataset-style sample dict, read with one seek."""
        loc = self.locate(scene)
        url = os.path.join(self.directory, loc['shard'])
        with open(url, 'rb') as f:
            f.seek(loc['offset'])
            buf = f.read(loc['size'])
        sample: dict[str, Any] = {'__url__': url}
        for name, data in tario.iter_members_bytes(buf, url, require_end=False):
            key, member = tario.split_key(name)
            sample['__key__'] = key
            sample[member] = data
        return sample

    def read(self, scene: str | int, **kwargs) -> Scene:
        return decode_scene(self.read_sample(scene), **kwargs)

    def close(self) -> None:
        self.env.close()


def read_scene(directory: str, split: str, scene: str | int, **kwargs) -> Scene:
    """One scene by key or reference index, decoded (kwargs as ``reader.decode_scene``)."""
    index = SceneIndex(directory, split)
    try:
        return index.read(scene, **kwargs)
    finally:
        index.close()
