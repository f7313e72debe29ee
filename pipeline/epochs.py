"""Epochs of a split for any number of ranks and DataLoader workers: which samples each worker of
each rank yields, and in which order. Pure functions of the seed, the epoch, the split's scene
counts per shard and the layout; nothing here reads a byte of a shard.

Terms. A *sample* is one (scene, item) pair, ``item < samples_per_scene`` (1 for most models; SRT's
NMR makes one per input view). The epoch's *global order* lists every sample: the shards in a
permutation seeded by (seed, epoch) (manifest order when not shuffled), their scenes in stored
order, the items of a scene in order; a sample's *id* is its position there. A *slot* is one
DataLoader worker of one rank (``slot = rank * workers + worker``).

Dealing (``deal``). The samples of the epoch not consumed yet (all of them, unless an earlier run
with another layout consumed some: ``Link``) are cut into contiguous pieces of the global order:
one per rank at scene boundaries (ranks never share a scene), then one per worker at sample
boundaries, as equal in size as that allows. In training every slot yields the same number of
batches, ``ceil(largest piece / batch)``: a slot with fewer samples repeats some of its own.

Order inside a slot (``slot_visits``, ``visit_events``): the piece's shards are read in *visits* of
``shards_per_visit`` shards (in global order); a visit interleaves its shards' scenes at random and
passes their samples through a shuffle buffer drained at the visit's end. The draws come from a
generator seeded by (seed, epoch, first id of the visit) and depend on scene counts only, so the
order is fixed before any byte is read: a shard shorter than its manifest count leaves holes
(skipped samples), nothing else moves; local and remote copies of a split give the same order.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

import numpy as np

Intervals = list[tuple[int, int]]  # sorted, disjoint, half-open ranges of sample ids


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an epoch is cut and ordered: ranks x workers slots, the per-rank batch, the visits."""
    ranks: int = 1
    workers: int = 1
    batch_size: int = 1  # samples per batch per rank
    shards_per_visit: int = 4
    buffer: int = 256  # samples in a visit's shuffle buffer (0: stored order)

    def __post_init__(self):
        for name in ('ranks', 'workers', 'batch_size', 'shards_per_visit'):
            if getattr(self, name) < 1:
                raise ValueError(f'stream layout: {name} must be >= 1, got {getattr(self, name)}')
        if self.buffer < 0:
            raise ValueError(f'stream layout: buffer must be >= 0, got {self.buffer}')

    @property
    def slots(self) -> int:
        return self.ranks * self.workers

    def to_list(self) -> list[int]:
        return [self.ranks, self.workers, self.batch_size, self.shards_per_visit, self.buffer]


@dataclasses.dataclass(frozen=True)
class Link:
    """What a run with ``layout`` consumed of an epoch before the layout changed: per slot the
    number of positions it walked (-1: its whole piece)."""
    layout: Layout
    walked: dict[int, int]


# ----------------------------------------------------------------------------- the global order

class EpochOrder:
    """The global order of one epoch's samples (module docstring)."""

    def __init__(self, counts: Sequence[int], seed: int, epoch: int, samples_per_scene: int = 1,
                 shuffle: bool = True):
        counts = np.asarray(counts, np.int64)
        if samples_per_scene < 1:
            raise ValueError(f'samples_per_scene must be >= 1, got {samples_per_scene}')
        if len(counts) == 0 or counts.min() < 0:
            raise ValueError('an epoch needs at least one shard and no negative scene counts')
        self.seed, self.epoch, self.sps = seed, epoch, samples_per_scene
        self.shards = (np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(counts))
                       if shuffle else np.arange(len(counts)))  # original shard per position
        self.scene_start = np.concatenate([[0], np.cumsum(counts[self.shards])])  # [S + 1]
        self.total = int(self.scene_start[-1]) * samples_per_scene

    def position(self, scene: int) -> int:
        """Position in the shard order of the shard holding global scene ``scene``."""
        return int(np.searchsorted(self.scene_start, scene, 'right')) - 1

    def locate(self, sample: int) -> tuple[int, int, int]:
        """(original shard index, scene index inside that shard, item) of a sample id."""
        scene, item = divmod(sample, self.sps)
        p = self.position(scene)
        return int(self.shards[p]), scene - int(self.scene_start[p]), item


# ----------------------------------------------------------------------------- interval sets

def count(intervals: Intervals) -> int:
    return sum(b - a for a, b in intervals)


def _cum(intervals: Intervals) -> list[int]:
    out, n = [0], 0
    for a, b in intervals:
        n += b - a
        out.append(n)
    return out


