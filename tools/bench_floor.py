#!/usr/bin/env python
"""How close a loader can come to the decode-only limit on RE10K-shaped data: the limit, the least
work any SRT loader must do per item, and ours, measured side by side in one process.

    python tools/bench_floor.py [--workdir /tmp/srt_bench_loader] [--seconds 12]

Data: the RE10K set of tools/bench_loader.py (generated and converted there, cached in --workdir).
Rows (items per CPU second, all three in turns of 0.5 s, --seconds each in all):
  decode only   tools/bench_loader.py's limit: an item's 6 JPEGs (2 input + 4 target views,
                360x640) decoded from bytes already in memory, each result dropped at once
  floor         the least an SRT item needs, written as one plain loop with nothing checked: per
                item a random clip and 6 random views, 8192 target pixels drawn (sorted,
                srt.data.sorted_sample), each view's bytes read from the shard (os.pread at
                offsets from its member index), decoded, the 2 inputs copied into a batch array
                allocated once and the targets' pixels taken, every decoded view let go before the
                next decode (so the decoder writes into memory still in the CPU's cache). No
                metadata, cameras, checks, shuffling or batch allocation
  floor + Scene the floor, plus per item its clip's metadata and cameras parsed and checked
                (pipeline.reader.Scene over the clip's meta.json and cameras.npz, read beforehand):
                the one part of a loader's other work that no loader meeting issue 11 can skip
  ours          srt.loader.TrainStream, as tools/bench_loader.py's "ours" row
"floor / limit" is what is left for everything else a loader does: what the limit gains by
dropping its images (the copy into a batch, cache misses, drawing and taking the pixels) is
already lost at the floor.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from tools import bench_loader  # noqa: E402


def floor(shards: str, scene: bool = False, batch: int = bench_loader.BATCH):
    """The plain loop above, over the JPEG members of every clip of ``shards``; ``scene``: with
    each item's clip parsed and checked by ``pipeline.reader.Scene``."""
    from pipeline.decode import decode_image
    from pipeline.reader import Scene, iter_shard
    from pipeline.tario import index_path, read_index
    from srt.data import sorted_sample
    clips, small = [], []  # per clip: (fd, size, offset) of each JPEG view; its other members
    for tar in sorted(glob.glob(os.path.join(shards, 'train-*.tar'))):
        fd = os.open(tar, os.O_RDONLY)  # left open for the process's life
        clips += [[(fd, size, off) for name, off, size in layout if name.endswith('.jpg')]
                  for layout in read_index(index_path(tar))]
        small += [{k: v for k, v in sample.items() if not k.endswith('.jpg')}
                  for sample in iter_shard(tar)]
    h, w = bench_loader.RE10K_SIZE
    k, t = bench_loader.RE10K_INPUTS, bench_loader.RE10K_TARGETS
    rng = np.random.default_rng(0)
    inputs = np.empty((batch, k, h, w, 3), np.uint8)
    pixels = np.empty((batch, bench_loader.NUM_POINTS, 3), np.uint8)

    def run():
        for b in range(batch):
            c = rng.integers(len(clips))
            clip = clips[c]
            if scene:
                Scene(small[c])
            views = rng.choice(len(clip), k + t, replace=False)
            flat = sorted_sample(rng, t * h * w, bench_loader.NUM_POINTS)
            cuts = np.searchsorted(flat, np.arange(t + 1) * (h * w)).tolist()
            for i, v in enumerate(views):
                img = decode_image(os.pread(*clip[v]), 3)
                if i < k:
                    inputs[b, i] = img
                else:
                    j = i - k
                    np.take(img.reshape(-1, 3), flat[cuts[j]:cuts[j + 1]] - j * h * w, axis=0,
                            out=pixels[b, cuts[j]:cuts[j + 1]])
                del img
        return batch
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--workdir', default='/tmp/srt_bench_loader', help='cache of generated data')
    p.add_argument('--seconds', type=float, default=12.0, help='measuring time per row')
    p.add_argument('--scenes', type=int, default=40, help='clips to generate (default 40)')
    p.add_argument('--frames', type=int, default=100, help='frames per clip (default 100)')
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    _, shards = bench_loader.prepare(args.workdir, 're10k', args.scenes, args.frames)
    rows = bench_loader.timed_together({
        'decode only': bench_loader.decode_only(shards, bench_loader.RE10K_INPUTS +
                                                bench_loader.RE10K_TARGETS),
        'floor': floor(shards),
        'floor + Scene': floor(shards, scene=True),
        'ours': bench_loader.ours(shards, 're10k', rays=False)}, args.seconds)
    limit = rows['decode only']
    print('| row | items / CPU s | / decode-only limit |\n|---|---:|---:|')
    for name, rate in rows.items():
        print(f'| {name} | {rate:.1f} | {rate / limit:.2f}x |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
