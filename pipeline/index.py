"""Random access to scenes: an LMDB index per split mapping scene key and reference index to the
scene's byte range in its shard, so one scene is read without scanning (rendering and evaluating a
named scene need it). File: ``<shards>/<split>.index.lmdb`` (single file, read-only use).

The index also records each shard's size and sha256 at indexing time. A read checks that the shard
still has that size and that the split's manifest still names that sha256, and that the members at
the indexed offset belong to the scene asked for: a shard replaced after indexing (a reconversion
without the index, a copy from elsewhere) is reported as such instead of as a corrupt tar or, worse,
as another scene."""
from __future__ import annotations

import json
import os
from typing import Any

import lmdb

from pipeline import tario
from pipeline.reader import Scene, ShardError
from pipeline.schema import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, json_bytes

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
            txn.put(b'shard/' + rec['name'].encode(),
                    json_bytes({'bytes': rec['bytes'], 'sha256': rec['sha256']}))
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


# LMDB refuses a second environment on a file already open in the process: index objects of one
# file share one read-only environment (path -> [environment, users]), closed with its last user.
_OPEN: dict[tuple[str, int], list] = {}


def _env_key(path: str) -> tuple[str, int]:
    return os.path.realpath(path), os.stat(path).st_ino  # a rebuilt index is another file


def _open_env(path: str) -> tuple[lmdb.Environment, tuple[str, int]]:
    key = _env_key(path)
    entry = _OPEN.get(key)
    if entry is None:
        entry = _OPEN[key] = [lmdb.open(path, subdir=False, readonly=True, lock=False), 0]
    entry[1] += 1
    return entry[0], key


def _release_env(key: tuple[str, int]) -> None:
    entry = _OPEN.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _OPEN[key]


class SceneIndex:
    """Read-only index of one split: ``len``, ``keys()``, ``locate`` and ``read`` by key or by the
    reference loader's scene index (an int)."""

    def __init__(self, directory: str, split: str):
        self.directory, self.split = directory, split
        path = index_path(directory, split)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f'{directory}: no such shard directory')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no index (convert the split first, or run the '
                                    'converter with --finalize)')
        self.env, self._key = _open_env(path)
        with self.env.begin() as txn:
            self.info = json.loads(txn.get(_INFO))
        if self.info.get('schema_version') not in READABLE_SCHEMA_VERSIONS:
            self.close()
            raise ShardError(f'{path}: schema version {self.info.get("schema_version")} is not '
                             f'one of {READABLE_SCHEMA_VERSIONS}')
        self._manifest_sha: dict[str, str] | None = None  # shard name -> sha256, read on first use

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
        """The scene's members as a WebDataset-style sample dict, read with one seek; raises
        ShardError if the shard no longer matches the index."""
        key = self.key_of(scene)
        loc = self.locate(key)
        url = os.path.join(self.directory, loc['shard'])
        with open(url, 'rb') as f:
            self._check_shard(loc['shard'], url, os.fstat(f.fileno()).st_size)
            f.seek(loc['offset'])
            buf = f.read(loc['size'])
        sample: dict[str, Any] = {'__key__': key, '__url__': url}
        try:
            for name, data in tario.iter_members_bytes(buf, f'{url} at byte {loc["offset"]}',
                                                       require_end=False):
                member_key, member = tario.split_key(name)
                if member_key != key:
                    raise self._mismatch(url, f'the member at the indexed bytes is {name!r}, not '
                                              f'one of scene {key!r}')
                sample[member] = data
        except tario.TarFormatError as e:
            raise self._mismatch(url, str(e)) from None
        if len(buf) != loc['size'] or len(sample) == 2:
            raise self._mismatch(url, f'scene {key!r} should be {loc["size"]} bytes at byte '
                                      f'{loc["offset"]}, found {len(buf)}')
        return sample

    def _check_shard(self, name: str, url: str, size: int) -> None:
        """The shard's size now against the index, and the index's sha256 against the manifest's
        (indexes written before these records existed have none to check)."""
        with self.env.begin() as txn:
            value = txn.get(b'shard/' + name.encode())
        if value is None:
            return
        indexed = json.loads(value)
        if size != indexed['bytes']:
            raise self._mismatch(url, f'{size} bytes now, {indexed["bytes"]} when indexed')
        if self._manifest_sha is None:
            self._manifest_sha = {}
            path = os.path.join(self.directory, f'{self.split}.manifest.json')
            if os.path.isfile(path):
                with open(path) as f:
                    self._manifest_sha = {s['name']: s['sha256'] for s in json.load(f)['shards']}
        listed = self._manifest_sha.get(name)
        if listed is not None and listed != indexed['sha256']:
            raise self._mismatch(url, f'the manifest lists sha256 {listed[:12]}..., the index was '
                                      f'built for {indexed["sha256"][:12]}...')

    def _mismatch(self, url: str, detail: str) -> ShardError:
        return ShardError(f'{index_path(self.directory, self.split)}: index does not match shard '
                          f'{url}: {detail} (replaced after indexing? rebuild the index with the '
                          'converter\'s --finalize)')

    def read(self, scene: str | int) -> Scene:
        """The scene by key or reference index, checked (``pipeline.reader.Scene``)."""
        return Scene(self.read_sample(scene))

    def close(self) -> None:
        if self._key is not None:
            _release_env(self._key)
            self._key = None


def read_scene(directory: str, split: str, scene: str | int) -> Scene:
    """One scene by key or reference index (``pipeline.reader.Scene``: cameras checked, pixels
    decoded on first use)."""
    index = SceneIndex(directory, split)
    try:
        return index.read(scene)
    finally:
        index.close()
