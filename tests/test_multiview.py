"""The generic multi-view stream (pipeline/multiview.py and its parts): epochs (each scene once
across ranks and workers, equal batches per rank), exact and elastic resume, samplers against their
definitions, camera transforms by projecting points, no srt import."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from pipeline import tario
from pipeline.epochs import Layout, check_ranks
from pipeline.multiview import MultiViewLoader, MultiViewStream, split_shards
from pipeline.reader import iter_shard
from pipeline.schema import SCHEMA_VERSION
from pipeline.streamstate import StreamTracker, merge_states
from pipeline.views import SkipScene
from tests.conftest import ROOT

HIDE_SRT = ('import sys\nclass Hide:\n    def find_spec(self, name, path=None, target=None):\n'
            "        if name == 'srt' or name.startswith('srt.'):\n"
            "            raise ImportError('srt is hidden')\n"
            'sys.meta_path.insert(0, Hide())\n')
SIZES = (3, 1, 5, 2, 4, 1, 3)  # unequal shards: 19 scenes


def write_split(directory, sources, sizes, split='train', prefix='s'):
    """Shards of re-keyed copies of ``sources`` (sample dicts) with these scene counts, and a
    manifest; returns the keys in stored order."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, keys, n = [], [], 0
    for i, size in enumerate(sizes):
        members = []
        for _ in range(size):
            key = f'nmr_{split}_{prefix}{n:03d}'
            src = sources[n % len(sources)]
            members += [(f'{key}.{m}', data) for m, data in src.items() if not m.startswith('__')]
            keys.append(key)
            n += 1
        data = tario.encode_members(members) + tario.END_OF_ARCHIVE
        name = f'{split}-{i:06d}.tar'
        (directory / name).write_bytes(data)
        shards.append({'name': name, 'scenes': size, 'bytes': len(data),
                       'sha256': hashlib.sha256(data).hexdigest()})
    manifest = {'schema_version': SCHEMA_VERSION, 'dataset': 'nmr', 'split': split,
                'num_scenes': n, 'shards': shards}
    (directory / f'{split}.manifest.json').write_text(json.dumps(manifest))
    return keys


@pytest.fixture(scope='module')
def split(nmr_shards, tmp_path_factory):
    """19 scenes of 24 views (64x64) in 7 shards of unequal sizes."""
    sources = [s for url in sorted(nmr_shards.glob('train-*.tar')) for s in iter_shard(str(url))]
    out = tmp_path_factory.mktemp('split')
    keys = write_split(out, sources, SIZES)
    return out, keys


def key_only(scene, item, rng, step):
    return {'key': scene.key, 'item': item, 'draw': float(rng.random()), 'step': step}


def stream(directory, batch=2, **kw):
    kw.setdefault('shards_per_visit', 2)
    kw.setdefault('buffer', 3)
    return MultiViewStream(split_shards(str(directory), 'train'), batch, key_only, seed=7, **kw)


def rank_batches(s, workers):
    """Batches as a DataLoader with ``workers`` workers hands them out (round-robin from 0)."""
    its = [s.worker_batches(w, workers) for w in range(workers)]
    while True:
        for it in its:
            yield next(it)


def epoch_keys(batches, epoch=0):
    return [k for b in batches if int(b['_pos'][1]) == epoch for k in b['key']]


def events(batches, name):
    return sum(b['_events'].get(name, 0) for b in batches)


# ----------------------------------------------------------------------------- epochs

def test_each_scene_once_per_epoch_across_two_ranks_and_two_workers_with_equal_batches(split):
    directory, keys = split
    per_slot, seen, repeated = {}, [], 0
    for rank in range(2):
        s = stream(directory, rank=rank, world_size=2)
        for w in range(2):
            batches = []
            for b in s.worker_batches(w, 2):
                if int(b['_pos'][1]) > 0:
                    break
                batches.append(b)
            per_slot[rank, w] = batches
            seen += epoch_keys(batches)
            repeated += events(batches, 'repeated')
        assert s.epoch_batches(2) == 2 * len(per_slot[rank, 0])
    assert len({len(b) for b in per_slot.values()}) == 1  # every worker, every rank: same count
    assert all(len(b['key']) == 2 for bs in per_slot.values() for b in bs)  # full batches
    assert set(seen) == set(keys)
    assert len(seen) == len(keys) + repeated and repeated < 2 * 2 * 2  # < one batch per worker
    assert max(seen.count(k) for k in keys) <= 2
    ranks = [{k for w in range(2) for k in epoch_keys(per_slot[r, w])} for r in range(2)]
    assert not ranks[0] & ranks[1]  # ranks train on disjoint scenes


