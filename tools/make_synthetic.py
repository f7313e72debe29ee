#!/usr/bin/env python
"""Synthetic CLEVR-like scenes in a real dataset's on-disk format (``srt-shards make-synthetic``).

    python tools/make_synthetic.py --format msn --out /tmp/msn --scenes 1000 [--seed 0] \
        [--workers N]

Formats: ``msn`` (SRT MultiShapeNet TFDS directory), ``nmr``, ``obsurf`` (ObSuRF CLEVR3D),
``obsurf-msn`` (ObSuRF MultiShapeNet), ``msn-demo``. Layouts, splits and caveats: docs/SYNTHETIC.md.
"""
import os
import sys

# The renderer's small matrix products are ~2x slower with OpenBLAS threads fighting over the cores:
# set before anything loads numpy.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import make_synthetic_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(make_synthetic_main(prog=os.path.basename(sys.argv[0])))
