"""SRT's training and evaluation streams: thin layers on ``pipeline.multiview.MultiViewStream``.

What SRT adds is its item (``srt.data.scene_item``: the reference's view choice, canonical frame,
sampled target pixels) and its sample expansion (NMR and ObSuRF: one item per input view of a
scene; MSN: one per scene). Everything else is the generic stream's: epochs in which every item is
trained on once across all ranks and workers (ranks on disjoint scenes; the few items that give
every rank the same number of batches are repeated and counted), exact resume from a consumed
batch, elastic resume with another number of ranks or workers (``pipeline.streamstate``).

Training (``TrainStream``): endless full batches, with ``_pos`` / ``_bad`` / ``_events`` for
``StreamState``. Evaluation (``EvalStream``): every scene of the split once across ranks and
workers, in manifest order, all its items, views and pixels drawn from a generator seeded by the
scene key; a corrupt shard stops it naming the shard unless ``skip_bad``.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipeline.fetch import ShardFetcher
from pipeline.multiview import MultiViewStream, ShardRef, as_refs, split_shards  # noqa: F401
from pipeline.reader import Scene, ShardError, iter_shard
from pipeline.reader import shard_table  # noqa: F401  (the trainer's and tools' name for it)
from pipeline.streamstate import StreamTracker, merge_states
from pipeline.views import SkipScene
from srt.data import (MSN_LIKE, DataConfig, collate, items_per_scene, keep_scene, key_seed,
                      scene_item)
from srt.distributed import gather_lists


@dataclasses.dataclass(frozen=True)
class SRTItems:
    """The stream's item builder: the reference's view choice and item for ``(scene, item)``.
    ``key_seed``: draw views and pixels from the scene key (evaluation: reproducible per scene)
    instead of the stream's generator; ``tag``: add ``scene_index`` and ``item``."""
    cfg: DataConfig
    key_seed: int | None = None
    tag: bool = False

    def __call__(self, scene: Scene, item: int, rng: np.random.Generator, step: int
                 ) -> dict[str, Any]:
        if not keep_scene(self.cfg, scene):
            raise SkipScene('max_objects', f'{scene.key} has more than {self.cfg.max_objects}')
        if self.key_seed is not None:
            rng = np.random.default_rng(key_seed(scene.key, self.key_seed) + [item])
        out = scene_item(self.cfg, scene, item, rng)
        if self.tag:
            out['scene_index'] = scene.meta['reference_index']
            out['item'] = item
        return out


def _num_views(shards: Sequence[ShardRef], fetcher: ShardFetcher | None = None) -> int:
    """Views per scene, from the split's first scene (SRT's sets have one view count)."""
    fetcher = fetcher or ShardFetcher()
    for ref in shards:
        samples = iter_shard(ref.url, fetcher.open(ref.url, ref.entry))
        try:
            sample = next(samples, None)
        finally:
            samples.close()
        if sample is not None:
            return Scene(sample).num_views
    raise ValueError('no scenes in the shards')


def _samples_per_scene(cfg: DataConfig, shards: Sequence[ShardRef], num_views: int | None,
                       fetcher: ShardFetcher | None = None) -> int:
    if cfg.dataset in MSN_LIKE:
        return 1
    return items_per_scene(cfg, num_views if num_views is not None else
                           _num_views(shards, fetcher))


