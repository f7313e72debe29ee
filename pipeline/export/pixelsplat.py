"""Shards -> pixelSplat chunks (pixelSplat, MVSplat, DepthSplat load them unchanged).

Layout (docs/EXPORT.md; consumer code cited in /FORMATS section 1): ``<out>/<split>/NNNNNN.torch``,
each a ``torch.save`` of a list of scene dicts ``key`` (our sample key), ``url`` (the source's, or
''), ``timestamps`` int64 [V] (the source's, else the view index), ``cameras`` float32 [V, 18]
(``conventions.pixelsplat_row``), ``images`` (V 1-D uint8 tensors, each an image file's bytes);
``<out>/<split>/index.json`` ({key: chunk file name}); ``<out>/evaluation_index_<dataset>.json`` when
the shards carry an evaluation index. Only tensors, strings, lists and dicts: ``torch.load(...,
weights_only=True)`` loads every chunk. A chunk is closed once its image bytes reach ``chunk_bytes``
(as real_estate_10k_tools' ``convert.py`` does: chunks are >= the target, except the last).

Resumable and deterministic: scenes go into chunks in manifest order, so the cut points depend only
on the shards and the settings; each chunk is written atomically and recorded in
``<out>/.export/<split>.chunks.json``; a rerun skips the recorded scenes and writes the same bytes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from pipeline.durable import atomic_output, atomic_write
from pipeline.export.common import (ExportError, dataset_of, export_splits, json_text,
                                    prepare_output, progress_bar, read_evaluation_index,
                                    split_samples, split_size, view_image)
from pipeline.export.conventions import pixelsplat_row
from pipeline.reader import Scene

CHUNK_BYTES = int(1e8)  # real_estate_10k_tools' TARGET_BYTES_PER_CHUNK
WORK = '.export'


def scene_entry(scene: Scene, size: tuple[int, int] | None = None,
                jpeg_quality: int | None = None) -> dict[str, Any]:
    """One scene as a pixelSplat chunk entry (tensors, strings and lists only)."""
    import torch
    images, rows = [], []
    for v in range(scene.num_views):
        data, _, K, (h, w) = view_image(scene, v, size, jpeg_quality)
        images.append(torch.tensor(np.frombuffer(data, np.uint8)))
        rows.append(pixelsplat_row(K, scene.c2w[v], h, w))
    stamps = scene.timestamps if scene.timestamps is not None else list(range(scene.num_views))
    url = scene.meta.get('source', {}).get('url')
    return {'key': scene.key, 'url': url if isinstance(url, str) else '',
            'timestamps': torch.tensor(stamps, dtype=torch.int64),
            'cameras': torch.tensor(np.stack(rows), dtype=torch.float32), 'images': images}


def _save_chunk(path: str, entries: list[dict[str, Any]]) -> None:
    import torch
    with atomic_output(path, 'pixelSplat chunk') as f:
        torch.save(entries, f)


def _done(out: str, split: str) -> list[dict[str, Any]]:
    path = os.path.join(out, WORK, f'{split}.chunks.json')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        done = json.load(f)
    for record in done:
        if not os.path.isfile(os.path.join(out, split, record['chunk'])):
            raise ExportError(f'{path}: records chunk {record["chunk"]}, which is missing from '
                              f'{os.path.join(out, split)}; delete {out} and export again')
    return done


def _export_split(shards: str, out: str, split: str, chunk_bytes: int, size, jpeg_quality,
                  progress: bool) -> dict[str, Any]:
    folder = os.path.join(out, split)
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(out, WORK), exist_ok=True)
    done = _done(out, split)
    skip = [k for record in done for k in record['keys']]
    entries: list[dict[str, Any]] = []
    pending = seen = 0
    with progress_bar(split_size(shards, split), f'pixelsplat {split}', progress) as bar:
        for i, sample in enumerate(split_samples(shards, split)):
            seen += 1
            if i < len(skip):  # written by an earlier run: the shards must not have changed
                if sample['__key__'] != skip[i]:
                    raise ExportError(f'{out}: an earlier run exported {skip[i]} as scene {i} of '
                                      f'{split}, the shards now hold {sample["__key__"]} there; '
                                      'export into a new --out')
                bar.update()
                continue
            entry = scene_entry(Scene(sample), size, jpeg_quality)
            entries.append(entry)
            pending += sum(len(t) for t in entry['images'])
            if pending >= chunk_bytes:
                done.append(_flush(out, split, len(done), entries))
                entries, pending = [], 0
            bar.update()
    if entries:
        done.append(_flush(out, split, len(done), entries))
    if seen < len(skip):
        raise ExportError(f'{out}: an earlier run exported more scenes of {split} than the shards '
                          'now hold; export into a new --out')
    index = {k: r['chunk'] for r in done for k in r['keys']}
    atomic_write(os.path.join(folder, 'index.json'), json_text(index, indent=1), 'index.json')
    return {'scenes': len(index), 'chunks': len(done),
            'bytes': sum(os.path.getsize(os.path.join(folder, r['chunk'])) for r in done)}


def _flush(out: str, split: str, number: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
    name = f'{number:0>6}.torch'
    _save_chunk(os.path.join(out, split, name), entries)
    record = {'chunk': name, 'keys': [e['key'] for e in entries]}
    path = os.path.join(out, WORK, f'{split}.chunks.json')
    done = []
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)
    atomic_write(path, json_text(done + [record]), 'export progress record')
    return record


def export_pixelsplat(shards: str, out: str, splits: Sequence[str] | None = None,
                      chunk_bytes: int = CHUNK_BYTES, size: tuple[int, int] | None = None,
                      jpeg_quality: int | None = None, progress: bool = True
                      ) -> dict[str, dict[str, Any]]:
    """Export ``splits`` (default: all) of the shard directory ``shards`` as pixelSplat chunks in
    ``out``; returns {split: {'scenes', 'chunks', 'bytes'}}. ``size`` (h, w) resizes and centre-crops
    every view (pixelSplat loads only 360x640); ``jpeg_quality`` re-encodes PNG views as JPEG."""
    if chunk_bytes < 1:
        raise ValueError(f'--chunk-mb must be > 0, got {chunk_bytes / 1e6}')
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise ValueError(f'--jpeg-quality must be in 1..100, got {jpeg_quality}')
    splits = export_splits(shards, list(splits) if splits else None)
    prepare_output(out, 'pixelsplat', {'shards': os.path.abspath(shards), 'splits': splits,
                                       'chunk_bytes': chunk_bytes,
                                       'size': list(size) if size else None,
                                       'jpeg_quality': jpeg_quality})
    summary = {s: _export_split(shards, out, s, chunk_bytes, size, jpeg_quality, progress)
               for s in splits}
    evaluation = {}
    for split in splits:
        evaluation.update(read_evaluation_index(shards, split) or {})
    if evaluation:  # keyed by our sample keys = the chunks' keys; entries unchanged
        name = f'evaluation_index_{dataset_of(shards, splits[0])}.json'
        atomic_write(os.path.join(out, name), json_text(evaluation, indent=1), name)
    return summary
