#!/usr/bin/env python
"""Scale rehearsal: the metadata of a million-scene split, without image bytes.

    python tools/bench_scale.py [--scenes 1000000] [--shards 4000] [--ranks 64] [--workers 8]
                                [--num-tasks 64] [--scene-bytes 378000] [--workdir DIR] [--keep]

Writes what the converter writes for such a split except the shards themselves (the manifest, the
per-shard records with per-sample offsets, the LMDB index) and measures:
  manifest          size; time to read it and build the shard table every rank builds
  epoch plan        what every DataLoader worker computes per epoch (pipeline.epochs): the seeded
                    global order, the deal to R ranks x W workers, its visits and one visit's
                    schedule; the same after an elastic resume (a run saved at R x W continued on
                    R/2 ranks); a scene-level permutation of the whole split as the upper bound of
                    any per-epoch scene shuffle
  index             build time (pipeline.index.build from the records, as the converter's
                    finalize does), file size, random lookup latency by key and by reference index
  stream state      per rank at R ranks x W workers: the TrainStream object (memory, pickled size
                    sent to each worker), the StreamState of a rank (state_dict bytes) and the
                    merged state of all ranks that a checkpoint holds
  converter plan    what each task of a --num-tasks T job array reads and writes (convert() deals
                    shard i to task i mod T)
and prints the formulae the numbers follow. The default scene size is a generated MSN scene's shard
bytes (365 KB x 1.036, see the README's converter table).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import index as shard_index  # noqa: E402
from pipeline.schema import SCHEMA_VERSION, json_bytes  # noqa: E402


def best_of(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float('inf'), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def traced(fn) -> tuple[int, object]:
    """(bytes still allocated by fn's result, result)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used, out


def make_records(scenes: int, shards: int, scene_bytes: int) -> list[dict]:
    """Converter shard records (see pipeline.convert.write_shard) of a split with these sizes."""
    spp = -(-scenes // shards)
    records, ref = [], 0
    for i in range(shards):
        n = min(spp, scenes - ref)
        samples, offset = [], 0
        for j in range(n):
            size = scene_bytes + 512 * ((ref * 7919) % 9 - 4)  # sizes vary a little, as real ones
            samples.append([f'msn_train_{ref:07d}', ref, offset, size])
            offset, ref = offset + size, ref + 1
        name = f'train-{i:06d}.tar'
        records.append({'name': name, 'scenes': n, 'bytes': offset + 1024,
                        'sha256': hashlib.sha256(name.encode()).hexdigest(), 'samples': samples,
                        'skipped': [], 'plan': '0' * 64})
    return records


def write_metadata(out: str, records: list[dict]) -> tuple[float, float, int, int]:
    """(seconds for the records, seconds for the manifest, record bytes, manifest bytes)."""
    work = os.path.join(out, '.work')
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    record_bytes = 0
    for rec in records:
        data = json_bytes(rec)
        record_bytes += len(data)
        with open(os.path.join(work, f'{rec["name"]}.json'), 'wb') as f:
            f.write(data)
    t_records = time.perf_counter() - t0
    manifest = {'schema_version': SCHEMA_VERSION, 'dataset': 'msn', 'split': 'train',
                'num_scenes': sum(r['scenes'] for r in records),
                'bytes': sum(r['bytes'] for r in records),
                'shards': [{k: r[k] for k in ('name', 'scenes', 'bytes', 'sha256')} for r in records]}
    t0 = time.perf_counter()
    data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b'\n'
    with open(os.path.join(out, 'train.manifest.json'), 'wb') as f:
        f.write(data)
    return t_records, time.perf_counter() - t0, record_bytes, len(data)


def row(name: str, value: str, note: str = '') -> None:
    print(f'| {name:<44} | {value:>16} | {note} |')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--scenes', type=int, default=1_000_000)
    p.add_argument('--shards', type=int, default=4000)
    p.add_argument('--ranks', type=int, default=64)
    p.add_argument('--workers', type=int, default=8, help='DataLoader workers per rank')
    p.add_argument('--num-tasks', type=int, default=64, help='converter job-array size')
    p.add_argument('--scene-bytes', type=int, default=378_000, help='shard bytes per scene')
    p.add_argument('--source-ratio', type=float, default=1.036, help='shard / source bytes')
    p.add_argument('--lookups', type=int, default=20_000)
    p.add_argument('--workdir', help='where to write (default: a temporary directory)')
    p.add_argument('--keep', action='store_true', help='keep the written metadata')
    args = p.parse_args(argv)
    import numpy as np
    from srt.data import DataConfig
    from pipeline import epochs
    from pipeline.streamstate import merge_states
    from srt.loader import StreamState, TrainStream, shard_table

    N, S, R, W, T = args.scenes, args.shards, args.ranks, args.workers, args.num_tasks
    out = args.workdir or tempfile.mkdtemp(prefix='srt_bench_scale_')
    os.makedirs(out, exist_ok=True)
    print(f'scale rehearsal: {N:,} scenes in {S:,} shards ({-(-N // S)} scenes, '
          f'{-(-N // S) * args.scene_bytes / 2**20:.1f} MiB per shard), {R} ranks x {W} workers, '
          f'{T} converter tasks; metadata in {out}\n')
    print(f'| {"measure":<44} | {"value":>16} | note |\n|{"-" * 46}|{"-" * 18}|------|')
    try:
        t0 = time.perf_counter()
        records = make_records(N, S, args.scene_bytes)
        row('generate shard records (bench setup)', f'{time.perf_counter() - t0:.2f} s')
        t_rec, t_man, rec_bytes, man_bytes = write_metadata(out, records)
        row('manifest size', f'{man_bytes / 1024:.0f} KiB', f'{man_bytes / S:.0f} B per shard')
        row('manifest write', f'{t_man * 1e3:.1f} ms')
        t, shards = best_of(lambda: shard_table(out, 'train'))
        row('manifest read + shard table (every rank)', f'{t * 1e3:.1f} ms')
        row('shard records (.work/*.json) write', f'{t_rec:.2f} s',
            f'{rec_bytes / 2**20:.1f} MiB, {rec_bytes / N:.0f} B per scene')

        # ---------------------------------------------------------------- epoch plan
        counts = [n for _, n in shards]
        layout = epochs.Layout(R, W, 8, 8, 256)
        t_order, order = best_of(lambda: epochs.EpochOrder(counts, 0, 1))
        row('epoch order (seeded shard shuffle)', f'{t_order * 1e3:.3f} ms')
        t_deal, pieces = best_of(lambda: epochs.deal([(0, order.total)], layout, 1))
        row(f'deal {S} shards to {R} ranks x {W} workers', f'{t_deal * 1e3:.1f} ms',
            'contiguous pieces: ranks cut at scenes, workers exact')
        t_visits, visits = best_of(lambda: epochs.slot_visits(order, pieces[-1], 8))
        row('a worker\'s visits (8 shards per visit)', f'{t_visits * 1e3:.2f} ms',
            f'{len(visits)} visits, {epochs.count(pieces[-1])} scenes')
        t_events, _ = best_of(lambda: epochs.visit_events(order, visits[0], 256))
        row('one visit\'s schedule (interleave + buffer)', f'{t_events * 1e3:.2f} ms',
            f'{len(visits[0].ids)} scenes, computed when the visit starts')
        t_plan, deal = best_of(lambda: epochs.plan_epoch(counts, 0, 1, layout))
        row('epoch plan per worker (order + deal)',
            f'{(best_of(lambda: shard_table(out, "train"))[0] + t_plan + t_visits) * 1e3:.1f} ms',
            'manifest read + plan_epoch + its visits')
        half = {s: epochs.count(p) // 2 for s, p in enumerate(pieces)}
        small = epochs.Layout(max(1, R // 2), W, 16, 8, 256)
        t_elastic, redealt = best_of(lambda: epochs.plan_epoch(
            counts, 0, 1, small, history=[epochs.Link(layout, half)]), repeat=1)
        row(f'elastic re-deal: saved at {R} x {W} mid-epoch, on {small.ranks} ranks',
            f'{t_elastic * 1e3:.0f} ms', f'{epochs.count(redealt.remaining):,} samples left '
            f'in {len(redealt.remaining):,} intervals')
        t_scene, perm = best_of(lambda: np.random.default_rng([0, 1]).permutation(N))
        row(f'permute all {N:,} scenes (upper bound)', f'{t_scene * 1e3:.1f} ms',
            f'{perm.nbytes / 2**20:.1f} MiB as int64')
        loads = [epochs.count(epochs.rank_piece(pieces, layout, r)) for r in range(R)]
        row('scenes per rank (min / max)', f'{min(loads):,} / {max(loads):,}',
            f'{deal.batches} batches of 8 per worker, {deal.repeats} repeated per epoch')

        # ---------------------------------------------------------------- index
        t0 = time.perf_counter()
        shard_index.build(out, 'train', records)
        t_build = time.perf_counter() - t0
        st = os.stat(shard_index.index_path(out, 'train'))
        row('index build (LMDB, from the records)', f'{t_build:.1f} s',
            f'{N / t_build:,.0f} scenes/s')
        row('index file size', f'{st.st_size / 2**20:.0f} MiB',
            f'{st.st_size / N:.0f} B per scene ({st.st_blocks * 512 / 2**20:.0f} MiB on disk)')
        idx = shard_index.SceneIndex(out, 'train')
        rng = np.random.default_rng(0)
        refs = rng.integers(0, N, args.lookups)
        keys = [f'msn_train_{r:07d}' for r in refs]
        lat = []
        for k in keys:
            t0 = time.perf_counter()
            idx.locate(k)
            lat.append(time.perf_counter() - t0)
        lat_ref = []
        for r in refs[:args.lookups // 4]:
            t0 = time.perf_counter()
            idx.locate(int(r))
            lat_ref.append(time.perf_counter() - t0)
        q = statistics.quantiles(lat, n=100)
        row('random lookup by key (p50 / p99)', f'{q[49] * 1e6:.1f} / {q[98] * 1e6:.1f} us',
            f'{args.lookups:,} lookups, warm page cache')
        row('random lookup by reference index (p50)',
            f'{statistics.median(lat_ref) * 1e6:.1f} us', 'two gets')
        idx.close()

        # ---------------------------------------------------------------- stream state
        cfg = DataConfig(dataset='msn')
        mem, stream = traced(lambda: TrainStream(cfg, shards, 8, rank=R - 1, world_size=R))
        row(f'TrainStream per rank (R={R}): memory', f'{mem / 1024:.1f} KiB',
            f'{len(stream.shards)} shard entries: every worker plans the epoch')
        row('TrainStream pickled to each worker', f'{len(pickle.dumps(stream)) / 1024:.1f} KiB',
            f'x {W} workers per rank')
        mem_table, _ = traced(lambda: shard_table(out, 'train'))
        row('shard table held by the stream (per rank)', f'{mem_table / 1024:.0f} KiB',
            'the counts plan every epoch')
        ranks = []
        for r in range(R):
            state = StreamState(0, R, W, 8, rank=r, shards_per_visit=8, buffer=256)
            for w in range(W):
                state.update({'_pos': np.array([w, 12, 789]), '_bad': np.array(0)})
            ranks.append(state.state_dict())
        sd = ranks[-1]
        merged = merge_states(ranks)
        import torch
        import io
        buf = io.BytesIO()
        torch.save(sd, buf)
        row(f'stream state_dict per rank (W={W})', f'{len(json_bytes(sd))} B',
            f'JSON; {len(buf.getvalue())} B in torch.save')
        row(f'merged stream state ({R} x {W} slots, in a checkpoint)',
            f'{len(json_bytes(merged)) / 1024:.1f} KiB', 'all-gathered before each save')

        # ---------------------------------------------------------------- converter plan
        spp = -(-N // S)
        tasks = [list(range(t, S, T)) for t in range(T)]  # convert(): range(task_index, S, T)
        scenes = [sum(records[i]['scenes'] for i in mine) for mine in tasks]
        written = [sum(records[i]['bytes'] for i in mine) for mine in tasks]
        row(f'converter: shards per task (T={T})', f'{min(map(len, tasks))} - {max(map(len, tasks))}',
            f'task t writes shards t, t+{T}, t+{2 * T}, ...')
        row('converter: scenes per task', f'{min(scenes):,} - {max(scenes):,}',
            f'{spp}-scene blocks of the source order')
        row('converter: bytes written per task', f'{max(written) / 2**30:.2f} GiB',
            f'read ~{max(written) / args.source_ratio / 2**30:.2f} GiB of source')
        row('converter: finalize reads', f'{S} records', f'{rec_bytes / 2**20:.0f} MiB -> index '
            f'{t_build:.0f} s + manifest')
        print('\nper task (first, second, last):')
        for t in (0, 1, T - 1):
            mine = tasks[t]
            print(f'  task {t:>3}: shards {mine[0]}, {mine[1] if len(mine) > 1 else "-"}, ... '
                  f'{mine[-1]} ({len(mine)}), scenes {scenes[t]:,} (source scenes '
                  f'{mine[0] * spp}-{mine[0] * spp + spp - 1}, ...), writes '
                  f'{written[t] / 2**30:.2f} GiB + {len(mine)} records; lists all {N:,} scene '
                  'refs to plan')
        print(f'''
formulae (N scenes, S shards, R ranks, W workers per rank, T tasks, b bytes per scene):
  manifest bytes          ~ {man_bytes / S:.0f} S            read per rank O(S)
  shard records           ~ {rec_bytes / N:.0f} N bytes      read once by the finalize
  epoch plan per worker   O(S) order (shuffle + cumulative counts), O(R W log S) deal of
                          contiguous pieces, O(N/(R W)) for its own visits; an elastic re-deal adds
                          a replay of each old slot's current visit's schedule; a scene permutation
                          would be O(N)
  index                   ~ {st.st_size / N:.0f} N bytes, build O(N log N) ({N / t_build:,.0f} scenes/s),
                          lookup O(log N) (B-tree depth 3-4 at 1M: constant in practice)
  stream state per rank   O(W) numbers ({len(json_bytes(sd))} B), independent of N and S; merged
                          O(R W) ({len(json_bytes(merged))} B); TrainStream per rank O(S) shard
                          entries (every worker plans the whole epoch), pickled once per worker
  converter task          ceil(S/T) shards, ~N/T scenes, ~N b/T bytes written; O(N) to list refs
''')
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
