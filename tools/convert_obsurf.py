#!/usr/bin/env python
"""Convert ObSuRF's CLEVR3D or MultiShapeNet (--dataset clevr3d|obsurf_msn) into WebDataset shards."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.convert import cli_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(cli_main(('clevr3d', 'obsurf_msn')))
