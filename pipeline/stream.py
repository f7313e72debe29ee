"""Streaming scenes out of shards: generic, WebDataset underneath, no SRT knowledge.

Shards are named by a shard directory (+ split, read from its manifest), explicit paths, brace
patterns (``shards/msn/train-{000000..000099}.tar``) or ``pipe:`` URLs for object stores
(``pipe:aws s3 cp s3://bucket/msn/train-000000.tar -``, ``pipe:gsutil cat gs://...``). The stages
are module-level generator functions (picklable into DataLoader workers):

    shard urls -> [shuffle / resample] -> split by node -> split by worker -> tar_samples
               -> [sample shuffle buffer] -> decode (only the views asked for)

``tar_samples`` replaces WebDataset's ``tarfile_samples``: Python's tarfile costs ~20 us per member
(as much as decoding a 64x64 PNG, and our scenes have 10-30 members); ``pipeline.tario`` parses
ustar headers directly (measured in tools/bench_loader.py).
"""
from __future__ import annotations

import functools
import os
import random
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import webdataset as wds
from braceexpand import braceexpand

from pipeline import tario
from pipeline.reader import Scene, ShardError, decode_scene, read_manifest


def shard_list(source: str | Sequence[str], split: str | None = None) -> list[str]:
    """Expand a shard source into URLs.

    ``source``: a shard directory (then ``split`` names the split; its manifest lists the shards),
    a path/URL with brace patterns, a ``pipe:`` URL, or a list of those.
    """
    if isinstance(source, (list, tuple)):
        return [u for s in source for u in shard_list(s, split)]
    if not source.startswith('pipe:') and os.path.isdir(source):
        if split is None:
            raise ValueError(f'{source} is a shard directory: name the split')
        manifest = read_manifest(source, split)
        return [os.path.join(source, s['name']) for s in manifest['shards']]
    urls = list(braceexpand(source))
    for u in urls:
        if not u.startswith(('pipe:', 'http://', 'https://')) and not os.path.exists(u):
            raise FileNotFoundError(f'{u}: no such shard')
    return urls


def open_url(url: str):
    """A binary stream for a local path, ``pipe:`` command, or http(s) URL (WebDataset's gopen)."""
    return wds.gopen(url, 'rb')


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, as WebDataset-style dicts of member bytes (fast tar parsing)."""
    stream = open_url(url)
    try:
        sample: dict[str, Any] = {}
        for name, data, _ in tario.iter_members(stream, url):
            key, member = tario.split_key(name)
            if sample and sample['__key__'] != key:
                yield sample
                sample = {}
            if not sample:
                sample = {'__key__': key, '__url__': url}
            sample[member] = data
        if sample:
            yield sample
    finally:
        stream.close()


def reraise(exn: Exception) -> bool:
    raise exn


def warn_and_continue(exn: Exception) -> bool:
    print(f'warning: skipping unreadable shard data: {exn}', file=sys.stderr)
    return True


def tar_samples(src: Iterable[dict[str, Any] | str], handler: Callable[[Exception], bool] = reraise
                ) -> Iterator[dict[str, Any]]:
    """Pipeline stage: shard dicts ``{'url': ...}`` (or URL strings) -> sample dicts.

    A truncated or corrupt shard raises (naming its URL) unless ``handler(exn)`` returns True, in
    which case the rest of that shard is skipped and the stream goes on.
    """
    for item in src:
        url = item['url'] if isinstance(item, dict) else item
        try:
            yield from iter_shard(url)
        except (tario.TarFormatError, ShardError, OSError) as exn:
            if not handler(exn):
                return


def decode_samples(src: Iterable[dict[str, Any]], views: Sequence[int] | None = None,
                   extras: Sequence[str] = (),
                   handler: Callable[[Exception], bool] = reraise) -> Iterator[Scene]:
    """Pipeline stage: sample dicts -> ``Scene`` records (uint8 images of ``views`` only)."""
    for sample in src:
        try:
            yield decode_scene(sample, views=views, extras=extras)
        except ShardError as exn:
            if not handler(exn):
                return


def scene_stream(source: str | Sequence[str], split: str | None = None, *, shuffle: bool = True,
                 resample: bool = False, buffer: int = 64, views: Sequence[int] | None = None,
                 extras: Sequence[str] = (), seed: int = 0,
                 handler: Callable[[Exception], bool] = reraise) -> wds.DataPipeline:
    """A WebDataset pipeline of decoded ``Scene`` records, split across DDP ranks and DataLoader
    workers (use it as a DataLoader's dataset with ``batch_size=None`` or your own collation).

    ``shuffle``: shuffle shard order (seeded) and samples through a ``buffer``-scene buffer;
    ``resample``: draw shards with replacement forever (training); ``views``: decode only these.
    """
    urls = shard_list(source, split)
    if resample:
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle:
            stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed))
    stages += [wds.split_by_node, wds.split_by_worker,
               functools.partial(tar_samples, handler=handler)]
    if shuffle and buffer > 1:
        stages.append(wds.shuffle(buffer, initial=buffer, rng=random.Random(seed)))
    stages.append(functools.partial(decode_samples, views=views, extras=extras, handler=handler))
    return wds.DataPipeline(*stages)
