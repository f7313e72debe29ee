"""Summaries, full verification and contact sheets of a shard directory (tools/inspect_shards.py)."""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from pipeline import tario
from pipeline.dali import dali_index_lines
from pipeline.reader import Scene, ShardError, iter_shard, read_manifest
from pipeline.schema import CAMERAS, IMAGE_EXTS, META, RAYS, extra_member, rgb_member, rgb_view


def splits_in(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'{directory}: no such shard directory')
    order = {'train': 0, 'val': 1, 'test': 2}
    found = [f[:-len('.manifest.json')] for f in os.listdir(directory) if f.endswith('.manifest.json')]
    if not found:
        raise FileNotFoundError(f'{directory}: no <split>.manifest.json (not a converted shard '
                                'directory, or the conversion has not been finalized)')
    return sorted(found, key=lambda s: (order.get(s, 3), s))


def summarize(directory: str) -> list[dict[str, Any]]:
    rows = []
    for split in splits_in(directory):
        m = read_manifest(directory, split)
        if m.get('min_views') is not None:  # schema 2
            lo, hi = m['min_views'], m['max_views']
            views = str(lo) if lo == hi else f'{lo}-{hi}'
        else:
            views = str(sum(1 for n in m['members'] or () if rgb_view(n) is not None))
        rows.append({'split': split, 'scenes': m['num_scenes'], 'views_per_scene': views,
                     'shards': len(m['shards']), 'bytes': m['bytes'],
                     'schema_version': m['schema_version'], 'dataset': m['dataset'],
                     'skipped': m['num_skipped'], 'members': m['members'],
                     'image_format': m.get('image_format', 'png')})
    return rows


def _check_member_index(shard: str) -> list[str]:
    """The shard's ``.idx`` (if any) lists its members where its tar headers put them."""
    idx = tario.index_path(shard)
    if not os.path.isfile(idx):
        return []
    try:
        with open(idx) as f:
            stored = f.read().splitlines()
        walked = dali_index_lines(shard)
    except (OSError, UnicodeDecodeError, tario.TarFormatError) as e:
        return [f'{idx}: unreadable member index ({e})']
    if stored != walked:
        line = next((i for i, (a, b) in enumerate(zip(stored, walked), 1) if a != b),
                    min(len(stored), len(walked)) + 1)
        return [f'{idx}: member index differs from the shard\'s tar headers from line {line} '
                '(rebuild it: pipeline.dali.write_dali_index)']
    return []


def verify(directory: str, progress: bool = True) -> list[str]:
    """Check every shard against its manifest and every sample's content. Returns the problems
    found (empty when the directory is sound): sha256 and size per shard, its member index,
    member set and key uniqueness per sample, and what ``pipeline.reader.Scene`` checks: cameras
    (CRC-32, finite, rigid), every PNG and extra decoding to the image size."""
    from tqdm import tqdm
    problems = []
    for split in splits_in(directory):
        m = read_manifest(directory, split)
        seen, count = set(), 0
        bar = tqdm(total=m['num_scenes'], desc=f'verify {split}', unit='scene', disable=not progress)
        for shard in m['shards']:
            path = os.path.join(directory, shard['name'])
            if not os.path.isfile(path):
                problems.append(f'{path}: missing shard')
                continue
            sha = hashlib.sha256()
            with open(path, 'rb') as f:
                for block in iter(lambda: f.read(1 << 22), b''):
                    sha.update(block)
            if sha.hexdigest() != shard['sha256'] or os.path.getsize(path) != shard['bytes']:
                problems.append(f'{path}: sha256/size differ from {split}.manifest.json')
            n = 0
            try:
                for sample in iter_shard(path):
                    n += 1
                    problems += _check_sample(sample, m, seen)
                    bar.update(1)
            except (tario.TarFormatError, ShardError) as e:
                problems.append(str(e))
            if n != shard['scenes']:
                problems.append(f'{path}: {n} samples, manifest says {shard["scenes"]}')
            problems += _check_member_index(path)
            count += n
        bar.close()
        if count != m['num_scenes']:
            problems.append(f'{directory}: split {split} has {count} samples, manifest says '
                            f'{m["num_scenes"]}')
    return problems


def _check_sample(sample: dict, manifest: dict, seen: set) -> list[str]:
    where = f'{sample["__url__"]}: sample {sample["__key__"]}'
    out = []
    if sample['__key__'] in seen:
        out.append(f'{where}: duplicate key')
    seen.add(sample['__key__'])
    members = [k for k in sample if not k.startswith('__')]
    if manifest['members'] is not None and sorted(members) != sorted(manifest['members']):
        out.append(f'{where}: members {sorted(members)} != manifest {sorted(manifest["members"])}')
        return out
    try:  # the reader checks the cameras, every image against its size, every extra
        scene = Scene(sample)
        scene.decode(None, scene.meta.get('extras', []))
    except ShardError as e:
        return out + [str(e)]
    if manifest['members'] is None:  # scenes differ: the scene's own members, from its meta.json
        unexpected = set(members) - _allowed_members(scene)
        if unexpected:
            out.append(f'{where}: unexpected members {sorted(unexpected)}')
    if scene.meta.get('schema_version') != manifest['schema_version']:
        out.append(f'{where}: meta schema_version {scene.meta.get("schema_version")}')
    return out


def _allowed_members(scene: Scene) -> set[str]:
    views = range(scene.num_views)
    allowed = {META, CAMERAS, RAYS} | {rgb_member(v, IMAGE_EXTS[scene.image_format]) for v in views}
    return allowed | {extra_member(kind, v, ext) for kind in scene.meta.get('extras', [])
                      for v in views for ext in ('png', 'jpg', 'npy')}


def contact_sheet(directory: str, out_path: str, num_scenes: int = 8, split: str | None = None,
                  thumb: int = 64) -> str:
    """A PNG grid: one row per scene (the first ``num_scenes`` of the split), one column per view."""
    from PIL import Image
    split = split or splits_in(directory)[0]
    m = read_manifest(directory, split)
    rows = []
    for shard in m['shards']:
        for sample in iter_shard(os.path.join(directory, shard['name'])):
            scene = Scene(sample)
            thumbs = []
            for v in range(scene.num_views):
                h, w = scene.image_size(v)
                size = (max(1, round(w * thumb / h)), thumb)
                thumbs.append(np.asarray(Image.fromarray(scene.image(v)).resize(size)))
            rows.append(np.concatenate(thumbs, axis=1))
            if len(rows) >= num_scenes:
                break
        if len(rows) >= num_scenes:
            break
    if not rows:
        raise ValueError(f'{directory}: split {split} has no scenes')
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                           for r in rows])
    Image.fromarray(grid).save(out_path)
    return out_path
