"""Training and evaluation streams of SRT batches from shards, for DDP ranks and DataLoader workers.

Training (``TrainStream``): endless and resampled. Each (rank, worker) runs its own sequence of
*visits*; visit ``v`` reads ``shards_per_visit`` shards drawn from (seed, rank, worker, v),
interleaves their scenes at random, expands scenes into items and passes them through an item
shuffle buffer that is drained at the end of the visit. Every random draw of visit ``v`` comes from
that seed, and each item's view and pixel choices from (seed, rank, worker, v, position), so a
worker's output is a pure function of its position: resuming replays at most one visit without
decoding. Every rank yields batches forever, so DDP ranks never wait on each other whatever the
shard sizes; ``batches_per_epoch`` only counts epochs.

Evaluation (``EvalStream``): every scene of the split exactly once across ranks and workers
(shards dealt out by scene count), all its items (NMR: every input view, as the reference's
evaluation enumerates them), views and pixels drawn from a generator seeded by the scene key.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import tario
from pipeline.reader import Scene, ShardError, iter_shard
from pipeline.reader import shard_table  # noqa: F401  (the trainer's and tools' name for it)
from srt.data import DataConfig, collate, items_per_scene, keep_scene, key_seed, scene_item

STATE_VERSION = 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """Endless batches of ``batch_size`` items (per rank) as dicts of numpy arrays (see
    ``srt.data.make_item``) with ``scene_key`` (list), plus ``_pos`` [logical worker, visit,
    position] and ``_bad`` (shards found unreadable since the previous batch, each logged with its
    URL). With at least as many shards as ranks, the shards are dealt out to ranks by scene count,
    so ranks train on disjoint scenes."""

    def __init__(self, cfg: DataConfig, shards: Sequence[tuple[str, int]], batch_size: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shards_per_visit: int = 8,
                 item_buffer: int = 256, state: dict[str, Any] | None = None):
        if not shards:
            raise ValueError('TrainStream: no shards')
        self.cfg, self.batch_size = cfg, batch_size
        self.total_scenes = sum(n for _, n in shards)
        if len(shards) >= world_size:  # each rank resamples its own shards: ranks see disjoint scenes
            shards = [shards[i] for i in deal_shards(shards, world_size)[rank]]
        elif rank == 0:
            print(f'warning: {len(shards)} shards for {world_size} ranks: every rank samples all '
                  'shards (scenes are not disjoint across ranks; convert with fewer scenes per shard)',
                  file=sys.stderr)
        self.shards = list(shards)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shards_per_visit, self.item_buffer = shards_per_visit, item_buffer
        self.state = state

    def batches_per_epoch(self, num_views: int) -> int:
        """Batches per rank that make one reference epoch (every item once, on average)."""
        items = self.total_scenes * items_per_scene(self.cfg, num_views)
        return max(1, -(-items // (self.batch_size * self.world_size)))

    def _start(self, logical: int) -> tuple[int, int]:
        if not self.state:
            return 0, 0
        visit, pos = self.state['positions'].get(str(logical), (0, 0))
        return int(visit), int(pos)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, num_workers = _worker()
        offset = 0
        if self.state:
            check_state(self.state, self.seed, self.world_size, num_workers, self.batch_size)
            offset = self.state['consumed'] % num_workers
        # The DataLoader takes batches from workers round-robin starting at worker 0; after a resume
        # the next batch must come from the logical worker whose turn it is.
        logical = (physical + offset) % num_workers
        visit, skip = self._start(logical)
        batch: list[dict] = []
        bad = 0
        while True:
            for pos, item, nbad in self._visit(logical, visit, skip):
                bad += nbad
                if item is None:
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    out = collate(batch)
                    out['_pos'] = np.array([logical, visit, pos + 1], np.int64)
                    out['_bad'] = np.array(bad, np.int64)
                    yield out
                    batch, bad = [], 0
            visit, skip = visit + 1, 0

    def _visit(self, worker: int, visit: int, skip: int) -> Iterator[tuple[int, dict | None, int]]:
        """(position, item or None while skipping, bad shards) of one visit, in order."""
        rng = np.random.default_rng([self.seed, self.rank, worker, visit, 7])
        n = min(self.shards_per_visit, len(self.shards))
        chosen = rng.choice(len(self.shards), n, replace=False)
        active = [iter_shard(self.shards[i][0]) for i in chosen]
        urls = [self.shards[i][0] for i in chosen]
        buffer: list[tuple[Scene, int]] = []
        pos, bad = 0, 0

        def emit(entry):
            nonlocal pos, bad
            scene, item = entry
            out = None
            if pos >= skip:
                seed = [self.seed, self.rank, worker, visit, pos]
                try:
                    out = scene_item(self.cfg, scene, item, np.random.default_rng(seed))
                except ShardError as e:
                    print(f'warning: skipping unreadable scene: {e}', file=sys.stderr)
                    bad += 1
            pos += 1
            result = (pos - 1, out, bad)
            bad = 0
            return result

        while active:
            j = int(rng.integers(len(active)))
            try:
                sample = next(active[j])
                scene = Scene(sample)
            except StopIteration:
                del active[j], urls[j]
                continue
            except (tario.TarFormatError, ShardError, OSError) as e:
                print(f'warning: skipping the rest of unreadable shard {urls[j]}: {e}',
                      file=sys.stderr)
                bad += 1
                del active[j], urls[j]
                continue
            if not keep_scene(self.cfg, scene):
                continue
            for item in range(items_per_scene(self.cfg, scene.num_views)):
                buffer.append((scene, item))
            while len(buffer) > self.item_buffer:
                k = int(rng.integers(len(buffer)))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield emit(buffer.pop())
        while buffer:
            k = int(rng.integers(len(buffer)))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield emit(buffer.pop())
        if bad:
            yield pos, None, bad

# ----------------------------------------------------------------------------- stream state

class StreamState:
    """Tracks what the training loop consumed, for checkpoints: per logical worker the position
    after its last consumed batch."""

    def __init__(self, seed: int, world_size: int, num_workers: int, batch_size: int,
                 state: dict[str, Any] | None = None):
        self.meta = {'version': STATE_VERSION, 'seed': seed, 'world_size': world_size,
                     'num_workers': max(1, num_workers), 'batch_size': batch_size}
        self.positions: dict[str, list[int]] = dict(state['positions']) if state else {}
        self.consumed = int(state['consumed']) if state else 0
        self.bad = int(state.get('bad', 0)) if state else 0

    def update(self, batch: dict[str, Any]) -> None:
        worker, visit, pos = (int(x) for x in batch['_pos'])
        self.positions[str(worker)] = [visit, pos]
        self.consumed += 1
        self.bad += int(batch['_bad'])

    def state_dict(self) -> dict[str, Any]:
        return {**self.meta, 'positions': dict(self.positions), 'consumed': self.consumed,
                'bad': self.bad}


def check_state(state: dict, seed: int, world_size: int, num_workers: int, batch_size: int) -> None:
    want = {'version': STATE_VERSION, 'seed': seed, 'world_size': world_size,
            'num_workers': max(1, num_workers), 'batch_size': batch_size}
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
        raise ValueError('the saved data-stream state does not fit this run ('
                         + ', '.join(f'{k}: saved {a}, now {b}' for k, (a, b) in diff.items())
                         + '); resume with the same seed, world size, workers and batch size')


# ----------------------------------------------------------------------------- evaluation

def deal_shards(shards: Sequence[tuple[str, int]], parts: int) -> list[list[int]]:
    """Shard indices per part, balancing scene counts (largest first to the lightest part)."""
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(shards)), key=lambda i: (-shards[i][1], i)):
        p = min(range(parts), key=lambda p: (loads[p], p))
        out[p].append(i)
        loads[p] += shards[i][1]
    return [sorted(o) for o in out]


class EvalStream(IterableDataset):
    """Every scene of the split exactly once across ranks and workers, as batches of items (the
    last one of each worker may be smaller), with ``scene_key`` / ``scene_index`` / ``item`` per
    item. A corrupt shard stops the evaluation with an error naming it, unless ``skip_bad``."""

    def __init__(self, cfg: DataConfig, shards: Sequence[tuple[str, int]], batch_size: int, *,
                 rank: int = 0, world_size: int = 1, max_scenes: int | None = None,
                 seed: int = 0, skip_bad: bool = False):
        # Evaluation scores novel views only, whatever the training targets are.
        self.cfg = dataclasses.replace(cfg, train_on_inputs=False)
        self.batch_size, self.seed, self.skip_bad = batch_size, seed, skip_bad
        self.rank, self.world_size = rank, world_size
        limited, left = [], max_scenes
        for url, n in shards:  # --max-eval: the first scenes in reference order
            if left is not None and left <= 0:
                break
            take = n if left is None else min(n, left)
            limited.append((url, take))
            left = None if left is None else left - take
        self.shards = limited
        self.mine = deal_shards(self.shards, world_size)[rank]

    @property
    def num_scenes(self) -> int:
        return sum(n for _, n in self.shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        mine = [self.mine[i] for i in deal_shards([self.shards[i] for i in self.mine],
                                                  num_workers)[worker]]
        batch: list[dict] = []
        for i in mine:
            url, limit = self.shards[i]
            for item in self._shard_items(url, limit):
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
        if batch:
            yield self._collate(batch)

    def _shard_items(self, url: str, limit: int) -> Iterator[dict]:
        try:
            for n, sample in enumerate(iter_shard(url)):
                if n >= limit:
                    return
                scene = Scene(sample)
                if not keep_scene(self.cfg, scene):
                    continue
                for item in range(items_per_scene(self.cfg, scene.num_views)):
                    rng = np.random.default_rng(key_seed(scene.key, self.seed) + [item])
                    out = scene_item(self.cfg, scene, item, rng)
                    out['scene_index'] = scene.meta['reference_index']
                    out['item'] = item
                    yield out
        except (tario.TarFormatError, ShardError, OSError) as e:
            if not self.skip_bad:
                raise ShardError(f'evaluation stopped: unreadable shard {url}: {e} (pass '
                                 '--skip-bad to skip it and report the count)') from None
            print(f'warning: skipping the rest of unreadable shard {url}: {e}', file=sys.stderr)

    @staticmethod
    def _collate(items: list[dict]) -> dict[str, Any]:
        keys = [it.pop('scene_key') for it in items]
        index = np.array([it.pop('scene_index') for it in items], np.int64)
        item = np.array([it.pop('item') for it in items], np.int64)
        out = collate(items)
        out.update(scene_key=keys, scene_index=index, item=item)
        return out


def fixed_items(cfg: DataConfig, shards: Sequence[tuple[str, int]], num_scenes: int,
                seed: int = 0) -> dict[str, Any]:
    """A collated batch of one item from each of the first ``num_scenes`` scenes (views and pixels
    drawn from key-seeded generators): the fixed scenes of the visualisations."""
    items = []
    for url, _ in shards:
        for sample in iter_shard(url):
            scene = Scene(sample)
            if not keep_scene(cfg, scene):
                continue
            rng = np.random.default_rng(key_seed(scene.key, seed))
            item = int(rng.integers(items_per_scene(cfg, scene.num_views)))
            items.append(scene_item(cfg, scene, item, rng))
            if len(items) == num_scenes:
                return collate(items)
    if not items:
        raise ValueError('no scenes for the visualisation')
    return collate(items)


def loader(dataset: IterableDataset, num_workers: int, pin_memory: bool = False
           ) -> torch.utils.data.DataLoader:
    """A DataLoader over one of the streams (they batch themselves)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
