"""One multi-view stream for any model: batches of samples of chosen views from a split's shards,
split over DDP ranks and DataLoader workers, with epochs, equal batches per rank and exact (and
elastic) resume. No model knowledge: what a sample holds is the ``build`` callable's business
(``pipeline.viewsample.ViewSamples`` for views + cameras; SRT passes its own item builder).

    shards = split_shards('shards/re10k', 'train')
    stream = MultiViewStream(shards, batch_size=8, build=ViewSamples(BoundedSampler(),
                             [ResizeCrop(256, 256)]), rank=rank, world_size=world)
    loader = MultiViewLoader(stream, num_workers=4, state=saved)   # saved: a merged state_dict()
    for batch in loader: ...; saved = loader.state_dict()

Stages per DataLoader worker (module-level, picklable): read (the slot's visits, ``pipeline.epochs``;
shards opened through ``pipeline.fetch.ShardFetcher``, parsed by ``pipeline.reader``) -> choose
views, decode, camera transforms (``build(scene, item, rng, step)``) -> collate. Which samples and
in which order: ``pipeline.epochs`` (a function of the seed, the epoch and the split's scene counts,
so local and remote shards give the same batches). Training (``train=True``) runs epoch after
epoch forever; every slot yields the same number of full batches per epoch, repeating a few of its
own samples (counted as ``repeated``). Evaluation (``train=False``): one pass, every scene once
across ranks and workers in manifest order, last batches partial.

Every batch carries ``_pos`` [worker, epoch, positions walked] (for ``StreamTracker``), ``_bad``
(unreadable shards and scenes since the previous batch) and ``_events`` (counts since the previous
batch: ``repeated``, ``skipped/<reason>``, ``bad_shards``, ``bad_scenes``, ``missing_scenes``,
``fetch/<counter>``), and ``_failed`` when shards were skipped since then (``ShardFaults.take()``).
A sample's draws come from (seed, epoch, shard, scene, item, repeat round).
"""
from __future__ import annotations

import bisect
import dataclasses
import sys
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import epochs as ep
from pipeline import tario
from pipeline.fetch import ShardFaults, ShardFetcher
from pipeline.reader import Scene, ShardError, iter_shard, read_manifest, shard_urls
from pipeline.streamstate import (StreamPosition, StreamTracker, check_meta, continue_from,
                                  scenes_fingerprint)
from pipeline.views import SkipScene
from pipeline.viewsample import collate as collate_samples

SHARD_ERRORS = (tario.TarFormatError, ShardError, OSError)  # ShardFetchError is an OSError
# Members of at least this size in local (or downloaded) shards are read only when a sample decodes
# them: an RE10K-like clip has 100 JPEG views of which an item uses a few.
DEFER_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class ShardRef:
    """A shard of a split: its URL, scene count and manifest entry (sha256, bytes: verified
    remote reads)."""
    url: str
    scenes: int
    entry: Mapping[str, Any] | None = None


def split_shards(directory: str, split: str, url_template: str | None = None) -> list[ShardRef]:
    """The split's shards from its manifest (``url_template`` as in ``reader.shard_table``)."""
    entries = read_manifest(directory, split)['shards']
    return [ShardRef(url, int(e['scenes']), e)
            for url, e in zip(shard_urls(directory, split, url_template), entries)]


