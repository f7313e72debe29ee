"""DALI's webdataset index (``.idx``) for our shards, for users who feed NVIDIA DALI's
``fn.readers.webdataset(paths=..., index_paths=...)`` instead of our stream.

Format (DALI's ``tools/wds2idx.py``, version ``v1.2``; ``pipeline.tario`` reads and writes it): a
first line ``v1.2 <samples>``, then one line per sample listing each member as ``<extension> <data
offset> <size> <member name>``, the offset being where the member's bytes start (after its 512-byte
header). The converter writes one next to each shard (``<split>-%06d.idx``, which our stream reads
too); these functions rebuild them by walking a shard's headers, e.g. for shards converted before
the converter wrote them, or copied without their modification times (an index older than its shard
is not used).

    python -c "from pipeline.dali import write_dali_indexes; write_dali_indexes('shards/msn', 'train')"
"""
from __future__ import annotations

import os

from pipeline import tario
from pipeline.reader import read_manifest

DALI_INDEX_VERSION = tario.INDEX_VERSION


def dali_index_lines(shard: str) -> list[str]:
    """The ``.idx`` lines of one local shard (see the module docstring)."""
    samples: list[tario.Layout] = []
    last = None
    with open(shard, 'rb') as f:
        for name, data, header in tario.iter_members(f, shard):
            key = tario.split_key(name)[0]
            if key != last:
                samples.append([])
                last = key
            samples[-1].append((name, header + tario.BLOCK, len(data)))
    return tario.index_text(samples).splitlines()


def write_dali_index(shard: str, out: str | None = None) -> str:
    """Write ``<shard without .tar>.idx`` (or ``out``); returns its path."""
    out = out or tario.index_path(shard)
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
