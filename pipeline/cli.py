"""Command lines of the data tools: ``convert <format>``, ``export <format>``, ``inspect`` and
``make-synthetic``.

Each is a ``*_main(argv) -> int`` function, run by the ``srt-shards`` console script
(``srt/cli.py``) and by the ``tools/*.py`` wrappers the README names. Library code raises;
only these functions turn its errors into a message on stderr and an exit code (0 done, 1 failed,
2 bad command line).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

# Modules load inside the functions: make-synthetic must set OPENBLAS_NUM_THREADS before numpy loads.

# `convert <format>`: the converter command lines and the datasets each converts. The importers of
# other projects' formats (an empty tuple) convert a dataset of any name (--dataset, default: the
# source directory's name) and need --src.
CONVERTERS = {'nmr': ('nmr',), 'obsurf': ('clevr3d', 'obsurf_msn'), 'msn': ('msn', 'msn_hard'),
              'pixelsplat': (), 'lvsm': (), 'nerfstudio': (), 'co3d': ()}
_FORMAT_HELP = {  # importers: format -> one line
    'pixelsplat': "pixelSplat chunks (<src>/<split>/NNNNNN.torch: RE10K, ACID, DL3DV chunks)",
    'lvsm': 'LVSM scenes (<src>/<split>/full_list.txt of scene JSONs)',
    'nerfstudio': 'nerfstudio transforms.json captures (DL3DV-10K: --dataset dl3dv --downscale 4)',
    'co3d': 'CO3D v2 (<src>/<category>/frame_annotations.jgz, set lists: --subset)',
}
# Where the seed README puts each source dataset.
DEFAULT_SOURCES = {'nmr': 'data/nmr', 'clevr3d': 'data/clevr3d', 'obsurf_msn': 'data/obsurf_msn',
                   'msn': 'data/msn', 'msn_hard': 'data/msn_hard'}


def _error(message: object, *notes: str) -> int:
    print(f'error: {message}', file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    return 1


def convert_main(argv: Sequence[str] | None = None, prog: str = 'srt-shards convert') -> int:
    """``convert <format> [options]``: one of :data:`CONVERTERS`, then that converter's options."""
    p = argparse.ArgumentParser(prog=prog, description='Convert a source dataset into WebDataset '
                                'shards (docs/SHARDS.md). Options: ' + prog + ' <format> --help.')
    p.add_argument('format', choices=CONVERTERS, help='nmr: NMR; obsurf: ObSuRF CLEVR3D or '
                   'MultiShapeNet (--dataset); msn: SRT MultiShapeNet or OSRT\'s MSN-Hard '
                   '(--dataset msn_hard; TFDS, needs the msn extra)'
                   + ''.join(f'; {k}: {v}' for k, v in _FORMAT_HELP.items()))
    p.add_argument('options', nargs=argparse.REMAINDER, help='the converter\'s options')
    args = p.parse_args(argv)
    return convert_format_main(args.format, args.options, prog=f'{prog} {args.format}')


