"""Reading shards: the split's shard list from its manifest, and samples decoded into scenes.

A sample is the dict WebDataset builds from one scene's members (``{'__key__': ..., 'meta.json':
bytes, 'cameras.npz': bytes, 'rgb_000.png': bytes, ...}``). ``decode_scene`` turns it into a
``Scene`` with uint8 images of only the views asked for.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Sequence

import numpy as np

from pipeline import tario
from pipeline.decode import decode_png
from pipeline.schema import CAMERAS, META, SCHEMA_VERSION, extra_member, rgb_member


class ShardError(ValueError):
    """Unreadable or inconsistent shard data; the message names the shard and sample."""


@dataclasses.dataclass
class Scene:
    key: str
    meta: dict[str, Any]  # the sample's meta.json
    K: np.ndarray  # [V, 3, 3] float64, pixels (pixel centres at +0.5)
    c2w: np.ndarray  # [V, 4, 4] float64, world_from_cam with OpenCV axes
    views: list[int]  # indices of the decoded views
    images: np.ndarray | None  # [len(views), H, W, 3] uint8, or None when not decoded
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # kind -> [len(views), ...]
    url: str = ''


def read_manifest(directory: str, split: str) -> dict[str, Any]:
    path = os.path.join(directory, f'{split}.manifest.json')
    if not os.path.isfile(path):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f'{directory}: no such shard directory')
        have = sorted(f[:-len('.manifest.json')] for f in os.listdir(directory)
                      if f.endswith('.manifest.json'))
        raise FileNotFoundError(f'{path}: no manifest for split {split!r} (splits here: {have or "none"};'
                                ' convert the dataset first, see tools/convert_*.py)')
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get('schema_version') != SCHEMA_VERSION:
        raise ShardError(f'{path}: schema version {manifest.get("schema_version")} is not the '
                         f'supported version {SCHEMA_VERSION}; reconvert with this version')
    return manifest


def shard_urls(directory: str, split: str) -> list[str]:
    """Paths of the split's shards, in manifest order."""
    return [os.path.join(directory, s['name']) for s in read_manifest(directory, split)['shards']]


def render_range(directory: str, split: str = 'train') -> tuple[float, float]:
    """(near, far) in world units of a split: the manifest's ``near``/``far`` if it has them, else
    the first scene's ``meta.json`` (every scene of a dataset has the same range)."""
    manifest = read_manifest(directory, split)
    if 'near' in manifest and 'far' in manifest:
        return float(manifest['near']), float(manifest['far'])
    for url in shard_urls(directory, split):
        with open(url, 'rb') as f:
            for name, data, _ in tario.iter_members(f, url):
                if tario.split_key(name)[1] == META:
                    meta = json.loads(data)
                    return float(meta['near']), float(meta['far'])
    raise ShardError(f'{directory}: the {split} split has no scene to read near/far from')


def _stored_npy(data: bytes, pos: int, shape: tuple[int, ...]) -> tuple[np.ndarray, int] | None:
    """The float64 array of a stored (uncompressed) zip entry at ``pos`` holding an .npy of the
    expected shape, and the offset after it; None if the bytes are not laid out as the converter
    writes them (the caller then falls back to numpy.load)."""
    if data[pos:pos + 4] != b'PK\x03\x04' or data[pos + 8:pos + 10] != b'\x00\x00':
        return None
    size = int.from_bytes(data[pos + 18:pos + 22], 'little')
    start = pos + 30 + int.from_bytes(data[pos + 26:pos + 28], 'little') + \
        int.from_bytes(data[pos + 28:pos + 30], 'little')
    if data[start:start + 8] != b'\x93NUMPY\x01\x00':
        return None
    hlen = int.from_bytes(data[start + 8:start + 10], 'little')
    header = data[start + 10:start + 10 + hlen]
    want = ', '.join(str(d) for d in shape)
    if b"'descr': '<f8'" not in header or b"'fortran_order': False" not in header or \
            f"'shape': ({want})".encode() not in header:
        return None
    body = start + 10 + hlen
    n = int(np.prod(shape)) * 8
    if body + n != start + size:
        return None
    return np.frombuffer(data, np.float64, n // 8, body).reshape(shape), start + size


def load_cameras(data: bytes, where: str = 'cameras.npz',
                 num_views: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(K [V,3,3], c2w [V,4,4]) from ``cameras.npz`` bytes. With ``num_views`` the converter's
    layout is parsed directly (~30x faster than numpy.load's zipfile path), else numpy.load."""
    if num_views is not None:
        K = _stored_npy(data, 0, (num_views, 3, 3))
        c2w = _stored_npy(data, K[1], (num_views, 4, 4)) if K is not None else None
        if c2w is not None:
            return K[0], c2w[0]
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return npz['K'], npz['c2w']
    except Exception as e:
        raise ShardError(f'{where}: unreadable cameras.npz ({e})') from None


def decode_scene(sample: dict[str, Any], views: Sequence[int] | None = None,
                 extras: Sequence[str] = (), decode_images: bool = True) -> Scene:
    """Decode one sample. ``views`` None decodes every view; ``extras`` names extra kinds to decode."""
    key, url = sample.get('__key__', '?'), sample.get('__url__', '')
    where = f'{url}: sample {key}'
    try:
        meta = json.loads(sample[META])
        V = meta['num_views']
        K, c2w = load_cameras(sample[CAMERAS], f'{where} {CAMERAS}', V)
        views = list(range(V)) if views is None else [int(v) for v in views]
        images = None
        if decode_images:
            images = np.stack([decode_png(sample[rgb_member(v)], 3) for v in views])
        out_extras = {}
        for kind in extras:
            arrays = []
            for v in views:
                png = sample.get(extra_member(kind, v, 'png'))
                arrays.append(decode_png(png) if png is not None else
                              np.load(io.BytesIO(sample[extra_member(kind, v, 'npy')]),
                                      allow_pickle=False))
            out_extras[kind] = np.stack(arrays)
    except ShardError:
        raise
    except Exception as e:  # missing member, corrupt PNG or JSON
        raise ShardError(f'{where}: {type(e).__name__}: {e}') from None
    if images is not None and images.shape[1:3] != (meta['height'], meta['width']):
        raise ShardError(f'{where}: image size {images.shape[1:3]} != meta '
                         f'{(meta["height"], meta["width"])}')
    return Scene(key=key, meta=meta, K=K, c2w=c2w, views=views, images=images, extras=out_extras,
                 url=url)
