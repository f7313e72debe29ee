"""Synthetic CLEVR-like scenes, an analytic ray-caster, and writers of the real datasets' on-disk
formats (pure numpy; TensorFlow only inside the MSN writer).

The project cannot download NMR, ObSuRF or MultiShapeNet, so tests, benchmarks and the demo render
their own small scenes and write them exactly as each dataset's files (mirroring the test vectors
in ``tests/data/testvectors/sources/``), so that the reference loaders and the project's source
readers open them unchanged. Nothing on the data path imports this package. Modules:

- ``scene``: the scene model and its deterministic sampling per (seed, split, index)
- ``rigs``: the datasets' camera rigs
- ``raycast``: intersection, shading and rendering of views
- ``common``: the per-format table, the renders of a format's scene, the worker pool, split sizes
- ``nmr``, ``obsurf``, ``msn`` (also MSN-Hard): one writer per format; ``write_synthetic`` dispatches to them
- ``re10k`` (pixelSplat chunks of RE10K / ACID-like clips, JPEG frames) and ``lvsm`` (LVSM scenes):
  the importers' formats, hand-held video clips (``rigs.video_cameras``)
- ``dl3dv`` (DL3DV-like nerfstudio captures) and ``co3d`` (CO3D v2-like categories): the
  other importers' formats

Each writer drops ``SYNTHETIC_MARKER`` (a JSON summary) into its output directory; the converter's
dataset card recognises generated sources by it. See docs/SYNTHETIC.md.

>>> scene = sample_scene('msn', seed=0, split='train', index=0)
>>> K, poses = msn_cameras(scene_rng(0, 'train', 0, STREAM_CAMERAS), num_views=2)
>>> out = render(scene, K[0], poses[0], 16, 16)
>>> out['rgb'].shape, out['rgb'].dtype.name, out['depth'].shape, out['category'].shape
((16, 16, 3), 'uint8', (16, 16), (16, 16))
"""
from __future__ import annotations

from pipeline.schema import SYNTHETIC_MARKER
from pipeline.synthetic.common import (FORMATS, MSN_SIZE, MSN_SIZES, MSN_VIEWS, NMR_CLASSES,
                                       NMR_SIZE, NMR_VIEWS, OBSURF, OBSURF_HEIGHT, OBSURF_VIEWS,
                                       OBSURF_WIDTH, VIDEO_FORMATS, WriteResult, check_format,
                                       default_split_sizes, msn_scene_index, png_bytes,
                                       render_scene, save_npz, scene_cameras, video_size)
from pipeline.synthetic.lvsm import write_lvsm
from pipeline.synthetic.co3d import co3d_sequence, write_co3d
from pipeline.synthetic.dl3dv import dl3dv_capture, write_dl3dv
from pipeline.synthetic.msn import msn_features, write_msn
from pipeline.synthetic.nmr import write_nmr
from pipeline.synthetic.obsurf import write_obsurf
from pipeline.synthetic.re10k import evaluation_entry, jpeg_bytes, video_key, write_re10k
from pipeline.synthetic.raycast import render, render_rays, render_views, trace
from pipeline.synthetic.rigs import (NMR_FOCAL, msn_cameras, msn_intrinsics, nmr_cameras,
                                     nmr_intrinsics, obsurf_camera_positions, ring_cameras,
                                     video_cameras)
from pipeline.synthetic.scene import (CATEGORY_NAMES, KINDS, SPLITS, STREAM_CAMERAS,
                                      STREAM_NOISE, STREAM_SCENE, STYLES, Scene, SceneStyle,
                                      sample_scene, scene_rng, without_objects)

__all__ = [
    'CATEGORY_NAMES', 'FORMATS', 'KINDS', 'MSN_SIZE', 'MSN_VIEWS', 'NMR_CLASSES', 'NMR_FOCAL',
    'NMR_SIZE', 'NMR_VIEWS', 'OBSURF', 'OBSURF_HEIGHT', 'OBSURF_VIEWS', 'OBSURF_WIDTH', 'SPLITS',
    'STREAM_CAMERAS', 'STREAM_NOISE', 'STREAM_SCENE', 'STYLES', 'SYNTHETIC_MARKER', 'Scene',
    'SceneStyle', 'VIDEO_FORMATS', 'WriteResult', 'co3d_sequence', 'default_split_sizes',
    'dl3dv_capture', 'evaluation_entry', 'jpeg_bytes', 'msn_cameras', 'msn_features',
    'msn_intrinsics', 'msn_scene_index', 'nmr_cameras', 'nmr_intrinsics',
    'obsurf_camera_positions', 'png_bytes', 'render', 'render_rays', 'render_scene',
    'render_views', 'ring_cameras', 'sample_scene', 'save_npz', 'scene_cameras', 'scene_rng',
    'trace', 'video_cameras', 'video_key', 'video_size', 'without_objects', 'write_co3d',
    'write_dl3dv', 'write_lvsm', 'write_msn', 'write_nmr', 'write_obsurf', 'write_re10k',
    'write_synthetic',
]


def write_synthetic(fmt: str, out_dir, num_scenes: int, seed: int = 0, **kwargs) -> WriteResult:
    """Write ``num_scenes`` scenes in format ``fmt`` (one of FORMATS: 'msn', 'nmr', 'obsurf' =
    CLEVR3D, 'obsurf-msn' = ObSuRF-MSN, 'msn-demo', 'msn-hard' = OSRT's MSN-Hard (2.8.0),
    'msn-hard-demo', 're10k' = pixelSplat chunks, 'lvsm' = LVSM scenes, 'dl3dv' = DL3DV-like
    nerfstudio captures, 'co3d' = CO3D v2-like sequences); kwargs go to the writer (split_sizes,
    workers, progress, scenes_per_file for MSN, scenes_per_chunk and views for the video formats,
    downscale and image_format for dl3dv)."""
    check_format(fmt)
    if fmt == 're10k':
        return write_re10k(out_dir, num_scenes, seed, **kwargs)
    if fmt == 'lvsm':
        return write_lvsm(out_dir, num_scenes, seed, **kwargs)
    if fmt == 'dl3dv':
        return write_dl3dv(out_dir, num_scenes, seed, **kwargs)
    if fmt == 'co3d':
        return write_co3d(out_dir, num_scenes, seed, **kwargs)
    if fmt == 'nmr':
        return write_nmr(out_dir, num_scenes, seed, **kwargs)
    if fmt in MSN_SIZES:
        return write_msn(out_dir, num_scenes, seed, variant=fmt, **kwargs)
    return write_obsurf(out_dir, num_scenes, seed, variant='clevr3d' if fmt == 'obsurf' else 'msn',
                        **kwargs)
