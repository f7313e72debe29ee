"""SRT's training stream resumes with another number of ranks or workers (the trainer's resume after
changing the number of GPUs or --workers, global batch kept): the epoch continues with every item
(scene, input view) once, apart from the counted repeats."""
import hashlib
import subprocess
import sys
from collections import Counter

import pytest
import torch

from srt.loader import StreamState, TrainStream
from tests.conftest import ENV, ROOT, losses, train_cmd, write_config
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


def test_trainer_run_on_two_ranks_resumes_on_one(nmr_shards, tmp_path):
    """torchrun 2 CPU ranks for 3 steps, then the same run directory on 1 process to step 5: the
    run continues (same global batch) and its stream state links the two layouts."""
    out = tmp_path / 'run'
    config = write_config(tmp_path / 'a.yaml', max_it=3, checkpoint_every=0, num_workers=0)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                    '--master_port', '29547', '-m', 'srt.train', '--shards', str(nmr_shards),
                    '--config', str(config), '--out', str(out)],
                   env=ENV, cwd=ROOT, check=True, capture_output=True, timeout=600)
    saved = torch.load(out / 'model.pt', weights_only=True, map_location='cpu')['data_state']
    assert saved['layout'][:3] == [2, 1, 1] and set(saved['slots']) == {'0', '1'}
    config = write_config(tmp_path / 'b.yaml', max_it=5, checkpoint_every=0, num_workers=0)
    proc = subprocess.run(train_cmd(nmr_shards, config, out), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'resumed from' in proc.stdout + proc.stderr and sorted(losses(out)) == [1, 2, 3, 4, 5]
    state = torch.load(out / 'model.pt', weights_only=True, map_location='cpu')['data_state']
    assert state['layout'][:3] == [1, 1, 2] and state['global_batch'] == saved['global_batch']
    assert state['history']['0'] == [[saved['layout'], {s: v[1] for s, v in saved['slots'].items()}]]
    assert state['slots'] == {'0': [0, 4, 4]}  # 2 batches of 2 from the rest of epoch 0