def rank_of(intervals: Intervals, cum: list[int], sample: int) -> int:
    """How many members of ``intervals`` are < ``sample``."""
    i = bisect.bisect_right(intervals, (sample, float('inf'))) - 1
    if i < 0:
        return 0
    a, b = intervals[i]
    return cum[i] + min(sample, b) - a


def take(intervals: Intervals, cum: list[int], lo: int, hi: int) -> Intervals:
    """Members number ``lo`` to ``hi - 1`` (in increasing order) as intervals."""
    out = []
    i = max(0, bisect.bisect_right(cum, lo) - 1)
    while i < len(intervals) and cum[i] < hi:
        a, _ = intervals[i]
        s, e = a + max(lo - cum[i], 0), a + min(hi, cum[i + 1]) - cum[i]
        if e > s:
            out.append((s, e))
        i += 1
    return out


def to_intervals(ids: np.ndarray) -> Intervals:
    """Sorted unique ids as intervals (runs of consecutive ids)."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = ids[np.concatenate([[0], breaks])].tolist()
    stops = (ids[np.concatenate([breaks - 1, [len(ids) - 1]])] + 1).tolist()
    return list(zip(starts, stops))


def subtract(intervals: Intervals, ids: np.ndarray) -> Intervals:
    """``intervals`` without the sample ids ``ids`` (any order)."""
    if len(ids) == 0:
        return list(intervals)
    keep = expand(intervals)
    return to_intervals(keep[~np.isin(keep, ids)])


def expand(intervals: Intervals) -> np.ndarray:
    return (np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in intervals])
            if intervals else np.zeros(0, np.int64))


# ----------------------------------------------------------------------------- dealing

def deal(remaining: Intervals, layout: Layout, samples_per_scene: int) -> list[Intervals]:
    """Per slot, its piece of ``remaining`` (module docstring): rank cuts at the scene boundary
    nearest to an equal share, worker cuts exact."""
    cum, total, sps = _cum(remaining), count(remaining), samples_per_scene
    cuts = [0]
    for r in range(1, layout.ranks):
        target = round(r * total / layout.ranks)
        if target >= total:
            cuts.append(total)
            continue
        scene = take(remaining, cum, target, target + 1)[0][0] // sps
        lo, hi = rank_of(remaining, cum, scene * sps), rank_of(remaining, cum, (scene + 1) * sps)
        cuts.append(max(cuts[-1], lo if target - lo <= hi - target else hi))
    cuts.append(total)
    pieces = []
    for r in range(layout.ranks):
        start, n = cuts[r], cuts[r + 1] - cuts[r]
        for w in range(layout.workers):
            lo, hi = start + round(w * n / layout.workers), start + round((w + 1) * n / layout.workers)
            pieces.append(take(remaining, cum, lo, hi))
    return pieces


def rank_piece(pieces: list[Intervals], layout: Layout, rank: int) -> Intervals:
    out: Intervals = []
    for w in range(layout.workers):
        out += pieces[rank * layout.workers + w]
    return out


# ----------------------------------------------------------------------------- order inside a slot

@dataclasses.dataclass
class Visit:
    """Shards read together: ``shards`` (original indices), per shard the scenes to read (indices
    inside the shard, increasing) and the global index of its scene 0 (``starts``), and ``ids``
    the visit's sample ids (increasing)."""
    shards: list[int]
    scenes: list[list[int]]
    starts: list[int]
    ids: np.ndarray


def slot_visits(order: EpochOrder, piece: Intervals, shards_per_visit: int) -> list[Visit]:
    """The visits of a slot's piece, in global shard order."""
    ids = expand(piece)
    if len(ids) == 0:
        return []
    scenes = ids // order.sps
    pos = np.searchsorted(order.scene_start, scenes, 'right') - 1
    cuts = np.flatnonzero(np.diff(pos)) + 1  # where the shard changes
    groups = np.split(np.arange(len(ids)), cuts)
    visits = []
    for v in range(0, len(groups), shards_per_visit):
        part = groups[v:v + shards_per_visit]
        shards, per_shard, starts = [], [], []
        for g in part:
            p = int(pos[g[0]])
            shards.append(int(order.shards[p]))
            starts.append(int(order.scene_start[p]))
            per_shard.append(sorted(set((scenes[g] - starts[-1]).tolist())))
        visits.append(Visit(shards, per_shard, starts, ids[part[0][0]:part[-1][-1] + 1]))
    return visits


