#!/usr/bin/env python
"""Export a shard directory as pixelSplat chunks: ``tools/export_pixelsplat.py SHARDS_DIR --out DIR``.

Same as ``srt-shards export pixelsplat`` (see docs/EXPORT.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import export_format_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(export_format_main('pixelsplat'))