def convert_format_main(fmt: str, argv: Sequence[str] | None = None,
                        prog: str | None = None) -> int:
    """The command line of one converter (``tools/convert_<fmt>.py``, ``convert <fmt>``)."""
    from pipeline.convert import DEFAULT_SHARD_BYTES, ConvertConfig, ConvertError, convert, \
        task_from_environment
    from pipeline.durable import OutputError
    from pipeline.schema import SCHEMA_VERSION, SourceError

    datasets = CONVERTERS[fmt]
    p = argparse.ArgumentParser(
        prog=prog, description=f'Convert {" / ".join(datasets) or _FORMAT_HELP[fmt]} into '
                               f'WebDataset shards (srt-shards schema v{SCHEMA_VERSION}, see '
                               'docs/SHARDS.md).')
    if fmt == 'msn':
        p.add_argument('--dataset', choices=datasets, help="msn (SRT's MultiShapeNet, version "
                       "2.3.3) or msn_hard (OSRT's MSN-Hard, 2.8.0; default when --version is 2.8.0, "
                       'or when the source holds 2.8.0 and not 2.3.3)')
        p.add_argument('--version', help='version directory under multi_shapenet_frames/ (default: '
                       '2.8.0 for msn_hard; 2.3.3, else the newest, for msn)')
    elif len(datasets) > 1:
        p.add_argument('--dataset', choices=datasets, default=datasets[0],
                       help=f'which dataset (default {datasets[0]})')
    if not datasets:  # an importer: any dataset name
        p.add_argument('--dataset', help="the dataset's name in sample keys and meta.json, e.g. "
                       're10k, acid (default: the --src directory\'s name)')
        p.add_argument('--src', required=True, help='source directory')
    else:
        p.add_argument('--src', help='source directory (default: data/<dataset>, the seed README '
                       'layout)')
    p.add_argument('--out', help='output directory (default: shards/<dataset>)')
    p.add_argument('--splits', nargs='+', help='splits to convert (default: all the source has)')
    p.add_argument('--scenes-per-shard', type=int,
                   help='scenes per shard (default: from --shard-mb)')
    p.add_argument('--shard-mb', type=float, default=DEFAULT_SHARD_BYTES / 2**20,
                   help='target shard size in MiB (default 256)')
    p.add_argument('--workers', type=int, default=1, help='writer processes (default 1)')
    p.add_argument('--num-tasks', type=int, help='tasks of a cluster job array sharing this '
                   'conversion (default: SLURM_ARRAY_TASK_COUNT, else 1)')
    p.add_argument('--task-index', type=int, help='this task (default: SLURM_ARRAY_TASK_ID or '
                   'JOB_COMPLETION_INDEX, else 0)')
    p.add_argument('--finalize', action='store_true',
                   help='only merge complete shards into manifest, index and dataset card')
    p.add_argument('--bake-rays', action='store_true',
                   help='also store float32 ray directions per pixel (rays.npy.zst; ~8x image '
                        'bytes)')
    p.add_argument('--skip-bad', action='store_true', help='record bad scenes in '
                   '<out>/<split>.skipped.jsonl and go on, instead of stopping at the first')
    if any(d in ('clevr3d', 'obsurf_msn') for d in datasets):
        p.add_argument('--max-objects', default='6', help="drop scenes with more objects, as the "
                       "reference loader does (default 6; 'all' keeps every scene)")
    _importer_options(p, fmt)
    if fmt == 'pixelsplat':
        p.add_argument('--evaluation-index', metavar='FILE', help="pixelSplat's evaluation index "
                       '(JSON {scene key: {"context": [...], "target": [...]} | null}), carried as '
                       '<out>/<split>.evaluation_index.json keyed by sample keys (default: '
                       'evaluation_index_<dataset>.json in --src or --src/assets, if there)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    args = p.parse_args(argv)
    dataset = getattr(args, 'dataset', None) or (datasets[0] if datasets else
                                                 dataset_name_of(args.src))
    src, kwargs = args.src or DEFAULT_SOURCES.get(dataset, f'data/{dataset}'), {}
    if getattr(args, 'evaluation_index', None):
        kwargs['evaluation_index'] = args.evaluation_index
    if fmt == 'msn':  # the version directory tells SRT's MSN from MSN-Hard
        from pipeline.sources.msn import MSN_HARD_VERSION, dataset_of
        guess = args.dataset or ('msn_hard' if args.version == MSN_HARD_VERSION else 'msn')
        src = args.src or DEFAULT_SOURCES[guess]
        dataset = args.dataset or dataset_of(src, args.version)
        kwargs['version'] = args.version
    if dataset in ('clevr3d', 'obsurf_msn'):
        kwargs['max_objects'] = None if args.max_objects == 'all' else int(args.max_objects)
    if fmt in ('nerfstudio', 'co3d'):
        kwargs.update(_importer_kwargs(p, args, fmt))
    try:
        env_tasks, env_index = task_from_environment()
        cfg = ConvertConfig(
            dataset=dataset, src=src,
            out=args.out or os.path.join('shards', dataset), splits=args.splits,
            scenes_per_shard=args.scenes_per_shard, shard_bytes=int(args.shard_mb * 2**20),
            workers=args.workers,
            num_tasks=args.num_tasks if args.num_tasks is not None else env_tasks,
            task_index=args.task_index if args.task_index is not None else env_index,
            bake_rays=args.bake_rays, skip_bad=args.skip_bad, finalize_only=args.finalize,
            source_kwargs=kwargs, progress=not args.no_progress,
            source_format=None if datasets else fmt)
    except ValueError as e:  # settings: name the flag, as argparse does
        p.error(str(e))
    try:
        summaries = convert(cfg)
    except SourceError as e:
        return _error(e, '(the run stopped; no partial shard is visible. Fix the source, or rerun '
                         'with --skip-bad to record bad scenes and go on)')
    except OutputError as e:
        return _error(e, '(no partial shard is visible; complete shards are kept: rerun to continue)')
    except ConvertError as e:
        return _error(e)
    for split, s in summaries.items():
        if s['finalized']:
            skipped = (f', {s["num_skipped"]} bad scenes skipped (see '
                       f'{cfg.out}/{split}.skipped.jsonl)' if s['num_skipped'] else '')
            print(f'{split}: {s["num_scenes"]} scenes in {s["num_shards"]} shards, '
                  f'{s["bytes"] / 2**20:.1f} MiB -> {cfg.out}{skipped}')
        else:
            print(f'{split}: task {cfg.task_index}/{cfg.num_tasks} wrote {s["shards_written"]} '
                  f'shards; the split is finalized when every task has finished')
    return 0


def _importer_options(p: argparse.ArgumentParser, fmt: str) -> None:
    """The nerfstudio and CO3D importers' own options."""
    if fmt == 'nerfstudio':
        p.add_argument('--downscale', type=int, metavar='N',
                       help="read images_N/ and scale the intrinsics by 1/N as nerfstudio does "
                            "(default: nerfstudio's automatic choice; without full-resolution "
                            "images, the smallest N whose images_N/ holds them)")
        p.add_argument('--split-name', metavar='NAME',
                       help="the split every capture goes to (default: the one --splits names, "
                            "else 'train')")
    if fmt == 'co3d':
        p.add_argument('--subset', metavar='NAME',
                       help='the set lists giving the splits (set_lists_<NAME>.json, e.g. '
                            'fewview_dev, manyview_dev_0; default: the only one, else the first of '
                            'fewview_dev, fewview_test, manyview_dev_0, manyview_dev_1, '
                            'manyview_test that every category has)')


def _importer_kwargs(p: argparse.ArgumentParser, args, fmt: str) -> dict:
    """Their source kwargs (a nerfstudio source is one split: --split-name, else the one --splits
    name, else 'train')."""
    if fmt == 'nerfstudio':
        if args.downscale is not None and args.downscale < 1:
            p.error(f'--downscale must be >= 1, got {args.downscale}')
        split = args.split_name
        if split is None and args.splits:
            if len(args.splits) > 1:
                p.error('a nerfstudio source is one split: give one --splits name (or --split-name)')
            split = args.splits[0]
        return {'downscale': args.downscale, 'split': split or 'train'}
    return {'subset': args.subset}


def dataset_name_of(src: str) -> str:
    """An importer's default dataset name: the source directory's name ('.../re10k/' -> 're10k')."""
    from pipeline.schema import scene_key
    name = os.path.basename(os.path.normpath(os.path.abspath(src)))
    return scene_key(name, '', '')[:-2].lower() or 'dataset'


def inspect_main(argv: Sequence[str] | None = None, prog: str = 'srt-shards inspect') -> int:
    """``inspect DIR [--verify] [--contact-sheet OUT.png]``: summarise, verify or preview shards."""
    from pipeline import verify

    p = argparse.ArgumentParser(
        prog=prog,
        description='Summarise, verify or preview a directory of srt-shards WebDataset shards.')
    p.add_argument('dir', help='shard directory (e.g. shards/msn)')
    p.add_argument('--verify', action='store_true', help='check sha256 against the manifest, '
                   'decode every sample, check every camera and image size')
    p.add_argument('--contact-sheet', metavar='OUT.png', help='write a grid of the first scenes')
    p.add_argument('--scenes', type=int, default=8, help='scenes in the contact sheet (default 8)')
    p.add_argument('--split', help='split for the contact sheet (default: the first)')
    args = p.parse_args(argv)
    try:
        rows = verify.summarize(args.dir)
    except (OSError, ValueError) as e:
        return _error(e)
    print(f'{args.dir}: dataset {rows[0]["dataset"]}, schema v{rows[0]["schema_version"]}')
    print(f'{"split":<8}{"scenes":>10}{"views":>7}{"shards":>8}{"MiB":>10}{"skipped":>9}')
    for r in rows:
        print(f'{r["split"]:<8}{r["scenes"]:>10}{r["views_per_scene"]:>7}{r["shards"]:>8}'
              f'{r["bytes"] / 2**20:>10.1f}{r["skipped"]:>9}')
    members = rows[0]['members']
    print('members per scene:', ' '.join(members) if members is not None else
          f'differ between scenes (view counts differ; images {rows[0]["image_format"]})')
    status = 0
    if args.verify:
        problems = verify.verify(args.dir)
        for problem in problems:
            print(f'PROBLEM: {problem}')
        print(f'verify: {"OK" if not problems else f"{len(problems)} problem(s)"}')
        status = 1 if problems else 0
    if args.contact_sheet:
        try:
            print('contact sheet:', verify.contact_sheet(args.dir, args.contact_sheet, args.scenes,
                                                         args.split))
        except (OSError, ValueError) as e:
            return _error(e)
    return status


def make_synthetic_main(argv: Sequence[str] | None = None,
                        prog: str = 'srt-shards make-synthetic') -> int:
    """``make-synthetic --format F --out DIR --scenes N``: CLEVR-like scenes in a real dataset's
    on-disk format (docs/SYNTHETIC.md)."""
    # The renderer's small matrix products are ~2x slower with OpenBLAS threads fighting over the
    # cores; set before the generator (and numpy, in its worker processes) load.
    os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
    from pipeline.synthetic import FORMATS, write_synthetic

    p = argparse.ArgumentParser(
        prog=prog, description='Render synthetic scenes and write them in a real dataset format.')
    p.add_argument('--format', required=True, choices=FORMATS,
                   help='msn: SRT MultiShapeNet (TFDS); nmr; obsurf: CLEVR3D; '
                        'obsurf-msn: ObSuRF MultiShapeNet; msn-demo: the MSN layout at '
                        '32x32, 1-2 plain objects, a ring of cameras (the CPU demo); msn-hard: '
                        'OSRT\'s MSN-Hard (TFDS 2.8.0, instance and depth images); msn-hard-demo: '
                        'it at 64x64; re10k: pixelSplat '
                        'chunks of RE10K-like video clips (JPEG); lvsm: LVSM scenes of such clips '
                        '(PNG); dl3dv: DL3DV-like nerfstudio captures; co3d: CO3D v2-like categories')
    p.add_argument('--out', required=True, help='output directory (created if missing)')
    p.add_argument('--scenes', required=True, type=int,
                   help='number of scenes over all splits (80/10/10 train/val/test; MSN, '
                        're10k, lvsm: 90/10 train/test; dl3dv: all train)')
    p.add_argument('--seed', type=int, default=0, help='same seed, same bytes (default 0)')
    p.add_argument('--workers', type=int, default=None,
                   help='rendering processes (default: all cores)')
    args = p.parse_args(argv)
    if args.scenes < 1:
        p.error(f'--scenes must be >= 1, got {args.scenes}')
    if args.workers is not None and args.workers < 1:
        p.error(f'--workers must be >= 1, got {args.workers}')
    if args.seed < 0:
        p.error(f'--seed must be >= 0, got {args.seed}')

    from tqdm import tqdm
    start = time.perf_counter()
    try:
        with tqdm(total=args.scenes, unit='scenes', desc=args.format, smoothing=0.1) as bar:
            result = write_synthetic(args.format, args.out, args.scenes, args.seed,
                                     workers=args.workers, progress=bar.update)
    except (OSError, ValueError) as e:
        return _error(e)
    seconds = time.perf_counter() - start
    splits = ', '.join(f'{s} {len(v)}' for s, v in result.scenes.items())
    print(f'{args.format}: {args.scenes} scenes ({splits}) in {result.root} in {seconds:.1f} s '
          f'({args.scenes / seconds:.2f} scenes/s); {result.num_images} colour images, mean '
          f'{result.mean_png_bytes / 1024:.1f} KiB')
    return 0


# `export <format>`: shards -> another project's format (pipeline/export/, docs/EXPORT.md).
EXPORTERS = {
    'pixelsplat': 'pixelSplat chunks (<out>/<split>/NNNNNN.torch + index.json; pixelSplat, '
                  'MVSplat, DepthSplat)',
    'lvsm': "LVSM scenes (<out>/<split>/full_list.txt, metadata/, images/; LVSM's "
            'dataset_scene.py)',
    'nerfstudio': 'nerfstudio captures (<out>/<key>/transforms.json + images/; ns-train, gsplat)',
}


def export_main(argv: Sequence[str] | None = None, prog: str = 'srt-shards export') -> int:
    """``export <format> SHARDS_DIR --out DIR [options]``: one of :data:`EXPORTERS`."""
    p = argparse.ArgumentParser(prog=prog, description='Export shards to another project\'s '
                                'format (docs/EXPORT.md). Options: ' + prog + ' <format> --help.')
    p.add_argument('format', choices=EXPORTERS, help='; '.join(f'{k}: {v}'
                                                             for k, v in EXPORTERS.items()))
    p.add_argument('options', nargs=argparse.REMAINDER, help="the exporter's options")
    args = p.parse_args(argv)
    return export_format_main(args.format, args.options, prog=f'{prog} {args.format}')


def export_format_main(fmt: str, argv: Sequence[str] | None = None,
                       prog: str | None = None) -> int:
    """The command line of one exporter (``tools/export_<fmt>.py``, ``export <fmt>``)."""
    from pipeline.durable import OutputError
    from pipeline.export.common import ExportError, parse_size

    p = argparse.ArgumentParser(prog=prog, description=f'Export shards as {EXPORTERS[fmt]} '
                                '(docs/EXPORT.md). Reruns resume; the output is the same on '
                                'every run.')
    p.add_argument('shards', help='shard directory (e.g. shards/msn)')
    p.add_argument('--out', required=True, help='output directory (new, empty, or an earlier '
                   'run of this export to resume)')
    p.add_argument('--splits', nargs='+', help='splits to export (default: all; pixelSplat reads '
                   'only train/ and test/)')
    if fmt == 'pixelsplat':
        p.add_argument('--chunk-mb', type=float, default=100.0, help='close a chunk once its '
                       'image bytes reach this many MB (default 100, as RE10K\'s chunks)')
        p.add_argument('--jpeg-quality', type=int, metavar='Q', help='re-encode PNG views as '
                       'JPEG of quality Q (default: keep PNG; see docs/EXPORT.md for the cost)')
    if fmt in ('pixelsplat', 'lvsm'):
        p.add_argument('--size', metavar='HxW', help='resize and centre-crop every view to HxW, '
                       'intrinsics adjusted (pixelSplat loads only 360x640)')
    if fmt == 'nerfstudio':
        p.add_argument('--scenes', nargs='+', metavar='KEY', help='only these sample keys')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    args = p.parse_args(argv)
    try:
        size = parse_size(getattr(args, 'size', None))
    except ValueError as e:
        p.error(str(e))
    if getattr(args, 'chunk_mb', 1) <= 0:
        p.error(f'--chunk-mb must be > 0, got {args.chunk_mb}')
    if getattr(args, 'jpeg_quality', None) is not None and not 1 <= args.jpeg_quality <= 100:
        p.error(f'--jpeg-quality must be in 1..100, got {args.jpeg_quality}')
    start = time.perf_counter()
    try:
        if fmt == 'pixelsplat':
            from pipeline.export.pixelsplat import export_pixelsplat
            summary = export_pixelsplat(args.shards, args.out, args.splits,
                                        int(args.chunk_mb * 1e6), size, args.jpeg_quality,
                                        not args.no_progress)
        elif fmt == 'lvsm':
            from pipeline.export.lvsm import export_lvsm
            summary = export_lvsm(args.shards, args.out, args.splits, size, not args.no_progress)
        else:
            from pipeline.export.nerfstudio import export_nerfstudio
            summary = export_nerfstudio(args.shards, args.out, args.splits, args.scenes,
                                        not args.no_progress)
    except OutputError as e:
        return _error(e, '(no partial file is visible; rerun to continue)')
    except (ExportError, OSError, ValueError) as e:  # ShardError, a corrupt tar: named by them
        return _error(e)
    seconds = time.perf_counter() - start
    for split, s in summary.items():
        print(f'{split}: {s if isinstance(s, int) else s["scenes"]} scenes -> {args.out}')
    print(f'{fmt} export done in {seconds:.1f} s')
    return 0
