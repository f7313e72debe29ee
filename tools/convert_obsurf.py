#!/usr/bin/env python
"""Convert ObSuRF's CLEVR3D or MultiShapeNet (--dataset clevr3d|obsurf_msn) into WebDataset shards.

Same as ``srt-shards convert obsurf`` (see docs/SHARDS.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import convert_format_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(convert_format_main('obsurf'))
