#!/usr/bin/env python
"""Convert nerfstudio transforms.json captures (DL3DV-10K, --dataset dl3dv --downscale 4) into WebDataset shards.

Same as ``srt-shards convert nerfstudio`` (see docs/SHARDS.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import convert_format_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(convert_format_main('nerfstudio'))
