"""The position of a training stream, for checkpoints: exact resume with the same layout, elastic
resume with another (ranks, workers, per-rank batch), refusal of what cannot continue.

A state (``StreamTracker.state_dict()``, JSON-able, a few hundred bytes per rank):

    {'version': 2, 'seed': 0, 'samples_per_scene': 1, 'scenes': <sha256 of the scene counts> | None,
     'global_batch': 16,                       # ranks x per-rank batch: fixed for a run
     'layout': [ranks, workers, batch, shards_per_visit, buffer],
     'start_epoch': 3,                         # where this layout's deals begin
     'history': {'3': [[layout, {slot: walked}], ...]},  # earlier layouts' consumption per epoch
     'slots': {'5': [epoch, walked, emitted]},  # per slot: after its last consumed batch
     'consumed': 1234,                         # batches consumed per rank
     'counts': {'repeated': 9, 'skipped/too_short': 2, ...}}

The main process records consumed batches (``StreamTracker.update``; a batch's ``_pos`` is
[worker, epoch, walked]); DataLoader workers run ahead, so only consumed batches count. Under DDP every
rank tracks its own slots: ``merge_states`` joins them (the trainer all-gathers before saving).

Resuming (``continue_from``): with the saved layout, every slot continues at its own position (a
worker replays at most one visit without decoding) and batches come out exactly as they would have.
With another layout the epoch's samples not consumed yet (every slot's first ``walked`` positions
are known without reading data: ``pipeline.epochs``) are dealt to the new slots: a ``Link`` records
the old layout's consumption, and no sample of the epoch is repeated or skipped. A slot can be one
epoch ahead of another (DataLoader round-robin), so a transition records links for both epochs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

from pipeline.epochs import Layout, Link

STATE_VERSION = 2


def scenes_fingerprint(counts: Sequence[int]) -> str:
    """sha256 of a split's scene counts per shard (local and remote copies share it)."""
    return hashlib.sha256(json.dumps([int(n) for n in counts]).encode()).hexdigest()[:16]


def layout_list(layout: Layout | Sequence[int | None]) -> list[int | None]:
    return layout.to_list() if isinstance(layout, Layout) else list(layout)


def complete_layout(saved: Sequence[int | None], current: Layout) -> Layout:
    """A stored layout with unknown (None) visit settings taken from ``current``."""
    return Layout(*(c if s is None else s for s, c in zip(saved, current.to_list())))