def visit_events(order: EpochOrder, visit: Visit, buffer: int) -> list[int]:
    """The visit's schedule: ``-(j + 1)`` reads the next scene of the visit's shard ``j``, a value
    ``>= 0`` emits that sample id. Seeded by (seed, epoch, first id of the visit)."""
    rng = np.random.default_rng([order.seed, order.epoch, int(visit.ids[0]), 0x7615])
    sps = order.sps
    items: dict[int, list[int]] = {}
    for x in visit.ids.tolist():
        items.setdefault(x // sps, []).append(x)
    # per shard, its scenes' global indices, last first (pop() takes the next)
    queues = [[start + s for s in reversed(scenes)] for start, scenes in zip(visit.starts, visit.scenes)]
    active = [j for j in range(len(queues)) if queues[j]]
    # All draws at once (one uniform per read and per emission; floor(u * k) is uniform in [0, k)):
    # a visit's schedule is computed whenever it starts, so it must be cheap.
    read_u = iter(rng.random(len(items)).tolist())
    emit_u = iter(rng.random(len(visit.ids)).tolist())
    events: list[int] = []
    buf: list[int] = []

    def emit_one():
        k = int(next(emit_u) * len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        events.append(buf.pop())

    while active:
        a = int(next(read_u) * len(active))
        j = active[a]
        scene = queues[j].pop()
        if not queues[j]:
            del active[a]
        events.append(-(j + 1))
        buf.extend(items[scene])
        if buffer == 0:
            events.extend(buf)
            buf.clear()
        while len(buf) > buffer:
            emit_one()
    while buf:
        emit_one()
    return events


def emitted_ids(order: EpochOrder, visits: list[Visit], buffer: int, walked: int) -> np.ndarray:
    """The sample ids of a slot's first ``walked`` positions (all of them for -1 or more)."""
    total = sum(len(v.ids) for v in visits)
    if walked < 0 or walked >= total:
        return np.concatenate([v.ids for v in visits]) if visits else np.zeros(0, np.int64)
    out, left = [], walked
    for v in visits:
        if left >= len(v.ids):
            out.append(v.ids)
            left -= len(v.ids)
            continue
        if left:
            out.append(np.array([e for e in visit_events(order, v, buffer) if e >= 0][:left]))
        break
    return np.concatenate(out) if out else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- one epoch's deal

@dataclasses.dataclass
class EpochDeal:
    """One epoch under one layout: the order, each slot's piece and visits (built on demand), the
    batches every slot yields in training."""
    order: EpochOrder
    layout: Layout
    remaining: Intervals
    pieces: list[Intervals]

    @property
    def batches(self) -> int:
        largest = max((count(p) for p in self.pieces), default=0)
        return -(-largest // self.layout.batch_size)

    @property
    def repeats(self) -> int:
        """Samples repeated in training so that every slot yields ``batches`` full batches."""
        return self.batches * self.layout.batch_size * self.layout.slots - count(self.remaining)

    def visits(self, slot: int) -> list[Visit]:
        return slot_visits(self.order, self.pieces[slot], self.layout.shards_per_visit)

    def repeat_source(self, slot: int) -> list[Visit]:
        """Where an empty slot takes its repeats: its rank's piece, else its rank's piece of the
        whole epoch (empty only with fewer scenes than ranks: ``check_ranks`` refuses that)."""
        rank = slot // self.layout.workers
        piece = rank_piece(self.pieces, self.layout, rank)
        if not piece:
            piece = rank_piece(deal([(0, self.order.total)], self.layout, self.order.sps),
                               self.layout, rank)
        return slot_visits(self.order, piece, self.layout.shards_per_visit)


def plan_epoch(counts: Sequence[int], seed: int, epoch: int, layout: Layout,
               samples_per_scene: int = 1, history: Sequence[Link] = (),
               shuffle: bool = True) -> EpochDeal:
    """The deal of ``epoch`` for ``layout`` after the consumption recorded in ``history``."""
    order = EpochOrder(counts, seed, epoch, samples_per_scene, shuffle)
    remaining: Intervals = [(0, order.total)] if order.total else []
    for link in history:
        pieces = deal(remaining, link.layout, samples_per_scene)
        done = [emitted_ids(order, slot_visits(order, pieces[s], link.layout.shards_per_visit),
                            link.layout.buffer, w) for s, w in link.walked.items() if w]
        remaining = subtract(remaining, np.concatenate(done) if done else np.zeros(0, np.int64))
    return EpochDeal(order, layout, remaining, deal(remaining, layout, samples_per_scene))


def check_ranks(counts: Sequence[int], ranks: int) -> None:
    """Refuse a training run in which some rank would have no scene (it could not yield batches
    of its own, and DDP would wait for it)."""
    scenes = int(np.sum(counts))
    if scenes < ranks:
        raise ValueError(f'{scenes} scenes for {ranks} ranks: every rank needs a scene of its own '
                         '(run on fewer ranks, or convert more scenes)')
