"""Training and evaluation streams: DDP/worker splitting, exact resume, bad shards, no TensorFlow."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.convert import ConvertConfig, convert
from srt.data import DataConfig
from srt.loader import EvalStream, StreamState, TrainStream, loader, shard_table
from tests.conftest import ROOT, make_nmr_copies

CFG = DataConfig(dataset='nmr', num_points=64)


@pytest.fixture(scope='module')
def seven_shards(tmp_path_factory):
    """7 shards of unequal sizes (2, 2, 1, 3, 3, 3, 1 scenes)."""
    tmp = tmp_path_factory.mktemp('seven')
    shards = []
    for name, n, spp in (('a', 5, 2), ('b', 10, 3)):
        src = make_nmr_copies(tmp / f'src_{name}', n, n_val=0, prefix=name)
        convert(ConvertConfig(dataset='nmr', src=str(src), out=str(tmp / name), splits=['train'],
                              scenes_per_shard=spp, progress=False))
        shards += shard_table(str(tmp / name), 'train')
    assert [n for _, n in shards] == [2, 2, 1, 3, 3, 3, 1]
    return shards


def take(it, n):
    return [next(it) for _ in range(n)]


def fingerprint(batch):
    return (tuple(batch['_pos'].tolist()), float(np.asarray(batch['target_pixels'], np.float64).sum()),
            float(np.asarray(batch['input_M'], np.float64).sum()))


def test_ranks_and_workers_yield_equal_full_batches_and_eval_sees_each_scene_once(seven_shards):
    per_rank, seen_keys = [], []
    for rank in range(2):
        stream = TrainStream(CFG, seven_shards, batch_size=3, seed=1, rank=rank, world_size=2,
                             shards_per_visit=2, item_buffer=16)
        n = stream.batches_per_epoch(num_views=24)
        assert n == -(-15 * 24 // 6)
        batches = take(iter(loader(stream, num_workers=2)), n)
        assert all(b['target_pixels'].shape == (3, 64, 3) for b in batches)
        assert {int(b['_pos'][0]) for b in batches} == {0, 1}  # both workers contribute
        per_rank.append([fingerprint(b) for b in batches])
        seen_keys.append({k for b in batches for k in b['scene_key']})
    assert len(per_rank[0]) == len(per_rank[1]) and per_rank[0] != per_rank[1]
    assert not seen_keys[0] & seen_keys[1]  # ranks train on disjoint scenes

    seen = []
    for rank in range(2):
        ev = EvalStream(DataConfig(dataset='nmr', num_points=32), seven_shards, batch_size=5,
                        rank=rank, world_size=2)
        for batch in loader(ev, num_workers=2):
            seen += list(zip(batch['scene_key'], batch['item'].tolist()))
    keys = [k for k, _ in seen]
    assert len(set(keys)) == 15  # every scene ...
    assert len(seen) == len(set(seen)) == 15 * 24  # ... exactly once, with all 24 input views


def test_eval_is_reproducible_and_max_eval_takes_the_first_scenes(seven_shards):
    ev = EvalStream(DataConfig(dataset='nmr', num_points=32), seven_shards, batch_size=7,
                    max_scenes=4)
    a, b = list(ev), list(ev)
    assert ev.num_scenes == 4
    assert [x['scene_key'] for x in a] == [x['scene_key'] for x in b]
    assert all(np.array_equal(x['target_uv'], y['target_uv']) for x, y in zip(a, b))
    assert len({k for x in a for k in x['scene_key']}) == 4


RESUME_SCRIPT = '''
import json, sys, numpy as np
sys.path.insert(0, {root!r})
from srt.data import DataConfig
from srt.loader import TrainStream, loader
from tests.test_loader import fingerprint, take
shards, state = json.load(open({args!r}))
stream = TrainStream(DataConfig(dataset='nmr', num_points=64), [tuple(s) for s in shards], 3, seed=5,
                     shards_per_visit=3, item_buffer=20, state=state)
print(json.dumps([fingerprint(b) for b in take(iter(loader(stream, 2)), 7)]))
'''


@pytest.mark.parametrize('k', [5, 8])
def test_saved_state_resumes_the_same_batches_in_a_new_process(seven_shards, tmp_path, k):
    stream = TrainStream(CFG, seven_shards, 3, seed=5, shards_per_visit=3, item_buffer=20)
    state = StreamState(seed=5, world_size=1, num_workers=2, batch_size=3)
    it = iter(loader(stream, num_workers=2))
    for batch in take(it, k):
        state.update(batch)
    want = [fingerprint(b) for b in take(it, 7)]
    args = tmp_path / 'args.json'
    args.write_text(json.dumps([seven_shards, state.state_dict()]))
    out = subprocess.run([sys.executable, '-c', RESUME_SCRIPT.format(root=str(ROOT), args=str(args))],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    got = [tuple(tuple(x) if isinstance(x, list) else x for x in f) for f in json.loads(out.stdout)]
    assert got == want


def test_state_of_another_setup_is_refused(seven_shards):
    state = StreamState(seed=5, world_size=1, num_workers=2, batch_size=3).state_dict()
    stream = TrainStream(CFG, seven_shards, 4, seed=5, state=state)
    with pytest.raises(ValueError, match='batch_size: saved 3, now 4'):
        next(iter(stream))


def test_training_stream_never_imports_tensorflow(seven_shards, tmp_path):
    args = tmp_path / 'shards.json'
    args.write_text(json.dumps(seven_shards))
    code = (f'import json, sys; sys.path.insert(0, {str(ROOT)!r})\n'
            'from srt.data import DataConfig\nfrom srt.loader import TrainStream, loader\n'
            f'shards = [tuple(s) for s in json.load(open({str(args)!r}))]\n'
            "it = iter(loader(TrainStream(DataConfig(dataset='nmr', num_points=8), shards, 2), 0))\n"
            'for _ in range(5): next(it)\n'
            "print(any(m.split('.')[0] == 'tensorflow' for m in sys.modules))\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'False'


def test_corrupt_shard_training_continues_and_counts_eval_stops_naming_it(seven_shards, tmp_path, capfd):
    bad = tmp_path / 'bad-000000.tar'
    data = open(seven_shards[3][0], 'rb').read()
    bad.write_bytes(data[:len(data) // 2])  # truncated mid-member
    shards = seven_shards[:3] + [(str(bad), 3)]
    stream = TrainStream(CFG, shards, 2, seed=0, shards_per_visit=4)
    state = StreamState(0, 1, 1, 2)
    for batch in take(iter(stream), 40):
        state.update(batch)
    assert state.bad >= 1
    assert str(bad) in capfd.readouterr().err
    ev = EvalStream(DataConfig(dataset='nmr', num_points=8), shards, 4)
    with pytest.raises(Exception, match='bad-000000.tar'):
        list(ev)
    ev = EvalStream(DataConfig(dataset='nmr', num_points=8), shards, 4, skip_bad=True)
    keys = {k for b in ev for k in b['scene_key']}
    assert len(keys) >= 5  # the three whole shards, and what precedes the damage


def test_generic_scene_stream_directory_braces_pipe_and_views(seven_shards):
    import os
    import torch
    from pipeline.stream import scene_stream, shard_list
    directory = os.path.dirname(seven_shards[3][0])
    assert shard_list(directory, 'train') == [u for u, _ in seven_shards[3:]]
    pattern = os.path.join(directory, 'train-{000000..000003}.tar')
    assert shard_list(pattern) == shard_list(directory, 'train')
    scenes = list(scene_stream(pattern, shuffle=False, views=[0, 5]))
    assert len(scenes) == 10 and scenes[0].images([0, 5]).shape == (2, 64, 64, 3)
    piped = list(scene_stream([f'pipe:cat {u}' for u, _ in seven_shards[3:]], shuffle=False))
    assert [s.key for s in piped] == [s.key for s in scenes]
    np.testing.assert_array_equal(piped[0].images([0, 5]), scenes[0].images([0, 5]))
    # Split across DataLoader workers: each scene once, shuffled order is seeded.
    dl = torch.utils.data.DataLoader(scene_stream(directory, 'train', buffer=4, seed=3),
                                     batch_size=None, num_workers=2, collate_fn=lambda s: s)
    keys = [s.key for s in dl]
    assert sorted(keys) == sorted(s.key for s in scenes)


def test_shards_stream_through_a_url_template(seven_shards):
    import os
    directory = os.path.dirname(seven_shards[3][0])
    table = shard_table(directory, 'train', f'pipe:cat {directory}/{{name}}')
    assert table[0][0] == f'pipe:cat {directory}/train-000000.tar'
    batches = take(iter(TrainStream(CFG, table, 2, shards_per_visit=2)), 3)
    assert batches[0]['target_pixels'].shape == (2, 64, 3)
    with pytest.raises(ValueError, match='no {name}'):
        shard_table(directory, 'train', 'pipe:cat x')