class TrainStream(MultiViewStream):
    """Endless batches of ``batch_size`` SRT items per rank (numpy dicts, see
    ``srt.data.make_item``) with ``scene_key`` (list) and the stream's ``_pos`` [worker, epoch,
    position], ``_bad`` (unreadable shards and scenes since the previous batch, each logged with
    its URL) and ``_events``. ``num_views``: views per scene (read from the first scene if None);
    ``state``: a saved (merged) ``StreamState.state_dict()``."""

    def __init__(self, cfg: DataConfig, shards: Sequence[tuple | ShardRef], batch_size: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shards_per_visit: int = 8,
                 item_buffer: int = 256, state: dict[str, Any] | None = None,
                 num_views: int | None = None, fetcher: ShardFetcher | None = None):
        refs = as_refs(shards)
        if not refs:
            raise ValueError('TrainStream: no shards')
        self.cfg, self.total_scenes = cfg, sum(r.scenes for r in refs)
        super().__init__(refs, batch_size, SRTItems(cfg),
                         samples_per_scene=_samples_per_scene(cfg, refs, num_views, fetcher),
                         seed=seed, rank=rank, world_size=world_size,
                         shards_per_visit=shards_per_visit,
                         buffer=item_buffer, collate=collate, fetcher=fetcher, state=state)

    def batches_per_epoch(self, num_views: int) -> int:
        """Batches per rank that make one reference epoch (every item once, on average): the
        trainer's epoch counter. The stream's own epochs add the repeats (``epoch_batches``)."""
        items = self.total_scenes * items_per_scene(self.cfg, num_views)
        return max(1, -(-items // (self.batch_size * self.world_size)))


class StreamState(StreamTracker):
    """What the training loop consumed (``update(batch)``), for checkpoints (``state_dict``);
    ``state``: the (merged) state resumed from. ``shards_per_visit``/``buffer``: the stream's,
    recorded so that a later run with another layout can tell what this one consumed."""

    def __init__(self, seed: int, world_size: int, num_workers: int, batch_size: int,
                 state: dict[str, Any] | None = None, *, rank: int = 0,
                 shards_per_visit: int | None = None, buffer: int | None = None):
        meta = {'seed': seed, 'samples_per_scene': None, 'scenes': None,
                'global_batch': world_size * batch_size}
        super().__init__(meta, [world_size, num_workers, batch_size, shards_per_visit, buffer],
                         state, rank)
        self._fetch_last = self._fetch_counts()

    @classmethod
    def of(cls, stream: MultiViewStream, num_workers: int, state: dict[str, Any] | None = None
           ) -> 'StreamState':
        """The recorder of ``stream`` run by ``num_workers`` DataLoader workers (its whole layout
        and meta recorded)."""
        out = cls.__new__(cls)
        StreamTracker.__init__(out, stream.meta, stream.layout(num_workers).to_list(), state,
                               stream.rank)
        out._fetch_last = out._fetch_counts()  # a resumed state's counts are earlier runs'
        return out

    def update(self, batch: dict[str, Any]) -> None:
        super().update(batch)
        if batch.get('_failed'):
            self.__dict__.setdefault('_failed', []).extend(batch['_failed'])

    def _fetch_counts(self) -> dict[str, int]:
        return {k: n for k, n in self.counts.items() if k.startswith('fetch/')}

    def fetch_record(self) -> dict[str, Any]:
        """metrics.jsonl's remote-read fields since the previous call, summed over ranks (a
        collective under DDP: call it on every rank): ``fetch_<counter>`` (``fetch_retries``,
        ``fetch_gave_up``, ``fetch_cache_hits``...: ``pipeline.remote.FetchCounters``) and
        ``failed_shards``, the shards skipped with their reason and scene count."""
        counts = self._fetch_counts()
        mine = {k: n - self._fetch_last.get(k, 0) for k, n in counts.items()}
        self._fetch_last, failed = counts, self.__dict__.pop('_failed', [])
        out: dict[str, Any] = {'fetch_retries': 0, 'fetch_gave_up': 0}
        for part, records in gather_lists([(mine, failed)]):
            for k, n in part.items():
                out[f'fetch_{k[6:]}'] = out.get(f'fetch_{k[6:]}', 0) + n
            out.setdefault('failed_shards', []).extend(records)
        if not out['failed_shards']:
            del out['failed_shards']
        return out

    def global_state(self) -> dict[str, Any]:
        """Every rank's state joined (a collective under DDP: call it on every rank)."""
        return merge_states(gather_lists([self.state_dict()]))

    @property
    def bad(self) -> int:
        """Unreadable shards and scenes met so far."""
        return self.counts.get('bad_shards', 0) + self.counts.get('bad_scenes', 0)

    @property
    def repeated(self) -> int:
        """Items repeated so that every rank trains on the same number of batches."""
        return self.counts.get('repeated', 0)

    @property
    def skipped(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith('skipped/'))


# ----------------------------------------------------------------------------- evaluation

@dataclasses.dataclass(frozen=True)
class _EvalFaults:
    """Evaluation's policy for unreadable shards and scenes: stop naming them, or skip."""
    skip_bad: bool

    def __call__(self, exn: BaseException, url: str | None = None, entry=None) -> bool:
        if not self.skip_bad:
            raise ShardError(f'evaluation stopped: unreadable shard {url}: {exn} (pass '
                             '--skip-bad to skip it and report the count)') from None
        print(f'warning: skipping unreadable data in shard {url}: {exn}', file=sys.stderr)
        return True


def _eval_collate(items: list[dict]) -> dict[str, Any]:
    keys = [it.pop('scene_key') for it in items]
    index = np.array([it.pop('scene_index') for it in items], np.int64)
    item = np.array([it.pop('item') for it in items], np.int64)
    out = collate(items)
    out.update(scene_key=keys, scene_index=index, item=item)
    return out


class EvalStream(MultiViewStream):
    """Every scene of the split exactly once across ranks and workers, as batches of items (the
    last one of each worker may be smaller), with ``scene_key`` / ``scene_index`` / ``item`` per
    item. A corrupt shard stops the evaluation with an error naming it, unless ``skip_bad``."""

    def __init__(self, cfg: DataConfig, shards: Sequence[tuple | ShardRef], batch_size: int, *,
                 rank: int = 0, world_size: int = 1, max_scenes: int | None = None,
                 seed: int = 0, skip_bad: bool = False, num_views: int | None = None,
                 fetcher: ShardFetcher | None = None):
        # Evaluation scores novel views only, whatever the training targets are.
        cfg = dataclasses.replace(cfg, train_on_inputs=False)
        limited, left = [], max_scenes
        for ref in as_refs(shards):  # --max-eval: the first scenes in reference order
            if left is not None and left <= 0:
                break
            take = ref.scenes if left is None else min(ref.scenes, left)
            limited.append(ShardRef(ref.url, take, ref.entry))
            left = None if left is None else left - take
        super().__init__(limited, batch_size, SRTItems(cfg, key_seed=seed, tag=True),
                         samples_per_scene=_samples_per_scene(cfg, limited, num_views, fetcher),
                         seed=seed, rank=rank, world_size=world_size, train=False,
                         collate=_eval_collate, fetcher=fetcher, faults=_EvalFaults(skip_bad))
        self.cfg = cfg

    @property
    def num_scenes(self) -> int:
        return sum(self.counts)


@dataclasses.dataclass(frozen=True)
class _FixedItem:
    """One item per scene, the item and its draws from the scene key."""
    cfg: DataConfig
    seed: int

    def __call__(self, scene: Scene, item: int, rng, step: int) -> dict[str, Any]:
        if not keep_scene(self.cfg, scene):
            raise SkipScene('max_objects')
        rng = np.random.default_rng(key_seed(scene.key, self.seed))
        item = int(rng.integers(items_per_scene(self.cfg, scene.num_views)))
        return scene_item(self.cfg, scene, item, rng)


def _as_list(items: list[dict]) -> list[dict]:
    return items


def fixed_items(cfg: DataConfig, shards: Sequence[tuple | ShardRef], num_scenes: int,
                seed: int = 0, fetcher: ShardFetcher | None = None) -> dict[str, Any]:
    """A collated batch of one item from each of the first ``num_scenes`` scenes (views and pixels
    drawn from key-seeded generators): the fixed scenes of the visualisations."""
    stream = MultiViewStream(shards, 1, _FixedItem(cfg, seed), seed=seed, train=False,
                             collate=_as_list, fetcher=fetcher)
    items: list[dict] = []
    for batch in stream:
        items += batch
        if len(items) == num_scenes:
            break
    if not items:
        raise ValueError('no scenes for the visualisation')
    return collate(items)


def loader(dataset: IterableDataset, num_workers: int, pin_memory: bool = False
           ) -> torch.utils.data.DataLoader:
    """A DataLoader over one of the streams (they batch themselves)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
