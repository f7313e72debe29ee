#!/usr/bin/env python
"""Convert the NMR dataset into WebDataset shards (docs/SHARDS.md); ``srt-shards convert nmr``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import convert_format_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(convert_format_main('nmr'))
