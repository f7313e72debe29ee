"""The ``srt-shards`` console script: one command with a subcommand per tool.

    srt-shards convert nmr|obsurf|msn|pixelsplat|lvsm|nerfstudio|co3d ...   a source dataset -> shards
    srt-shards export pixelsplat|lvsm|nerfstudio SHARDS_DIR --out DIR   shards -> another format
    srt-shards inspect DIR [--verify] [--contact-sheet OUT.png]
    srt-shards make-synthetic --format F --out DIR --scenes N
    srt-shards demo                                the end-to-end CPU demo
    srt-shards train | evaluate | render ...       = python -m srt.train | srt.evaluate | srt.render

``python -m srt.cli`` is the same command. ``srt-shards <subcommand> --help`` lists its options. The
data tools live in ``pipeline/cli.py``; a subcommand's module is imported only when it runs, so the
data tools never load the trainer and ``--help`` answers quickly.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from typing import Sequence

PROG = 'srt-shards'
# subcommand -> (module, function, summary). Each function is main(argv) -> int.
COMMANDS = {
    'convert': ('pipeline.cli', 'convert_main',
                'convert a source dataset into WebDataset shards '
                '(convert nmr|obsurf|msn|pixelsplat|lvsm|nerfstudio|co3d ...)'),
    'export': ('pipeline.cli', 'export_main',
               "export shards to another project's format (export pixelsplat|lvsm|nerfstudio ...)"),
    'inspect': ('pipeline.cli', 'inspect_main', 'summarise, verify or preview a shard directory'),
    'make-synthetic': ('pipeline.cli', 'make_synthetic_main',
                       "render CLEVR-like scenes in a real dataset's on-disk format"),
    'demo': ('srt.demo', 'main', 'the end-to-end demo on a CPU: data, shards, training, video'),
    'train': ('srt.train', 'main', 'train an SRT on shards (= python -m srt.train)'),
    'evaluate': ('srt.evaluate', 'main',
                 'score a checkpoint on a split (= python -m srt.evaluate)'),
    'render': ('srt.render', 'main', 'render a video of a scene (= python -m srt.render)'),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Multi-view datasets as WebDataset shards, and SRT trained on them.',
        epilog='subcommands:\n' + '\n'.join(f'  {name:<16}{summary}'
                                            for name, (_, _, summary) in COMMANDS.items())
        + f'\n\n{PROG} <subcommand> --help lists its options.')
    p.add_argument('command', choices=COMMANDS, metavar='subcommand', help='see below')
    p.add_argument('args', nargs=argparse.REMAINDER, metavar='...',
                   help="the subcommand's arguments")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``srt-shards <subcommand> [args]``; returns the exit status."""
    args = _parser().parse_args(argv)
    module, name, _ = COMMANDS[args.command]
    fn = getattr(importlib.import_module(module), name)
    prog = f'{PROG} {args.command}'
    if 'prog' in inspect.signature(fn).parameters:
        return fn(args.args, prog=prog)
    # The trainer's, evaluator's and renderer's parsers take no prog: argparse names the program
    # after sys.argv[0], so their usage lines read `srt-shards train ...` too.
    argv0 = sys.argv[0]
    sys.argv[0] = prog
    try:
        return fn(args.args)
    finally:
        sys.argv[0] = argv0


if __name__ == '__main__':
    sys.exit(main())
