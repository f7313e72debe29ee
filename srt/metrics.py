"""Learning-rate schedule and image metrics, as the reference defines them."""
from __future__ import annotations

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

