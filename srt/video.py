"""Videos of a scene from novel cameras: the camera motions, rendering a motion with a trained
SRT, and H.264 encoding (``python -m srt.render`` is the command line).

Motions as the reference's render.py: ``rotate`` (orbit about the vertical axis), ``zoom``
(narrowing the sensor), ``closeup`` (moving towards the scene centre, panning up),
``rotate_and_closeup``, ``eyeroll`` (a fixed camera tracking a circle); ``fade`` eases in and out.
The video camera is, as in the reference, a level pinhole (focal 0.035, sensor 0.032) at the first
input camera's position looking at the world origin, z up; the scene is encoded from its input
views and rendered in the canonical frame it was encoded in. Writes PNG frames and an H.264 MP4
(PyAV; no system ffmpeg needed), plus depth frames/video for the volumetric decoder and, with
``segmentation``, the argmax slot of each pixel of a segmenting decoder (OSRT) in OSRT's render.py
colours (slot i: HSV(i / (slots + 1), 0.45, 0.8)).
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch

from pipeline import cameras
from pipeline.index import read_scene
from pipeline.reader import Scene
from srt.data import choose_views, collate, key_seed, make_item, to_model_inputs
from srt.model.rendering import render_image
from srt.visualize import clustering_colors, colorize

MOTIONS = ('rotate', 'zoom', 'closeup', 'rotate_and_closeup', 'eyeroll')
SENSOR_WIDTH = 0.032


def apply_fade(t: float, t_fade: float = 0.2) -> float:
    """Ease in and out: constant acceleration for the first and last ``t_fade`` of the clip."""
    v_max = 1.0 / (1.0 - t_fade)
    acc = v_max / t_fade
    if t <= t_fade:
        return 0.5 * acc * t ** 2
    if t <= 1.0 - t_fade:
        return 0.5 * acc * t_fade ** 2 + v_max * (t - t_fade)
    return 1.0 - 0.5 * acc * (t - 1.0) ** 2


def _lerp(a, b, t):
    return a + (b - a) * t


def _rot_z(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    R = np.eye(4)
    R[:2, :2] = [[c, -s], [s, c]]
    return R


def _closeup(pos: np.ndarray, t: float, closeup=0.2, z_closeup=0.1, lookup=3.0):
    """(camera position, track point) moving from ``pos`` looking at the origin towards the centre,
    low, looking further up the scene (the reference's get_camera_closeup)."""
    final_pos = closeup * pos
    final_pos[2] = z_closeup * pos[2]
    final_track = pos + (0 - pos) * lookup
    final_track[2] = 0.0
    cur = _lerp(pos, final_pos, t)
    cur[2] = _lerp(pos[2], final_pos[2], -0.5 * t ** 2 + 1.5 * t)
    return cur, _lerp(np.zeros(3), final_track, t)


def motion_camera(motion: str, pos: np.ndarray, t: float, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(K, world_from_cam) of the video camera at time t in [0, 1) for a start position ``pos``."""
    K = cameras.obsurf_intrinsics(height, width, sensor_width=SENSOR_WIDTH)
    if motion == 'rotate':
        return K, _rot_z(2 * math.pi * t) @ cameras.look_at(pos)
    if motion == 'zoom':
        sensor = _lerp(SENSOR_WIDTH, SENSOR_WIDTH / 5, t)
        return cameras.obsurf_intrinsics(height, width, sensor_width=sensor), cameras.look_at(pos)
    if motion == 'closeup':
        eye, track = _closeup(pos.copy(), t)
        return K, cameras.look_at(eye, track)
    if motion == 'rotate_and_closeup':
        eye, track = _closeup(pos.copy(), ((-math.cos(2 * math.pi * t) + 1) * 0.5) * 0.5, lookup=1.5)
        return K, _rot_z(2 * math.pi * t) @ cameras.look_at(eye, track)
    if motion == 'eyeroll':
        theta = -2 * math.pi * t
        return K, cameras.look_at(pos, 1.5 * np.array([math.cos(theta), math.sin(theta), 0.0]))
    raise ValueError(f'unknown motion {motion!r}; choose one of {MOTIONS}')


def write_video(frames: list[np.ndarray], path: str, fps: int = 30) -> str:
    """H.264 MP4 of uint8 [h, w, 3] frames (padded to even sizes for yuv420p)."""
    import av
    h, w = frames[0].shape[:2]
    H, W = h + h % 2, w + w % 2
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264', rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, 'yuv420p'
        stream.options = {'crf': '18'}
        for frame in frames:
            frame = np.pad(frame, ((0, H - h), (0, W - w), (0, 0)), mode='edge')
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def load_scene(shards: str, split: str, scene: str) -> Scene:
    """A scene of a split by its key, or (digits) by the reference loader's scene index; KeyError
    naming it if the split has no such scene."""
    ref = int(scene) if scene.isdigit() else scene
    return read_scene(shards, split, ref)


@torch.no_grad()
def render_motion(model, scene: Scene, data_cfg, motion: str, num_frames: int, out_dir: str,
                  height: int | None = None, width: int | None = None, fade: bool = False,
                  device='cpu', render_kwargs=None, seed: int = 0, autocast=contextlib.nullcontext,
                  chunk: int = 16384, segmentation: bool = False) -> dict[str, str]:
    """Encode the scene (key-seeded input views) and render ``num_frames`` frames of ``motion``
    (``segmentation``: also the segmenting decoder's slot per pixel; ValueError for another)."""
    from PIL import Image
    render_kwargs = {**(render_kwargs or {}), 'deterministic': True}
    rng = np.random.default_rng(key_seed(scene.key, seed))
    inputs, targets = choose_views(data_cfg, scene.num_views, 0, rng)
    batch = collate([make_item(data_cfg, scene, inputs, targets, rng)])
    x = to_model_inputs(batch, device)
    model.eval()
    with autocast():
        z = model.encoder(x['input_images'], x['input_camera_pos'], x['input_rays'])
    T = batch['transform'][0].astype(np.float64) if 'transform' in batch else np.eye(4)
    h = height or x['input_rays'].shape[2]
    w = width or x['input_rays'].shape[3]
    start = scene.c2w[inputs[0], :3, 3]
    os.makedirs(os.path.join(out_dir, 'frames'), exist_ok=True)
    frames, depth_frames, seg_frames = [], [], []
    for i, img in enumerate(x['input_images'][0]):
        Image.fromarray((img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)).save(
            os.path.join(out_dir, f'input_{i}.png'))
    for f in range(num_frames):
        t = f / num_frames
        K, c2w = motion_camera(motion, start, apply_fade(t) if fade else t, h, w)
        _, dirs = cameras.image_rays(K, T @ c2w, h, w)  # into the frame the scene was encoded in
        pos = torch.tensor(cameras.transform_points(c2w[:3, 3], T), dtype=torch.float32,
                           device=device)[None]
        rays = torch.tensor(dirs, dtype=torch.float32, device=device)[None]
        with autocast():
            img, extras = render_image(model, z, pos, rays, chunk=chunk, **render_kwargs)
        frame = (img[0].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        Image.fromarray(frame).save(os.path.join(out_dir, 'frames', f'{f:04d}.png'))
        frames.append(frame)
        if 'depth' in extras:
            far = render_kwargs.get('max_dist', 1.0)
            d = (np.clip(extras['depth'][0].float().cpu().numpy() / far, 0, 1) * 255).astype(np.uint8)
            os.makedirs(os.path.join(out_dir, 'depths'), exist_ok=True)
            Image.fromarray(d).save(os.path.join(out_dir, 'depths', f'{f:04d}.png'))
            depth_frames.append(np.repeat(d[..., None], 3, -1))
        if segmentation:
            seg_frames.append(_segmentation_frame(extras, os.path.join(out_dir, 'segmentations'), f))
    out = {'frames': os.path.join(out_dir, 'frames'),
           'video': write_video(frames, os.path.join(out_dir, 'video.mp4'))}
    if depth_frames:
        out['depth_video'] = write_video(depth_frames, os.path.join(out_dir, 'depth.mp4'))
    if seg_frames:
        out['segmentations'] = os.path.join(out_dir, 'segmentations')
        out['segmentation_video'] = write_video(seg_frames, os.path.join(out_dir, 'segmentation.mp4'))
    return out


def _segmentation_frame(extras: dict, frame_dir: str, f: int) -> np.ndarray:
    """The frame's argmax slot per pixel in OSRT's render.py colours (slot i: colour i + 1 of
    ``clustering_colors(slots + 1)``), saved as ``frame_dir/<f>.png``."""
    from PIL import Image
    if 'segmentation' not in extras:
        raise ValueError("--segmentation: this model's decoder gives no slot weights (only OSRT's "
                         'slot_mixer / spatial_broadcast decoders do)')
    weights = extras['segmentation'][0].float().cpu()  # [h, w, slots]
    colors = clustering_colors(weights.shape[-1] + 1)
    frame = (colorize(weights.argmax(-1).numpy() + 1, colors) * 255).round().astype(np.uint8)
    os.makedirs(frame_dir, exist_ok=True)
    Image.fromarray(frame).save(os.path.join(frame_dir, f'{f:04d}.png'))
    return frame
