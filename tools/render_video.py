#!/usr/bin/env python
"""Render a video of a scene with a trained SRT (same as ``python -m srt.render``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from srt.render import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