def as_refs(shards: Sequence[ShardRef | tuple]) -> list[ShardRef]:
    """ShardRefs from ShardRefs or (url, scenes[, entry]) tuples (``reader.shard_table`` rows)."""
    return [s if isinstance(s, ShardRef) else ShardRef(*s) for s in shards]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class MultiViewStream(IterableDataset):
    """Batches of ``build(scene, item, rng, step)`` results (module docstring).

    ``samples_per_scene``: samples per scene (``item`` numbers them); ``shards_per_visit`` and
    ``buffer``: shards read together and the shuffle buffer (samples) of a visit; ``faults``: the
    policy for unreadable shards (``ShardFaults``: training skips and counts, evaluation stops;
    in evaluation also for unreadable scenes); ``batches_per_step``: batches per training step
    (gradient accumulation), for samplers with a warm-up schedule."""

    def __init__(self, shards: Sequence[ShardRef | tuple], batch_size: int,
                 build: Callable[..., dict[str, Any]], *, samples_per_scene: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shards_per_visit: int = 4,
                 buffer: int = 256, train: bool = True, collate: Callable = collate_samples,
                 fetcher: ShardFetcher | None = None, faults: Callable | None = None,
                 state: dict[str, Any] | None = None, batches_per_step: int = 1):
        self.shards = as_refs(shards)
        if not self.shards:
            raise ValueError('MultiViewStream: no shards')
        if not 0 <= rank < world_size:
            raise ValueError(f'MultiViewStream: rank {rank} is not in a world of {world_size}')
        self.counts = [s.scenes for s in self.shards]
        self.batch_size, self.build, self.sps = batch_size, build, samples_per_scene
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shards_per_visit = shards_per_visit if train else 1
        self.buffer = buffer if train else 0
        self.train, self.collate, self.batches_per_step = train, collate, batches_per_step
        self.fetcher = fetcher or ShardFetcher()
        self.faults = faults or ShardFaults('skip' if train else 'stop')
        self.state = state
        self.layout(1)  # validates the settings
        if train:
            ep.check_ranks(self.counts, world_size)

    # ------------------------------------------------------------------------- settings, state

    def layout(self, num_workers: int) -> ep.Layout:
        return ep.Layout(self.world_size, max(1, num_workers), self.batch_size,
                         self.shards_per_visit, self.buffer)

    @property
    def meta(self) -> dict[str, Any]:
        return {'seed': self.seed, 'samples_per_scene': self.sps,
                'scenes': scenes_fingerprint(self.counts),
                'global_batch': self.world_size * self.batch_size}

    def epoch_batches(self, num_workers: int = 0, epoch: int = 0) -> int:
        """Batches per rank in a whole epoch (training: every worker yields the same number)."""
        deal = ep.plan_epoch(self.counts, self.seed, epoch, self.layout(num_workers), self.sps,
                             shuffle=self.train)
        return deal.batches * deal.layout.workers

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a (merged) ``StreamTracker.state_dict()``; before iterating."""
        if state:
            check_meta(StreamPosition.from_dict(state).meta, self.meta)
        self.state = state

    def tracker(self, num_workers: int) -> StreamTracker:
        """The main process's recorder of consumed batches for this stream and ``num_workers``."""
        return StreamTracker(self.meta, self.layout(num_workers).to_list(), self.state, self.rank)

    # ------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.worker_batches(*_worker())

    def worker_batches(self, physical: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The batches of DataLoader worker ``physical`` of ``num_workers`` (what ``iter`` gives
        inside that worker; a DataLoader takes them round-robin from worker 0)."""
        layout = self.layout(num_workers)
        if not self.train:
            deal = ep.plan_epoch(self.counts, self.seed, 0, layout, self.sps, shuffle=False)
            yield from self._walk(deal, self.rank * num_workers + physical, 0, 0, None, [physical])
            return
        pos = continue_from(self.state, self.meta, layout.to_list())
        # The DataLoader takes batches from its workers round-robin from worker 0: after a resume
        # the next batch must come from the worker (slot) whose turn it is.
        slot = self.rank * num_workers + (physical + pos.consumed) % num_workers
        epoch, walked, emitted = pos.slot(slot)
        batch_index = [pos.consumed + physical]  # this rank's index of the next batch
        while True:
            deal = ep.plan_epoch(self.counts, self.seed, epoch, layout, self.sps,
                                 pos.links(epoch, layout))
            need = deal.batches * self.batch_size
            if emitted < need:
                yield from self._walk(deal, slot, walked, emitted, need, batch_index)
            epoch, walked, emitted = epoch + 1, 0, 0

    def _walk(self, deal: ep.EpochDeal, slot: int, walked: int, emitted: int, need: int | None,
              batch_index: list[int]) -> Iterator[dict[str, Any]]:
        """Batches of one slot in one epoch from position ``walked``; positions past the slot's
        piece repeat it (round 1, 2, ...) until ``need`` samples are out (training)."""
        own = deal.visits(slot)
        visits = own or (deal.repeat_source(slot) if need else [])
        if not visits:
            return
        starts = np.cumsum([0] + [len(v.ids) for v in visits]).tolist()
        total, base = starts[-1], 0 if own else 1
        batch: list[dict[str, Any]] = []
        events: Counter = Counter()
        since_item = 0
        while need is not None or walked < total:
            rnd, offset = divmod(walked, total)
            i = bisect.bisect_right(starts, offset) - 1
            step = batch_index[0] // self.batches_per_step
            for gid, scene in self._visit(deal.order, visits, i, offset - starts[i], events):
                walked += 1
                item = self._item(deal.order, gid, scene, base + rnd, step, events)
                if item is None:
                    since_item += 1
                    if since_item >= total and need is not None:
                        raise RuntimeError(f'stream slot {slot}: none of its {total} samples in '
                                           f'epoch {deal.order.epoch} is usable ({dict(events)})')
                    continue
                since_item = 0
                batch.append(item)
                emitted += 1
                if base + rnd:
                    events['repeated'] += 1
                if len(batch) == self.batch_size:
                    yield self._batch(batch, slot, deal.layout.workers, deal.order.epoch, walked,
                                      events)
                    batch = []
                    events.clear()  # in place: the visit being read counts into it
                    batch_index[0] += deal.layout.workers
                    step = batch_index[0] // self.batches_per_step
                    if need is not None and emitted >= need:
                        return
        if batch:
            yield self._batch(batch, slot, deal.layout.workers, deal.order.epoch, walked, events)

    def _batch(self, items: list[dict[str, Any]], slot: int, workers: int, epoch: int,
               walked: int, events: Counter) -> dict[str, Any]:
        out = self.collate(items)
        if not isinstance(out, dict):
            return out
        for k, n in self.fetcher.counters.take().items():
            events[f'fetch/{k}'] += n
        out['_pos'] = np.array([slot % workers, epoch, walked], np.int64)
        out['_bad'] = np.array(events['bad_shards'] + events['bad_scenes'], np.int64)
        out['_events'] = {k: int(n) for k, n in events.items() if n}
        failed = self.faults.take() if hasattr(self.faults, 'take') else None
        if failed:  # shards skipped since the previous batch: url, reason, scenes
            out['_failed'] = failed
        return out

    def _item(self, order: ep.EpochOrder, gid: int, scene: Scene | str, rnd: int, step: int,
              events: Counter) -> dict[str, Any] | None:
        if isinstance(scene, str):  # the reason it could not be read
            events[f'skipped/{scene}'] += 1
            return None
        shard, index, item = order.locate(gid)
        rng = np.random.default_rng([self.seed, order.epoch, shard, index, item, rnd])
        try:
            return self.build(scene, item, rng, step)
        except SkipScene as e:
            events[f'skipped/{e.reason}'] += 1
        except ShardError as e:  # an undecodable view
            self._bad_scene(e, self.shards[shard], events)
        return None

    def _bad_scene(self, exn: ShardError, ref: ShardRef, events: Counter) -> None:
        if not self.train:
            self.faults(exn, ref.url, ref.entry)  # stops (raises) unless the policy skips
        else:
            print(f'warning: skipping unreadable scene: {exn}', file=sys.stderr)
        events['bad_scenes'] += 1

    # ------------------------------------------------------------------------- reading a visit

    def _visit(self, order: ep.EpochOrder, visits: list[ep.Visit], i: int, skip: int,
               events: Counter) -> Iterator[tuple[int, Scene | str]]:
        """(sample id, Scene or why there is none) for the emissions of ``visits[i]`` from
        position ``skip`` on; the first ``skip`` are read through without parsing."""
        visit = visits[i]
        for j in visits[i + 1].shards if i + 1 < len(visits) else ():
            self.fetcher.prefetch(self.shards[j].url, self.shards[j].entry)
        readers = [_ShardReader(self.shards[j], self.fetcher) for j in visit.shards]
        left = Counter((visit.ids // order.sps).tolist())  # samples still to emit per scene
        store: dict[int, Any] = {}
        nxt = [0] * len(readers)
        pos = 0
        try:
            for ev in ep.visit_events(order, visit, self.buffer):
                if ev < 0:
                    j = -ev - 1
                    index = visit.scenes[j][nxt[j]]
                    nxt[j] += 1
                    store[visit.starts[j] + index] = readers[j].read(index, self, events)
                    continue
                g = ev // order.sps
                if pos >= skip:
                    if isinstance(store[g], dict):
                        store[g] = self._parse(store[g], readers, visit, g, events)
                    yield ev, store[g]
                pos += 1
                left[g] -= 1
                if not left[g]:
                    del store[g]
        finally:
            for r in readers:
                r.close()

    def _parse(self, sample: dict[str, Any], readers: list['_ShardReader'], visit: ep.Visit,
               g: int, events: Counter) -> Scene | str:
        try:
            return Scene(sample)
        except ShardError as e:
            j = max(k for k, s in enumerate(visit.starts) if s <= g)
            self._bad_scene(e, readers[j].ref, events)
            return 'bad_scene'


class _ShardReader:
    """One shard of a visit, read forward: the scenes asked for by index, the others passed over
    (tar members read, nothing parsed). Opened on the first read."""

    def __init__(self, ref: ShardRef, fetcher: ShardFetcher):
        self.ref, self.fetcher = ref, fetcher
        self.samples: Iterator[dict[str, Any]] | None = None
        self.index = 0  # of the next sample in the shard
        self.failed: str | None = None

    def read(self, index: int, stream: MultiViewStream, events: Counter) -> dict[str, Any] | str:
        if self.failed:
            return self.failed
        try:
            if self.samples is None:
                self.samples = iter_shard(self.ref.url, self.fetcher.open(self.ref.url, self.ref.entry),
                                          defer=DEFER_BYTES)
            while True:
                sample = next(self.samples, None)
                if sample is None:
                    print(f'warning: shard {self.ref.url} ends after {self.index} scenes (its '
                          f'manifest says {self.ref.scenes})', file=sys.stderr)
                    events['missing_scenes'] += self.ref.scenes - self.index
                    self.failed = 'missing'
                    return self.failed
                self.index += 1
                if self.index - 1 == index:
                    return sample
        except SHARD_ERRORS as e:
            stream.faults(e, self.ref.url, self.ref.entry)  # raises unless the policy skips
            events['bad_shards'] += 1
            self.failed = 'bad_shard'
            self.close()
            return self.failed

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()
            self.samples = None


# ----------------------------------------------------------------------------- DataLoader

class MultiViewLoader:
    """A DataLoader over a training ``MultiViewStream`` that records the batches it hands out:
    ``state_dict()`` after any batch resumes exactly there (``state=`` of a new loader; under DDP
    join every rank's ``state_dict()`` with ``pipeline.streamstate.merge_states`` first). Each
    ``iter()`` continues where the previous one stopped."""

    def __init__(self, stream: MultiViewStream, num_workers: int = 0, *,
                 state: dict[str, Any] | None = None, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        if not stream.train and stream.world_size > 1:
            raise ValueError('MultiViewLoader: an evaluation stream (train=False) gives ranks '
                             'different numbers of batches and would hang DDP training; use '
                             'train=True')
        if state is not None:
            stream.load_state_dict(state)
        self.stream, self.num_workers = stream, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.tracker = stream.tracker(num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.state = self.tracker.state_dict()  # where the previous iteration stopped
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None)
        for batch in loader:
            self.tracker.update(batch)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()