def test_epochs_differ_and_draws_are_a_function_of_seed_epoch_and_scene(split):
    directory, keys = split
    s = stream(directory)
    batches = []
    for b in s.worker_batches(0, 1):
        if int(b['_pos'][1]) == 2:
            break
        batches.append(b)
    e0, e1 = epoch_keys(batches, 0), epoch_keys(batches, 1)
    assert sorted(set(e0)) == sorted(set(e1)) == sorted(keys) and e0 != e1
    # a scene's draws are the same whichever layout yields it (first occurrences: repeats, at the
    # end of a worker's epoch, draw anew)
    draws = {}
    for b in batches[:len(batches) // 2]:
        for k, d in zip(b['key'], b['draw']):
            draws.setdefault(k, d)
    other = stream(directory, batch=3, shards_per_visit=1, buffer=0, world_size=2, rank=1)
    seen = set()
    for b in other.worker_batches(0, 1):
        if int(b['_pos'][1]) > 0:
            break
        for k, d in zip(b['key'], b['draw']):
            if k not in seen:
                assert d == draws[k]
            seen.add(k)


def test_local_piped_and_http_shards_give_the_same_batches(split):
    from tests.faulty_http import FaultyServer
    directory, _ = split
    refs = split_shards(str(directory), 'train')
    piped = split_shards(str(directory), 'train', f'pipe:cat {directory}/{{name}}')
    files = {p.name: p.read_bytes() for p in directory.glob('train-*.tar')}
    with FaultyServer(files) as srv:  # 127.0.0.1; reads verified against the manifest's sha256
        served = split_shards(str(directory), 'train', srv.url('{name}'))
        its = [MultiViewStream(r, 2, key_only, seed=3, shards_per_visit=2, buffer=3
                               ).worker_batches(0, 1) for r in (refs, piped, served)]
        for _ in range(12):
            x, y, z = (next(it) for it in its)
            assert x['key'] == y['key'] == z['key']
            assert np.array_equal(x['draw'], y['draw']) and np.array_equal(x['draw'], z['draw'])
        assert srv.requests and all(status == 200 for _, _, status in srv.requests)


def consume(s, workers, n, tracker):
    out = []
    it = rank_batches(s, workers)
    for _ in range(n):
        b = next(it)
        tracker.update(b)
        out.append(b)
    return out


def test_exact_resume_continues_with_the_same_batches(split):
    directory, _ = split
    s = stream(directory)
    tracker = s.tracker(2)
    it = rank_batches(s, 2)
    for _ in range(5):
        tracker.update(next(it))
    want = [next(it) for _ in range(14)]  # across the epoch boundary
    resumed = stream(directory, state=json.loads(json.dumps(tracker.state_dict())))
    it = rank_batches(resumed, 2)
    got = [next(it) for _ in range(14)]
    assert [b['key'] for b in got] == [b['key'] for b in want]
    assert [b['step'].tolist() for b in got] == [b['step'].tolist() for b in want]
    assert [b['_pos'].tolist() for b in got] == [b['_pos'].tolist() for b in want]


@pytest.mark.parametrize('ranks, workers, batch', [(1, 2, 6), (3, 2, 2), (2, 1, 3), (3, 1, 2)])
def test_elastic_resume_continues_the_epoch_without_repeating_or_skipping(split, ranks, workers,
                                                                          batch):
    """Saved after 5 batches per rank on 2 ranks x 2 workers (batches of 3: one worker is into
    epoch 1 already), resumed on another layout with the same global batch: epochs 0 and 1 hold
    every scene once, apart from the counted repeats."""
    directory, keys = split
    before, states = [], []
    for rank in range(2):
        s = stream(directory, batch=3, rank=rank, world_size=2)
        tracker = s.tracker(2)
        before += consume(s, 2, 5, tracker)
        states.append(tracker.state_dict())
    assert {int(b['_pos'][1]) for b in before} == {0, 1}
    state = merge_states(states)
    after = []
    for rank in range(ranks):
        s = stream(directory, batch=batch, rank=rank, world_size=ranks, state=state)
        for w in range(workers):
            for b in s.worker_batches(w, workers):
                if int(b['_pos'][1]) > 1:
                    break
                after.append(b)
    for epoch in (0, 1):
        seen = epoch_keys(before, epoch) + epoch_keys(after, epoch)
        repeated = sum(b['_events'].get('repeated', 0) for b in before + after
                       if int(b['_pos'][1]) == epoch)
        assert set(seen) == set(keys), epoch
        assert len(seen) == len(keys) + repeated, epoch


# ----------------------------------------------------------------------------- samples, faults

def test_view_samples_decode_chosen_views_with_cameras_and_count_null_index_entries(split):
    from pipeline.views import EvaluationIndex
    from pipeline.viewsample import NearFar, ResizeCrop, ViewSamples
    directory, keys = split
    entries = {k: ({'context': [0, 6], 'target': [1, 2, 3]} if i % 4 else None)
               for i, k in enumerate(keys)}
    build = ViewSamples(EvaluationIndex(entries), [ResizeCrop(32, 48), NearFar()], dtype='float32')
    s = MultiViewStream(split_shards(str(directory), 'train'), 4, build, train=False)
    batches = list(s)
    samples = sum(len(b['key']) for b in batches)
    assert samples == len(keys) - 5 == len(keys) - EvaluationIndex(entries).nulls
    assert events(batches, 'skipped/null_in_index') == 5
    b = batches[0]
    assert b['context']['image'].shape == (4, 2, 3, 32, 48) and b['context']['image'].dtype == np.float32
    assert b['target']['K'].shape == (4, 3, 3, 3) and b['context']['c2w'].shape == (4, 2, 4, 4)
    assert b['context']['index'].tolist() == [[0, 6]] * 4
    np.testing.assert_allclose(b['context']['near'], 2.0)  # NMR's render range, from meta.json
    assert b['key'] == [k for i, k in enumerate(keys) if i % 4][:4]
    # an evaluation worker whose whole share is null in the index has nothing to yield (no error)
    nulls = ViewSamples(EvaluationIndex({k: None if i < 10 else entries[keys[1]]
                                         for i, k in enumerate(keys)}), [])
    s = MultiViewStream(split_shards(str(directory), 'train'), 4, nulls, train=False)
    got = [k for w in range(2) for b in s.worker_batches(w, 2) for k in b['key']]
    assert sorted(got) == sorted(keys[10:])


def test_bad_and_short_shards_are_skipped_counted_and_batches_stay_equal(split, tmp_path, capfd):
    directory, keys = split
    refs = split_shards(str(directory), 'train')
    bad = tmp_path / 'bad.tar'
    data = (directory / 'train-000002.tar').read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # truncated mid-member: 5 scenes in the manifest
    refs[2] = type(refs[2])(str(bad), 5, None)
    refs[4] = type(refs[4])(refs[4].url, 6, None)  # the manifest claims 2 more scenes than it has
    s = MultiViewStream(refs, 2, key_only, seed=1, shards_per_visit=3, buffer=4)
    batches = []
    for b in s.worker_batches(0, 1):
        if int(b['_pos'][1]) > 0:
            break
        batches.append(b)
    # each read of the bad shard fails again (a remote one might not); the repeats that keep the
    # batches equal re-read the start of the worker's piece
    assert events(batches, 'bad_shards') >= 1 and events(batches, 'missing_scenes') >= 2
    assert events(batches, 'skipped/missing') >= 2 and events(batches, 'skipped/bad_shard') >= 1
    assert sum(int(b['_bad']) for b in batches) == events(batches, 'bad_shards')
    assert str(bad) in capfd.readouterr().err
    assert len(batches) == s.epoch_batches(1) and all(len(b['key']) == 2 for b in batches)
    good = set(keys) - set(keys[4:9])  # every scene but the bad shard's is trained on
    assert good <= set(epoch_keys(batches)) <= set(keys)
    with pytest.raises(Exception, match='bad.tar'):
        list(MultiViewStream(refs, 2, key_only, train=False))


def test_refusals_name_what_to_keep(split):
    directory, _ = split
    s = stream(directory)
    tracker = s.tracker(1)
    tracker.update(next(s.worker_batches(0, 1)))
    with pytest.raises(ValueError, match='seed: saved 7, now 8'):
        MultiViewStream(split_shards(str(directory), 'train'), 2, key_only, seed=8,
                        state=tracker.state_dict()).worker_batches(0, 1).__next__()
    with pytest.raises(ValueError, match='global batch_size: saved 2, now 3'):
        next(stream(directory, batch=3, state=tracker.state_dict()).worker_batches(0, 1))
    with pytest.raises(ValueError, match='seed: saved 7, now 9'):  # at once, before iterating
        MultiViewStream(split_shards(str(directory), 'train'), 2, key_only,
                        seed=9).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match='19 scenes for 20 ranks'):
        stream(directory, world_size=20, rank=0)
    with pytest.raises(ValueError, match='would hang DDP training; use train=True'):
        MultiViewLoader(stream(directory, world_size=2, train=False))
    with pytest.raises(ValueError, match='version'):
        StreamTracker(s.meta, Layout().to_list(), {'version': 1})
    check_ranks([1, 1], 2)


