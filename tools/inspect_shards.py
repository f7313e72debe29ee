#!/usr/bin/env python
"""Summarise, verify or preview a directory of srt-shards WebDataset shards."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import verify  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('dir', help='shard directory (e.g. shards/msn)')
    p.add_argument('--verify', action='store_true', help='check sha256 against the manifest, decode '
                   'every sample, check every camera and image size')
    p.add_argument('--contact-sheet', metavar='OUT.png', help='write a grid of the first scenes')
    p.add_argument('--scenes', type=int, default=8, help='scenes in the contact sheet (default 8)')
    p.add_argument('--split', help='split for the contact sheet (default: the first)')
    args = p.parse_args(argv)
    try:
        rows = verify.summarize(args.dir)
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'{args.dir}: dataset {rows[0]["dataset"]}, schema v{rows[0]["schema_version"]}')
    print(f'{"split":<8}{"scenes":>10}{"views":>7}{"shards":>8}{"MiB":>10}{"skipped":>9}')
    for r in rows:
        print(f'{r["split"]:<8}{r["scenes"]:>10}{r["views_per_scene"]:>7}{r["shards"]:>8}'
              f'{r["bytes"] / 2**20:>10.1f}{r["skipped"]:>9}')
    print('members per scene:', ' '.join(rows[0]['members']))
    status = 0
    if args.verify:
        problems = verify.verify(args.dir)
        for problem in problems:
            print(f'PROBLEM: {problem}')
        print(f'verify: {"OK" if not problems else f"{len(problems)} problem(s)"}')
        status = 1 if problems else 0
    if args.contact_sheet:
        print('contact sheet:', verify.contact_sheet(args.dir, args.contact_sheet, args.scenes,
                                                     args.split))
    return status


if __name__ == '__main__':
    sys.exit(main())