@dataclasses.dataclass
class StreamPosition:
    """A parsed state (module docstring); ``layout`` may hold None for settings the recorder did
    not know (the stream fills them with its own)."""
    meta: dict[str, Any]
    layout: list[int | None]
    start_epoch: int = 0
    history: dict[int, list[tuple[list[int | None], dict[int, int]]]] = \
        dataclasses.field(default_factory=dict)
    slots: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    consumed: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def slot(self, slot: int) -> tuple[int, int, int]:
        """(epoch, walked, emitted) after the slot's last consumed batch."""
        epoch, walked, emitted = self.slots.get(slot, (self.start_epoch, 0, 0))
        return int(epoch), int(walked), int(emitted)

    def links(self, epoch: int, current: Layout) -> list[Link]:
        return [Link(complete_layout(lay, current), walked)
                for lay, walked in self.history.get(epoch, [])]

    def to_dict(self) -> dict[str, Any]:
        return {'version': STATE_VERSION, **self.meta, 'layout': list(self.layout),
                'start_epoch': self.start_epoch,
                'history': {str(e): [[list(lay), {str(s): w for s, w in walked.items()}]
                                     for lay, walked in links] for e, links in self.history.items()},
                'slots': {str(s): list(v) for s, v in sorted(self.slots.items())},
                'consumed': self.consumed, 'counts': dict(self.counts)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> 'StreamPosition':
        if state.get('version') != STATE_VERSION:
            raise ValueError(f'the saved data-stream state has version {state.get("version")}, not '
                             f'{STATE_VERSION} (saved by another srt-shards version: its position '
                             'cannot be continued; resume from a newer checkpoint or start afresh)')
        meta = {k: state.get(k) for k in ('seed', 'samples_per_scene', 'scenes', 'global_batch')}
        history = {int(e): [(list(lay), {int(s): int(w) for s, w in walked.items()})
                            for lay, walked in links] for e, links in state['history'].items()}
        return cls(meta, list(state['layout']), int(state['start_epoch']), history,
                   {int(s): [int(x) for x in v] for s, v in state['slots'].items()},
                   int(state['consumed']), dict(state.get('counts', {})))


def check_meta(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse a state of another seed, split or sample expansion (the flags to keep are named)."""
    names = {'seed': 'the seed (training.seed / seed=)', 'samples_per_scene': 'samples_per_scene',
             'scenes': 'the same shards (the split\'s scene counts differ)',
             'global_batch': 'the same global batch size'}
    diff = [(k, saved.get(k), now.get(k)) for k in names
            if saved.get(k) is not None and now.get(k) is not None and saved.get(k) != now.get(k)]
    if diff:
        what = ', '.join(f'{"global batch_size" if k == "global_batch" else k}: saved {a}, now {b}'
                         for k, a, b in diff)
        keep = ', '.join(names[k] for k, _, _ in diff)
        raise ValueError(f'the saved data-stream state does not fit this run ({what}); resume with '
                         f'{keep} (ranks and workers may change)')


def continue_from(state: dict[str, Any] | None, meta: dict[str, Any],
                  layout: Sequence[int | None]) -> StreamPosition:
    """The position a run with ``layout`` continues from: a fresh one, the saved one (same layout),
    or the saved one's remainder dealt anew (another layout: links for the epochs in progress)."""
    layout = layout_list(layout)
    if not state:
        return StreamPosition(dict(meta), layout)
    old = StreamPosition.from_dict(state)
    check_meta(old.meta, meta)
    merged = {k: meta.get(k) if meta.get(k) is not None else old.meta.get(k) for k in old.meta}
    same = all(a is None or b is None or a == b for a, b in zip(old.layout, layout))
    if same:
        old.meta, old.layout = merged, [a if b is None else b for a, b in zip(old.layout, layout)]
        return old
    old_slots = old.layout[0] * old.layout[1]
    epochs = [old.slot(s)[0] for s in range(old_slots)]
    history = {e: list(v) for e, v in old.history.items() if e >= min(epochs)}
    for e in range(min(epochs), max(epochs) + 1):
        walked = {}
        for s in range(old_slots):
            epoch, w, _ = old.slot(s)
            if epoch > e or (epoch == e and w):
                walked[s] = -1 if epoch > e else w
        history.setdefault(e, []).append((list(old.layout), walked))
    return StreamPosition(merged, layout, min(epochs), history, {}, old.consumed, dict(old.counts))


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from every rank's ``state_dict()`` (their slots joined, counts summed)."""
    states = [s for s in states if s]
    if not states:
        raise ValueError('merge_states: no states')
    out = json.loads(json.dumps(states[0]))
    for s in states[1:]:
        for k in ('seed', 'layout', 'start_epoch', 'consumed', 'history'):
            if s.get(k) != out.get(k):
                raise ValueError(f'merge_states: the ranks disagree on {k} ({out.get(k)} vs '
                                 f'{s.get(k)}): states of one step of one run are expected')
        out['slots'].update(s['slots'])
        for k, n in s.get('counts', {}).items():
            out['counts'][k] = out['counts'].get(k, 0) + n
    out['slots'] = dict(sorted(out['slots'].items(), key=lambda kv: int(kv[0])))
    return out


class StreamTracker:
    """Records the batches a training loop consumed (``update``) into a state (``state_dict``).

    ``layout``: the run's (ranks, workers, per-rank batch, shards_per_visit, buffer); the last two
    may be None when unknown here (the stream knows them). ``state``: the state resumed from (the
    merged one of all ranks), continued for this layout as the stream continues it; ``rank``:
    this process's rank (its slots are rank * workers + worker)."""

    def __init__(self, meta: dict[str, Any], layout: Sequence[int | None],
                 state: dict[str, Any] | None = None, rank: int = 0):
        layout = layout_list(layout)
        layout[1] = max(1, layout[1] or 1)  # 0 DataLoader workers: the main process is one
        self.position = continue_from(state, meta, layout)
        self.batch_size, self.rank, self.workers = int(layout[2]), rank, layout[1]

    def update(self, batch: dict[str, Any]) -> None:
        """Note a consumed batch (its ``_pos`` and, when present, ``_events``)."""
        worker, epoch, walked = (int(x) for x in batch['_pos'])
        slot = self.rank * self.workers + worker
        prev = self.position.slot(slot)
        emitted = (prev[2] if prev[0] == epoch else 0) + self.batch_size
        self.position.slots[slot] = [epoch, walked, emitted]
        self.position.consumed += 1
        for k, n in (batch.get('_events') or {}).items():
            self.position.counts[k] = self.position.counts.get(k, 0) + int(n)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.position.counts)

    def state_dict(self) -> dict[str, Any]:
        return self.position.to_dict()
