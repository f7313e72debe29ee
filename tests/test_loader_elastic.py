"""SRT's training stream resumes with another number of ranks or workers (the trainer's resume after
changing the number of GPUs or --workers, global batch kept): the epoch continues with every item
(scene, input view) once, apart from the counted repeats."""
import hashlib
from collections import Counter

import pytest

from srt.loader import StreamState, TrainStream
from tests.test_loader import CFG, seven_shards  # noqa: F401  (fixture)


def items(batches, epoch):
    """(scene key, input image digest) of each item of ``epoch``: NMR item i has view i as input."""
    return [(key, hashlib.sha1(image.tobytes()).hexdigest())
            for b in batches if int(b['_pos'][1]) == epoch
            for key, image in zip(b['scene_key'], b['input_images'])]


def run(shards, ranks, workers, batch, state=None, stop=None):
    """Batches of every rank as DataLoaders with ``workers`` workers hand them out (round-robin):
    ``stop`` per rank (returning each rank's StreamState), or until epoch 0 is over."""
    out, trackers = [], []
    for rank in range(ranks):
        stream = TrainStream(CFG, shards, batch, seed=5, rank=rank, world_size=ranks,
                             shards_per_visit=3, item_buffer=20, state=state)
        tracker = StreamState.of(stream, workers, state)
        its = [stream.worker_batches(w, workers) for w in range(workers)]
        done = [False] * workers
        n = 0
        while not all(done) and (stop is None or n < stop):
            w = n % workers
            n += 1
            if done[w]:
                continue
            b = next(its[w])
            if stop is None and int(b['_pos'][1]) > 0:
                done[w] = True
                continue
            tracker.update(b)
            out.append(b)
        trackers.append(tracker)
    return out, trackers


@pytest.mark.parametrize('ranks, workers, batch', [(1, 2, 6), (3, 1, 2)])
def test_srt_stream_resumes_on_another_number_of_ranks_and_workers(seven_shards, ranks, workers,
                                                                    batch):
    from pipeline.streamstate import merge_states
    before, trackers = run(seven_shards, 2, 2, 3, stop=9)
    state = merge_states([t.state_dict() for t in trackers])
    after, _ = run(seven_shards, ranks, workers, batch, state=state)
    seen = items(before, 0) + items(after, 0)
    repeated = sum(b['_events'].get('repeated', 0) for b in before + after
                   if int(b['_pos'][1]) == 0)
    scenes = {k for b in before + after for k in b['scene_key']}
    assert len(scenes) == 15 and len(set(seen)) == 15 * 24  # every item of the epoch
    # ranks train on disjoint scenes (24 items each): the repeats that even them out are counted
    assert len(seen) == 15 * 24 + repeated
    assert max(Counter(seen).values()) <= 2
