"""Learning-rate schedule and image metrics, as the reference defines them (``masked_psnr``, the
object-pixel PSNR of issue 14, is ours)."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F


def get_lr(it: int, peak: float = 1e-4, warmup: int = 2500, decay_it: int = 4000000,
           decay: float = 0.16) -> float:
    """The reference's schedule: linear warmup from 0 to ``peak`` over ``warmup`` iterations, then
    ``peak * decay ** ((it - warmup) / decay_it)``."""
    if it < warmup:
        return peak * it / warmup
    return peak * decay ** ((it - warmup) / decay_it)


def mse2psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] from their MSE (per scene; the reference then averages PSNRs)."""
    return -10.0 * torch.log10(mse)


MAX_PSNR = 100.0  # dB: what masked_psnr gives an exact prediction (MSE floored at 1e-10)


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                max_psnr: float = MAX_PSNR) -> torch.Tensor:
    """PSNR [b] in dB over the pixels where ``mask`` is set (all pixels if None).

    pred, target [b, p, 3] in [0, 1]; mask [b, p] bool. The MSE is the mean over the selected
    pixels and the 3 channels, floored at 10^(-max_psnr / 10) so that a perfect prediction scores
    ``max_psnr`` (not infinity); an item with no selected pixel gives NaN (``nanmean`` skips it).
    """
    err = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [b, p]
    if mask is None:
        mask = torch.ones_like(err, dtype=torch.bool)
    count = mask.sum(dim=-1)
    mse = (err * mask).sum(dim=-1) / count.clamp(min=1)
    psnr = -10.0 * torch.log10(mse.clamp(min=10.0 ** (-max_psnr / 10.0)))
    return torch.where(count > 0, psnr, torch.full_like(psnr, math.nan))


def nanmean(values: Iterable[float]) -> float:
    """Mean over the finite values (NaN when there are none): averages of per-item PSNRs that
    skip items without object pixels."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def adjusted_rand_index(true_masks: torch.Tensor, pred_weights: torch.Tensor) -> torch.Tensor:
    """Adjusted Rand index of a predicted segmentation, per scene, as OSRT's reference computes it.

    (stelzner/osrt ``compute_adjusted_rand_index``, after DeepMind's multi_object_datasets.)
    Points whose true mask is all zeros are ignored; the prediction of each point is its argmax slot
    (first on ties). Where the kept points form one true segment and one predicted segment the score
    is 1 (the formula would divide 0 by 0).

    Args:
        true_masks: [b, p, k] one-hot true segment of each point (rows of zeros: ignored points).
        pred_weights: [b, p, s] predicted slot weights (e.g. the decoder's ``segmentation``).
    Returns:
        [b] float64 in [-1, 1] (1: the same partition up to renaming).
    """
    b, p, k = true_masks.shape
    s = pred_weights.shape[-1]
    if pred_weights.shape[:2] != (b, p):
        raise ValueError(f'ARI: masks {tuple(true_masks.shape)} and weights {tuple(pred_weights.shape)} '
                         'differ in batch or points')
    if p <= k and p <= s:
        raise ValueError(f'ARI needs more points ({p}) than segments ({k}) or slots ({s})')
    true = true_masks.double()
    pred_ids = pred_weights.argmax(-1)  # [b, p]
    pred = F.one_hot(pred_ids, s).double()
    counts = torch.einsum('bpk,bps->bks', true, pred)  # contingency table [b, k, s] over kept points
    n = true.sum((1, 2))
    true_pairs = (counts.sum(2) * (counts.sum(2) - 1)).sum(1)  # ordered pairs within true segments
    pred_pairs = (counts.sum(1) * (counts.sum(1) - 1)).sum(1)
    both_pairs = (counts * (counts - 1)).sum((1, 2))
    expected = true_pairs * pred_pairs / (n * (n - 1))
    maximum = (true_pairs + pred_pairs) / 2
    ari = (both_pairs - expected) / (maximum - expected)

    kept = true.sum(-1) > 0  # [b, p]
    single = _one_segment(true.argmax(-1), kept) & _one_segment(pred_ids, kept)
    return torch.where(single, torch.ones_like(ari), ari)


def _one_segment(ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[b] whether all kept points of each scene share one id (ids, kept: [b, p])."""
    big = torch.iinfo(ids.dtype).max
    lo = torch.where(kept, ids, big).amin(-1)
    hi = torch.where(kept, ids, -1).amax(-1)
    return (lo == hi) | ~kept.any(-1)


def scorable(true_masks: torch.Tensor, pred_weights: torch.Tensor) -> bool:
    """Whether :func:`adjusted_rand_index` accepts these shapes (more points than segments or
    slots), so that callers scoring whatever batch they get can skip instead of failing."""
    return true_masks.shape[1] > min(true_masks.shape[-1], pred_weights.shape[-1])


def segmentation_scores(true_masks: torch.Tensor, pred_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``ari`` (all segments, background included) and ``fg_ari`` (background points ignored) [b].

    As OSRT's trainer scores its decoder: the background is segment 0 of ``true_masks`` [b, p, k]
    (MSN-Hard: instance ids 0 and 1; CLEVR3D: mask id 0), and FG-ARI drops that column.
    """
    return {'ari': adjusted_rand_index(true_masks, pred_weights),
            'fg_ari': adjusted_rand_index(true_masks[..., 1:], pred_weights)}


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity of images [n, h, w, c] in [0, 1] -> [n].

    Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, over the valid
    region, averaged over channels (the common definition of tf.image.ssim / scikit-image with
    gaussian_weights). Images smaller than the window use a window of their size.
    """
    a = a.permute(0, 3, 1, 2).double()
    b = b.permute(0, 3, 1, 2).double()
    c = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(size, sigma, c, a.device, a.dtype)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a ** 2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b ** 2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).float()

