"""Volume rendering: analytic cases, sampling properties, and the volumetric decoder end to end."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srt.model import volume
from srt.model.decoder import NerfDecoder


def slab_expected(sigma, t0, t1, color):
    """Colour on white and expected depth of a ray through a slab of constant density (continuous)."""
    length = t1 - t0
    transmittance = math.exp(-sigma * length)
    rgb = [c * (1 - transmittance) + transmittance for c in color]
    # Integral of t * sigma * exp(-sigma (t - t0)) over the slab: the (non-normalised) expected depth.
    depth = t0 * (1 - transmittance) + (1 - transmittance * (1 + sigma * length)) / sigma
    return rgb, depth, 1 - transmittance


def test_composite_constant_density_slab():
    sigma, t0, t1, color = 0.8, 1.0, 2.5, (0.2, 0.5, 0.9)
    spacing = 2e-3
    depths = torch.arange(0.0, 4.0, spacing, dtype=torch.float64)
    in_slab = (depths >= t0 - spacing / 2) & (depths < t1 - spacing / 2)
    density = torch.where(in_slab, sigma, 0.0)
    colors = torch.tensor(color, dtype=torch.float64).expand(*depths.shape, 3)
    out = volume.composite(density, colors, depths)
    rgb = volume.over_white(out.rgb, out.alpha)
    expected_rgb, expected_depth, expected_alpha = slab_expected(sigma, t0, t1, color)
    # Transmittance is exact up to the 1e-10 added per sample; depth has the left-endpoint bias (< spacing).
    torch.testing.assert_close(out.alpha, torch.tensor(expected_alpha, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(rgb, torch.tensor(expected_rgb, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(out.depth.item() - expected_depth) < spacing
    assert abs(out.weights.sum().item() - expected_alpha) < 1e-6


def test_composite_opaque_last_sample_and_empty_ray():
    depths = torch.linspace(1.0, 2.0, 5)
    colors = torch.full((5, 3), 0.25)
    empty = volume.composite(torch.zeros(5), colors, depths)
    assert empty.alpha.item() == 0 and torch.equal(volume.over_white(empty.rgb, empty.alpha), torch.ones(3))
    # Any density on the last sample fills the 1e10-long last segment: the ray ends there.
    last = volume.composite(torch.tensor([0.0, 0, 0, 0, 1e-3]), colors, depths)
    assert abs(last.alpha.item() - 1) < 1e-6 and abs(last.depth.item() - 2.0) < 1e-5


def test_stratified_depths_lie_in_their_segments():
    like = torch.zeros(4, 7)
    d = volume.stratified_depths(2.0, 4.0, 16, like)
    assert d.shape == (4, 7, 16)
    segment = torch.div(d - 2.0, 2.0 / 16, rounding_mode='floor')
    assert torch.equal(segment, torch.arange(16.0).expand_as(segment))
    mid = volume.stratified_depths(2.0, 4.0, 4, like, deterministic=True)
    torch.testing.assert_close(mid[0, 0], torch.tensor([2.25, 2.75, 3.25, 3.75]))


def test_sample_pdf_inverts_the_cdf():
    bins = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    uniform = volume.sample_pdf(bins, torch.full((4,), 0.25), 5, deterministic=True)
    torch.testing.assert_close(uniform, torch.linspace(0.0, 4.0, 5), atol=1e-3, rtol=0)  # 1e-5 floor
    torch.manual_seed(0)
    one_bin = volume.sample_pdf(bins.expand(100, 5), torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(100, 4), 32)
    inside = ((one_bin >= 1.0) & (one_bin <= 2.0)).float().mean().item()
    assert inside > 0.99  # the 1e-5 floor on every bin leaves the others a tiny mass


def test_fine_depths_follow_the_coarse_weights():
    coarse = torch.linspace(0.5, 4.0, 8).expand(3, 8)
    weights = torch.zeros(3, 8)
    weights[:, 4] = 1.0  # all mass at coarse sample 4: 75% in the bin before it, 25% in the one after
    torch.manual_seed(0)
    fine = volume.fine_depths(coarse, weights, min_dist=0.0, num_samples=4000)
    before = ((fine >= coarse[0, 3]) & (fine <= coarse[0, 4])).float().mean().item()
    after = ((fine >= coarse[0, 4]) & (fine <= coarse[0, 5])).float().mean().item()
    assert abs(before - 0.75) < 0.03 and abs(after - 0.25) < 0.03


class AnalyticSlab(nn.Module):
    """Radiance field of a slab x in [x0, x1] with constant density and colour, empty elsewhere."""

    def __init__(self, x0, x1, sigma, color):
        super().__init__()
        self.x0, self.x1, self.sigma = x0, x1, sigma
        self.register_buffer('color', torch.tensor(color))

    def forward(self, z, points):
        inside = (points[..., 0] >= self.x0) & (points[..., 0] < self.x1)
        density = torch.where(inside, self.sigma, 0.0)
        return density, self.color.expand(*points.shape[:-1], 3)


def test_nerf_decoder_renders_an_analytic_slab():
    sigma, x0, x1, color = 1.5, 1.2, 2.0, (0.9, 0.1, 0.3)
    decoder = NerfDecoder(num_att_blocks=1)
    decoder.coarse_net = AnalyticSlab(x0, x1, sigma, color)
    camera_pos = torch.zeros(1, 2, 3)
    rays = torch.tensor([[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]])  # through the slab, away from it
    pixels, extras = decoder(None, camera_pos, rays, min_dist=0.0, max_dist=4.0, num_coarse_samples=256,
                             num_fine_samples=128, deterministic=True)
    expected_rgb, expected_depth, _ = slab_expected(sigma, x0, x1, color)
    torch.testing.assert_close(pixels[0, 0], torch.tensor(expected_rgb), atol=0.02, rtol=0)
    torch.testing.assert_close(pixels[0, 1], torch.ones(3), atol=1e-6, rtol=0)  # white background
    assert abs(extras['depth'][0, 0].item() - expected_depth) < 0.02
    assert abs(extras['coarse_depth'][0, 0].item() - expected_depth) < 0.03
    torch.testing.assert_close(extras['coarse_img'][0, 0], torch.tensor(expected_rgb), atol=0.03, rtol=0)


def test_shared_net_reuse_equals_reevaluating_all_samples():
    """Reusing the coarse samples' outputs gives the reference's values and gradients."""
    torch.manual_seed(0)
    decoder = NerfDecoder(num_att_blocks=1, pos_start_octave=-2)
    z = torch.randn(2, 6, 768, requires_grad=True)
    camera_pos = torch.randn(2, 5, 3)
    rays = F.normalize(torch.randn(2, 5, 3), dim=-1)
    kwargs = dict(min_dist=0.5, max_dist=3.0, num_coarse_samples=12, num_fine_samples=6, deterministic=True)
    results = []
    for reuse in (True, False):
        decoder.fine_net = None if reuse else decoder.coarse_net  # the reference's way: evaluate all again
        decoder.zero_grad()
        z.grad = None
        pixels, extras = decoder(z, camera_pos, rays, **kwargs)
        (pixels.sum() + extras['coarse_img'].sum() + extras['depth'].sum()).backward()
        results.append((pixels.detach(), extras['depth'].detach(), z.grad.clone(),
                        [p.grad.clone() for p in decoder.coarse_net.parameters()]))
    (p1, d1, zg1, g1), (p2, d2, zg2, g2) = results
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d1, d2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zg1, zg2, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('num_fine', [0, 1])
def test_nerf_decoder_without_hierarchical_samples(num_fine):
    torch.manual_seed(0)
    decoder = NerfDecoder(num_att_blocks=1)
    rays = F.normalize(torch.randn(1, 3, 3), dim=-1)
    pixels, extras = decoder(torch.randn(1, 4, 768), torch.zeros(1, 3, 3), rays, min_dist=0.1, max_dist=2.0,
                             num_coarse_samples=8, num_fine_samples=num_fine)
    assert pixels.shape == (1, 3, 3) and extras['depth'].shape == (1, 3)
    assert ((pixels >= 0) & (pixels <= 1)).all()
