"""Streaming scenes out of shards: generic, WebDataset underneath, no SRT knowledge.

Shards are named by a shard directory (+ split, read from its manifest), explicit paths, brace
patterns (``shards/msn/train-{000000..000099}.tar``) or ``pipe:`` URLs for object stores
(``pipe:aws s3 cp s3://bucket/msn/train-000000.tar -``, ``pipe:gsutil cat gs://...``). The stages
are module-level generator functions (picklable into DataLoader workers):

    shard urls -> [shuffle / resample] -> split by node -> split by worker -> tar_samples
               -> [sample shuffle buffer] -> Scene (checked; the views asked for decoded)

Samples are parsed by ``pipeline.reader`` only (its ``iter_shard`` and ``Scene``). ``tar_samples``
replaces WebDataset's ``tarfile_samples``: Python's tarfile costs ~20 us per member (as much as
decoding a 64x64 PNG, and our scenes have 10-30 members); ``pipeline.tario`` parses ustar headers
directly (measured in tools/bench_loader.py).
"""
from __future__ import annotations

import functools
import os
import random
from typing import Any, Callable, Iterable, Iterator, Sequence

import webdataset as wds
from braceexpand import braceexpand

from pipeline import tario
from pipeline.reader import Scene, ShardError, iter_shard, shard_urls


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
        return shard_urls(source, split)
    urls = list(braceexpand(source))
    for u in urls:
        if not u.startswith(('pipe:', 'http://', 'https://')) and not os.path.exists(u):
            raise FileNotFoundError(f'{u}: no such shard')
    return urls


def reraise(exn: Exception) -> bool:
    raise exn


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
    """Pipeline stage: sample dicts -> ``Scene`` records, checked, with ``views`` (all by default)
    and their ``extras`` decoded here (in the worker); other views decode on first use."""
    for sample in src:
        try:
            yield Scene(sample).decode(views, extras)
        except ShardError as exn:
            if not handler(exn):
                return


def scene_stream(source: str | Sequence[str], split: str | None = None, *, shuffle: bool = True,
                 resample: bool = False, buffer: int = 64, views: Sequence[int] | None = None,
                 extras: Sequence[str] = (), seed: int = 0,
                 handler: Callable[[Exception], bool] = reraise) -> wds.DataPipeline:
    """A WebDataset pipeline of checked ``Scene`` records (``pipeline.reader``), split across DDP
    ranks and DataLoader workers (use it as a DataLoader's dataset with ``batch_size=None`` or your
    own collation).

    ``shuffle``: shuffle shard order (seeded) and samples through a ``buffer``-scene buffer;
    ``resample``: draw shards with replacement forever (training); ``views``: decode these in the
    stream (default all; only decoded views' pixels travel out of DataLoader workers);
    ``handler(exn) -> bool``: True skips a bad scene or the rest of a bad shard, else it raises.
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
