#!/usr/bin/env python
"""Convert pixelSplat chunks (RE10K, ACID, DL3DV chunks: <src>/<split>/NNNNNN.torch) into WebDataset
shards.

Same as ``srt-shards convert pixelsplat`` (see docs/SHARDS.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import convert_format_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(convert_format_main('pixelsplat'))
