"""DALI's webdataset index (``.idx``) for our shards, for users who feed NVIDIA DALI's
``fn.readers.webdataset(paths=..., index_paths=...)`` instead of our stream.

Format (DALI's ``tools/wds2idx.py``, version ``v1.2``): a first line ``v1.2 <samples>``, then one
line per sample listing each member as ``<extension> <data offset> <size> <member name>``, the
offset being where the member's bytes start (after its 512-byte header). Our shards are plain
ustar written by the converter, so the offsets come from walking the headers once
(``pipeline.tario``); the converter's LMDB index holds each scene's byte range, not per member.

    python -c "from pipeline.dali import write_dali_indexes; write_dali_indexes('shards/msn', 'train')"
"""
from __future__ import annotations

import os

from pipeline import tario
from pipeline.reader import read_manifest

DALI_INDEX_VERSION = 'v1.2'


def dali_index_lines(shard: str) -> list[str]:
    """The ``.idx`` lines of one local shard (see the module docstring)."""
    samples: list[list[str]] = []
    last = None
    with open(shard, 'rb') as f:
        for name, data, header in tario.iter_members(f, shard):
            key, ext = tario.split_key(name)
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(f'{ext} {header + tario.BLOCK} {len(data)} {name}')
    return [f'{DALI_INDEX_VERSION} {len(samples)}'] + [' '.join(s) for s in samples]


def write_dali_index(shard: str, out: str | None = None) -> str:
    """Write ``<shard without .tar>.idx`` (or ``out``); returns its path."""
    out = out or (shard[:-4] if shard.endswith('.tar') else shard) + '.idx'
    lines = dali_index_lines(shard)
    tmp = f'{out}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(tmp, out)
    return out


def write_dali_indexes(directory: str, split: str) -> list[str]:
    """A ``.idx`` next to every shard of a converted split."""
    return [write_dali_index(os.path.join(directory, s['name']))
            for s in read_manifest(directory, split)['shards']]
