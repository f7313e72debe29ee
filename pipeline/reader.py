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


def load_cameras(data: bytes, where: str = 'cameras.npz') -> tuple[np.ndarray, np.ndarray]:
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
        K, c2w = load_cameras(sample[CAMERAS], f'{where} {CAMERAS}')
        V = meta['num_views']
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
