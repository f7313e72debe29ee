#!/usr/bin/env python
"""Convert the MSN dataset into WebDataset shards (see docs/SHARDS.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.convert import cli_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(cli_main(('msn',)))
