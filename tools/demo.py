#!/usr/bin/env python
"""The end-to-end CPU demo (``make demo``; ``srt-shards demo``): see srt/demo.py."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from srt.demo import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(prog=os.path.basename(sys.argv[0]), out=os.path.join(ROOT, 'demo_out')))
