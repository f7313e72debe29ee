#!/usr/bin/env python
"""Exporter throughput per core beside the copy floor of the same bytes, and what --jpeg-quality
costs and saves, in one run.

    python tools/bench_export.py [--shards DIR] [--scenes 120] [--workdir /tmp/srt_bench_export]

Without --shards, synthetic NMR-like scenes (PNG, 24 views of 64x64), CLEVR3D-like
scenes (RGBA PNG, 10 views of 240x320; a quarter as many) and RE10K-like clips (JPEG,
8-14 views of 72x128) are generated and converted first. Rows (rates are scenes per CPU second of
this process, i.e. per core; every exporter runs in one process):
  copy floor           read every shard file and write the same bytes durably (fsync per file):
                       what any exporter of the same bytes must at least do
  pixelsplat           srt-shards export pixelsplat (PNG/JPEG kept)
  pixelsplat -q Q      the same with --jpeg-quality Q (PNG views re-encoded)
  lvsm                 srt-shards export lvsm (JPEG views re-encoded as PNG)
  nerfstudio           srt-shards export nerfstudio (bytes kept)
Also per set: output bytes of each pixelSplat variant and the PSNR of the JPEG pixels against the
shards' (the fidelity --jpeg-quality costs; PNG is lossless).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def copy_floor(shards: str, dst: str) -> None:
    os.makedirs(dst)
    for name in sorted(os.listdir(shards)):
        src = os.path.join(shards, name)
        if os.path.isfile(src):
            with open(src, 'rb') as f:
                data = f.read()
            with open(os.path.join(dst, name), 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())


def timed(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def psnr_of_jpeg(shards: str, chunks: str, views: int = 200) -> float:
    """PSNR (dB) of the exported JPEG pixels against the shards' pixels, over up to ``views``."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from pipeline.export.common import split_samples
    from pipeline.reader import Scene
    from pipeline.verify import splits_in
    split = splits_in(shards)[0]
    ours = {}
    for sample in split_samples(shards, split):
        ours[sample['__key__']] = Scene(sample)
    se, n = 0.0, 0
    for f in sorted(os.listdir(os.path.join(chunks, split))):
        if not f.endswith('.torch'):
            continue
        for entry in torch.load(os.path.join(chunks, split, f), weights_only=True):
            scene = ours[entry['key']]
            for v, t in enumerate(entry['images'][:views - n]):
                got = np.asarray(Image.open(io.BytesIO(t.numpy().tobytes())).convert('RGB'),
                                 np.float64)
                se += ((got - scene.image(v)) ** 2).mean()
                n += 1
                if n >= views:
                    break
    return float(10 * np.log10(255 ** 2 / (se / n))) if se else float('inf')


def bench(name: str, shards: str, work: str, quality: int) -> None:
    import torch  # noqa: F401  (imported before the timing: not the exporters' cost)
    from pipeline.export.common import split_size
    from pipeline.export.lvsm import export_lvsm
    from pipeline.export.nerfstudio import export_nerfstudio
    from pipeline.export.pixelsplat import export_pixelsplat
    from pipeline.verify import splits_in
    scenes = sum(split_size(shards, s) for s in splits_in(shards))
    rows = [('copy floor', lambda o: copy_floor(shards, o)),
            ('pixelsplat', lambda o: export_pixelsplat(shards, o, progress=False)),
            (f'pixelsplat -q {quality}', lambda o: export_pixelsplat(shards, o, jpeg_quality=quality,
                                                                     progress=False)),
            ('lvsm', lambda o: export_lvsm(shards, o, progress=False)),
            ('nerfstudio', lambda o: export_nerfstudio(shards, o, progress=False))]
    print(f'\n{name}: {scenes} scenes, shards {du(shards) / 2**20:.1f} MiB')
    print(f'{"row":<18}{"scenes/s/core":>14}{"x floor":>9}{"out MiB":>9}')
    floor = None
    outs = {}
    for label, fn in rows:
        out = os.path.join(work, f'{name}_{label.replace(" ", "_")}')
        shutil.rmtree(out, ignore_errors=True)
        rate = scenes / timed(lambda: fn(out))
        floor = floor or rate
        outs[label] = out
        print(f'{label:<18}{rate:>14.1f}{rate / floor:>9.2f}{du(out) / 2**20:>9.2f}')
    kept, jpeg = du(outs['pixelsplat']), du(outs[f'pixelsplat -q {quality}'])
    psnr = psnr_of_jpeg(shards, outs[f'pixelsplat -q {quality}'])
    fidelity = (f'JPEG PSNR {psnr:.1f} dB vs the shards\' pixels' if psnr != float('inf') else
                'the same pixels (JPEG views are kept)')
    print(f'pixelSplat chunks: kept codec {kept / 2**20:.2f} MiB, -q {quality} {jpeg / 2**20:.2f} '
          f'MiB ({jpeg / kept:.2f}x), {fidelity}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--shards', help='a shard directory (default: generate NMR-like and RE10K-like)')
    p.add_argument('--scenes', type=int, default=120, help='scenes per generated set')
    p.add_argument('--quality', type=int, default=90, help='--jpeg-quality row (default 90)')
    p.add_argument('--workdir', default='/tmp/srt_bench_export')
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    sets = {'shards': args.shards} if args.shards else {}
    if not args.shards:
        from pipeline.convert import ConvertConfig, convert
        from pipeline.synthetic import write_synthetic
        for fmt, dataset, kind in (('nmr', 'nmr', None), ('obsurf', 'clevr3d', None),
                                   ('re10k', 're10k', 'pixelsplat')):
            src, out = (os.path.join(args.workdir, f'{fmt}_{x}') for x in ('src', 'shards'))
            if not os.path.isdir(out):
                shutil.rmtree(src, ignore_errors=True)
                write_synthetic(fmt, src, args.scenes // (4 if fmt == 'obsurf' else 1), 0,
                                workers=1)
                convert(ConvertConfig(dataset=dataset, src=src, out=out, progress=False,
                                      source_format=kind))
            sets[fmt] = out
    for name, shards in sets.items():
        bench(name, shards, args.workdir, args.quality)
    return 0


if __name__ == '__main__':
    sys.exit(main())
