"""Volume-rendering math for the volumetric (NeRF) decoder, as small pure torch functions.

Shapes: ``...`` is any leading shape (typically [b, r]: batch, rays); s is the number of samples along
a ray. Depths are distances along unit ray directions, in scene units. Every function keeps static
shapes (the sample counts are Python ints), builds its tensors on the input's device and never syncs
with the host, so it traces under ``torch.compile`` without graph breaks.

Conventions follow the reference (stelzner/srt ``srt/utils/nerf.py``): sample i's density fills the
segment up to sample i + 1, the last segment is 1e10 long, the fine-sampling histogram gives each coarse
sample's weight 75% to the segment before it and 25% to the one after, and images are composited on
white (``rgb + (1 - alpha) * 1``; see :func:`over_white` for the one deliberate difference).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

LAST_SEGMENT = 1e10  # length given to the segment behind the last sample


def stratified_depths(min_dist: float, max_dist: float, num_samples: int, like: Tensor,
                      deterministic: bool = False) -> Tensor:
    """One depth per equal segment of [min_dist, max_dist]: uniform within it, or its midpoint.

    Args:
        like: [...] a tensor giving the leading shape, device and dtype (e.g. ``rays[..., 0]``).
    Returns:
        [..., num_samples] increasing depths.
    """
    borders = torch.linspace(0.0, 1.0, num_samples + 1, device=like.device, dtype=like.dtype)
    borders = borders * (max_dist - min_dist) + min_dist  # [s + 1]
    lower, upper = borders[:-1], borders[1:]
    shape = (*like.shape, num_samples)
    if deterministic:
        return ((upper + lower) / 2).expand(shape)
    u = torch.rand(shape, device=like.device, dtype=like.dtype)
    return lower + u * (upper - lower)


def points_along_rays(camera_pos: Tensor, rays: Tensor, depths: Tensor) -> Tensor:
    """camera_pos [..., 3], rays [..., 3], depths [..., s] -> points [..., s, 3]."""
    return camera_pos.unsqueeze(-2) + rays.unsqueeze(-2) * depths.unsqueeze(-1)


def sample_pdf(bins: Tensor, weights: Tensor, num_samples: int, deterministic: bool = False) -> Tensor:
    """Inverse-transform samples from a piecewise-constant density over bins.

    Args:
        bins: [..., k + 1] increasing bin borders.
        weights: [..., k] non-negative bin weights, summing to about one (1e-5 is added to each).
        deterministic: evenly spaced quantiles ``linspace(0, 1, num_samples)`` instead of uniform ones.
    Returns:
        [..., num_samples] samples (not sorted when random).
    """
    cdf = torch.cumsum(weights + 1e-5, dim=-1)
    cdf = torch.cat((torch.zeros_like(cdf[..., :1]), cdf), dim=-1)  # [..., k + 1]
    shape = (*bins.shape[:-1], num_samples)
    if deterministic:
        u = torch.linspace(0.0, 1.0, num_samples, device=bins.device, dtype=bins.dtype).expand(shape)
    else:
        u = torch.rand(shape, device=bins.device, dtype=bins.dtype)
    u = u.contiguous()
    idx = torch.searchsorted(cdf.contiguous(), u, right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_below, cdf_above = cdf.gather(-1, below), cdf.gather(-1, above)
    bins_below, bins_above = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_above - cdf_below
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    return bins_below + (u - cdf_below) / denom * (bins_above - bins_below)


def fine_depths(coarse_depths: Tensor, coarse_weights: Tensor, min_dist: float, num_samples: int,
                deterministic: bool = False) -> Tensor:
    """Depths for hierarchical sampling, drawn from the coarse pass's compositing weights.

    The histogram's bins run from ``min_dist`` through each coarse depth to one half-spacing past the
    last; each coarse weight goes 75% to the bin ending at its sample and 25% to the bin after it.

    Args:
        coarse_depths: [..., s] increasing; coarse_weights: [..., s].
    Returns:
        [..., num_samples], detached (no gradient flows into the sample positions).
    """
    coarse_depths, coarse_weights = coarse_depths.detach(), coarse_weights.detach()
    bins = torch.cat((torch.full_like(coarse_depths[..., :1], min_dist), coarse_depths,
                      1.5 * coarse_depths[..., -1:] - 0.5 * coarse_depths[..., -2:-1]), dim=-1)
    zero = torch.zeros_like(coarse_weights[..., :1])
    hist = torch.cat((coarse_weights * 0.75, zero), dim=-1) + torch.cat((zero, coarse_weights * 0.25), dim=-1)
    return sample_pdf(bins, hist, num_samples, deterministic=deterministic)


class Composite(NamedTuple):
    """Result of :func:`composite`."""
    rgb: Tensor  # [..., 3] expected colour, sum of weights times colours (premultiplied by alpha)
    alpha: Tensor  # [...] probability that the ray hits something
    depth: Tensor  # [...] expected depth (sum of weights times depths)
    weights: Tensor  # [..., s] probability that the ray ends at each sample's segment


def composite(density: Tensor, color: Tensor, depths: Tensor) -> Composite:
    """Alpha-composite samples along each ray.

    Args:
        density: [..., s] non-negative densities (per scene unit).
        color: [..., s, 3] colours.
        depths: [..., s] increasing sample depths.
    """
    deltas = torch.cat((depths[..., 1:] - depths[..., :-1],
                        torch.full_like(depths[..., :1], LAST_SEGMENT)), dim=-1)
    p_segment_empty = torch.exp(-density * deltas)
    alpha = 1.0 - p_segment_empty
    # Probability that the ray passes every segment up to and including i (1e-10: the reference's).
    p_empty_through = torch.cumprod(p_segment_empty + 1e-10, dim=-1)
    p_empty_before = torch.cat((torch.ones_like(p_empty_through[..., :1]), p_empty_through[..., :-1]), -1)
    weights = alpha * p_empty_before
    rgb = (color * weights.unsqueeze(-1)).sum(-2)
    depth = (weights * depths).sum(-1)
    return Composite(rgb=rgb, alpha=1.0 - p_empty_through[..., -1], depth=depth, weights=weights)


def over_white(rgb: Tensor, alpha: Tensor) -> Tensor:
    """Put premultiplied colour rgb [..., 3] (``Composite.rgb``) with coverage alpha [...] over white.

    The reference multiplies the already weighted colour by alpha once more (``rgb * alpha + 1 - alpha``);
    since its last segment is 1e10 long, alpha is 1 for almost every ray and the two agree there.
    """
    return rgb + (1.0 - alpha).unsqueeze(-1)