def test_loader_in_dataloader_workers_resumes_exactly(split):
    directory, _ = split
    loader = MultiViewLoader(stream(directory), num_workers=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    want = [next(it)['key'] for _ in range(6)]
    resumed = iter(MultiViewLoader(stream(directory), num_workers=2, state=state))
    assert [next(resumed)['key'] for _ in range(6)] == want


def test_dali_index_lists_every_member_at_its_data_offset(split, tmp_path):
    from pipeline.dali import write_dali_index
    directory, _ = split
    shard = directory / 'train-000002.tar'
    write_dali_index(str(shard), str(tmp_path / 'x.idx'))
    lines = (tmp_path / 'x.idx').read_text().splitlines()
    assert lines[0] == f'v1.2 {SIZES[2]}' and len(lines) == 1 + SIZES[2]
    got = [tuple(fields[i:i + 4]) for line in lines[1:] for fields in [line.split(' ')]
           for i in range(0, len(fields), 4)]
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:  # Python's own tar reader as the reference
        want = [(m.name.split('.', 1)[1], str(m.offset_data), str(m.size), m.name)
                for m in tar.getmembers() if m.isfile()]
        assert all(data[m.offset_data:m.offset_data + m.size] == tar.extractfile(m).read()
                   for m in tar.getmembers()[:3])
    assert got == want


def test_loading_doc_example_trains_a_toy_model_where_srt_is_not_importable(split):
    directory, keys = split
    doc = (ROOT / 'docs/LOADING.md').read_text()
    code = doc.split('```python\n', 1)[1].split('```', 1)[0]
    assert "shards = 'shards/re10k'" in code and 'srt' not in code.replace('srt-shards', '')
    code = code.replace("'shards/re10k'", repr(str(directory)))
    code += ('import pipeline.epochs, pipeline.streamstate, pipeline.camtransforms, pipeline.dali\n'
             "assert saved['consumed'] == 4\n"
             "print('srt loaded:', any(m.split('.')[0] == 'srt' for m in sys.modules))\n")
    out = subprocess.run([sys.executable, '-c', HIDE_SRT + code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ['0', '1', '2', '3']
    assert all(np.isfinite(float(line.split()[1])) for line in lines[:4])
    assert lines[-1] == 'srt loaded: False'


def test_loading_doc_plain_webdataset_example_reads_our_shards(split):
    import webdataset as wds
    from pipeline.reader import Scene
    directory, keys = split
    doc = (ROOT / 'docs/LOADING.md').read_text()
    code = doc.split('## A plain webdataset', 1)[1].split('```python\n', 1)[1].split('```', 1)[0]
    pattern = f"'{directory}/train-{{000000..{len(SIZES) - 1:06d}}}.tar'"
    code = code.replace("'shards/msn/train-{000000..000039}.tar'", pattern)
    code += '    seen.append((sample["__key__"], K.shape, c2w.shape, image0.shape, image0.dtype.name))\n'
    scope = {'seen': []}
    exec(code, scope)
    assert sorted(k for k, *_ in scope['seen']) == sorted(keys)
    assert {tuple(s[1:]) for s in scope['seen']} == {((24, 3, 3), (24, 4, 4), (64, 64, 3), 'float32')}
    sample = next(iter(wds.WebDataset(eval(pattern), shardshuffle=False)))  # undecoded
    scene = Scene(sample)
    assert scene.key == keys[0] and scene.image(3).shape == (64, 64, 3)


def test_re10k_like_jpeg_shards_of_two_sizes_with_pixelsplat_lvsm_and_index_samplers(tmp_path):
    """pixelSplat-chunk scenes (JPEG, 72x128 and one of 60x80) converted, then streamed with the
    bounded sampler and crops, LVSM's sampler and normalisation, and the carried evaluation index."""
    from pipeline.convert import ConvertConfig, convert
    from pipeline.synthetic import write_re10k
    from pipeline.views import BoundedSampler, EvaluationIndex, LVSMSampler
    from pipeline.viewsample import (LVSMNormalize, NearFar, NormalizeIntrinsics, ResizeCrop,
                                     ViewSamples)
    write_re10k(tmp_path / 'src', 7, 1, split_sizes={'train': 3, 'test': 4}, scenes_per_chunk=2,
                views=(10, 14), workers=1)
    out = tmp_path / 'shards'
    convert(ConvertConfig(dataset='re10k', src=str(tmp_path / 'src'), out=str(out), progress=False,
                          source_format='pixelsplat'))
    bounded = BoundedSampler(warm_up_steps=0, min_distance_between_context_views=3,
                             max_distance_between_context_views=8)
    build = ViewSamples(bounded, [ResizeCrop(32, 32), NormalizeIntrinsics()])
    s = MultiViewStream(split_shards(str(out), 'train'), 3, build, seed=2)
    b = next(iter(s))
    assert b['context']['image'].shape == (3, 2, 3, 32, 32) and b['target']['index'].shape == (3, 4)
    assert b['context']['image'].dtype == np.uint8 and len(set(b['key'])) == 3
    assert np.all(b['context']['K'][..., 0, 2] > 0.2) and np.all(b['context']['K'][..., 0, 2] < 0.8)
    ctx, tgt = b['context']['index'], b['target']['index']
    assert np.all((tgt >= ctx[:, :1]) & (tgt <= ctx[:, 1:])) and np.all(ctx[:, 1] - ctx[:, 0] >= 3)
    lvsm = ViewSamples(LVSMSampler(num_views=5, num_target_views=3, min_frame_dist=5,
                                   max_frame_dist=9), [ResizeCrop(24, 24), LVSMNormalize(),
                                                       NearFar(default=(0.1, 100.0))])
    b = next(iter(MultiViewStream(split_shards(str(out), 'train'), 2, lvsm, seed=2)))
    assert np.abs(b['context']['c2w'][..., :3, 3]).max() <= 1 / 1.35 + 1e-6
    scale = np.linalg.norm(b['norm_from_world'][:, 0, :3], axis=-1)  # LVSM's 1 / s per sample
    np.testing.assert_allclose(b['target']['far'][:, 0], 100.0 * scale, rtol=1e-5)  # with the poses
    index = EvaluationIndex.load(str(out), 'test')
    ev = list(MultiViewStream(split_shards(str(out), 'test'), 2,
                              ViewSamples(index, [ResizeCrop(16, 16)]), train=False))
    assert sum(len(b['key']) for b in ev) == 4 - index.nulls
    assert events(ev, 'skipped/null_in_index') == index.nulls >= 1
