"""Generate synthetic CLEVR-like scenes in a real dataset's on-disk format.

    python tools/make_synthetic.py --format msn --out /tmp/msn --scenes 1000 [--seed 0] \
        [--workers N]

Formats: ``msn`` (SRT MultiShapeNet TFDS directory), ``nmr``, ``obsurf`` (ObSuRF CLEVR3D),
``obsurf-msn`` (ObSuRF MultiShapeNet). Layouts, splits and caveats: docs/SYNTHETIC.md.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

# The renderer's small matrix products are ~2x slower with OpenBLAS threads fighting over the cores.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.synthetic import FORMATS, write_synthetic  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description='Render synthetic scenes and write them in a real dataset format.')
    parser.add_argument('--format', required=True, choices=FORMATS,
                        help='msn: SRT MultiShapeNet (TFDS); nmr; obsurf: CLEVR3D; '
                             'obsurf-msn: ObSuRF MultiShapeNet; msn-demo: the MSN layout at '
                             '64x64 with plain scenes (the CPU demo)')
    parser.add_argument('--out', required=True, help='output directory (created if missing)')
    parser.add_argument('--scenes', required=True, type=int,
                        help='number of scenes over all splits (80/10/10 train/val/test; MSN: '
                             '90/10 train/test)')
    parser.add_argument('--seed', type=int, default=0, help='same seed, same bytes (default 0)')
    parser.add_argument('--workers', type=int, default=None,
                        help='rendering processes (default: all cores)')
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error(f'--scenes must be >= 1, got {args.scenes}')
    if args.workers is not None and args.workers < 1:
        parser.error(f'--workers must be >= 1, got {args.workers}')
    if args.seed < 0:
        parser.error(f'--seed must be >= 0, got {args.seed}')

    from tqdm import tqdm
    start = time.perf_counter()
    with tqdm(total=args.scenes, unit='scenes', desc=args.format, smoothing=0.1) as bar:
        result = write_synthetic(args.format, args.out, args.scenes, args.seed,
                                 workers=args.workers, progress=bar.update)
    seconds = time.perf_counter() - start
    splits = ', '.join(f'{s} {len(v)}' for s, v in result.scenes.items())
    print(f'{args.format}: {args.scenes} scenes ({splits}) in {result.root} in {seconds:.1f} s '
          f'({args.scenes / seconds:.2f} scenes/s); {result.num_images} colour PNGs, mean '
          f'{result.mean_png_bytes / 1024:.1f} KiB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
