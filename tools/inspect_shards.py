#!/usr/bin/env python
"""Summarise, verify or preview a directory of srt-shards shards (``srt-shards inspect``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import inspect_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(inspect_main(prog=os.path.basename(sys.argv[0])))
