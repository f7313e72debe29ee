"""SRT decoders: (scene latents, query rays) -> pixel colours.

Axis vocabulary: b batch, r rays, s samples along a ray, n latent tokens, d channels.

Every decoder is called as ``decoder(z, camera_pos, rays, **render_kwargs) -> (pixels, extras)`` with
z [b, n, 768], camera_pos [b, r, 3], rays [b, r, 3] (unit directions) and pixels [b, r, 3]. The
light-field decoders ignore render kwargs; the volumetric one takes ``min_dist``, ``max_dist``,
``num_coarse_samples``, ``num_fine_samples`` and ``deterministic`` and returns extras ``depth``,
``coarse_img`` and ``coarse_depth``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from srt.model import volume
from srt.model.layers import AttentionImpl, PositionalEncoding, RayEncoder, Transformer

LATENT_DIM = 768
Extras = Dict[str, Tensor]


class RayPredictor(nn.Module):
    """Ray code (180) [-> input MLP 180-360-180] -> cross-attention into the latents [-> MLP to out_dims].

    The transformer is 180 wide with 12 heads x (z_dim / 12) and MLP width 2 * z_dim; queries are
    normed before attending, latents are not.
    """

    def __init__(self, num_att_blocks: int = 2, pos_start_octave: int = 0, out_dims: int = 3,
                 z_dim: int = LATENT_DIM, input_mlp: bool = False, output_mlp: bool = True,
                 attention: AttentionImpl = 'auto', checkpointing: bool = False,
                 pos_octaves: int = 15, ray_octaves: int = 15) -> None:
        super().__init__()
        self.query_encoder = RayEncoder(pos_octaves=pos_octaves, pos_start_octave=pos_start_octave,
                                        ray_octaves=ray_octaves)
        dim = self.query_encoder.out_dim  # 180 with 15 + 15 octaves
        self.input_mlp = (nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
                          if input_mlp else None)
        self.transformer = Transformer(dim, depth=num_att_blocks, heads=12, dim_head=z_dim // 12,
                                       mlp_dim=2 * z_dim, selfatt=False, kv_dim=z_dim, impl=attention,
                                       checkpointing=checkpointing)
        self.output_mlp = (nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, out_dims))
                           if output_mlp else None)

    def forward(self, z: Tensor, camera_pos: Tensor, rays: Tensor) -> Tensor:
        """z [b, n, z_dim], camera_pos [b, r, 3], rays [b, r, 3] -> [b, r, out_dims or 180]."""
        x = self.query_encoder(camera_pos, rays)
        if self.input_mlp is not None:
            x = self.input_mlp(x)
        x = self.transformer(x, z)
        if self.output_mlp is not None:
            x = self.output_mlp(x)
        return x


class SRTDecoder(nn.Module):
    """The SRT light-field decoder (``decoder: lightfield``): RayPredictor with a sigmoid on the colour.

    Ours, for small CPU models (defaults: the reference's): ``latent_dim`` (the encoder's token width,
    a multiple of 12), ``pos_octaves`` / ``ray_octaves`` (octaves of the query's ray code).
    """

    def __init__(self, num_att_blocks: int = 2, pos_start_octave: int = 0, attention: AttentionImpl = 'auto',
                 checkpointing: bool = False, latent_dim: int = LATENT_DIM, pos_octaves: int = 15,
                 ray_octaves: int = 15) -> None:
        super().__init__()
        if latent_dim % 12:
            raise ValueError(f'latent_dim must be a multiple of 12 (12 heads), got {latent_dim}')
        self.ray_predictor = RayPredictor(num_att_blocks, pos_start_octave, out_dims=3, z_dim=latent_dim,
                                          input_mlp=False, output_mlp=True, attention=attention,
                                          checkpointing=checkpointing, pos_octaves=pos_octaves,
                                          ray_octaves=ray_octaves)

    def forward(self, z: Tensor, camera_pos: Tensor, rays: Tensor, **render_kwargs) -> Tuple[Tensor, Extras]:
        return torch.sigmoid(self.ray_predictor(z, camera_pos, rays)), {}


class ImprovedSRTDecoder(nn.Module):
    """The improved SRT decoder (``decoder: isrt``, OSRT appendix A.4): input MLP on the query, the
    cross-attention layers, then a 4-hidden-layer 1536-wide ReLU render MLP to RGB (no sigmoid)."""

    def __init__(self, num_att_blocks: int = 2, pos_start_octave: int = 0, attention: AttentionImpl = 'auto',
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.allocation_transformer = RayPredictor(num_att_blocks, pos_start_octave, z_dim=LATENT_DIM,
                                                   input_mlp=True, output_mlp=False, attention=attention,
                                                   checkpointing=checkpointing)
        width = 1536
        layers = [nn.Linear(self.allocation_transformer.query_encoder.out_dim, width), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 3))
        self.render_mlp = nn.Sequential(*layers)

    def forward(self, z: Tensor, camera_pos: Tensor, rays: Tensor, **render_kwargs) -> Tuple[Tensor, Extras]:
        return self.render_mlp(self.allocation_transformer(z, camera_pos, rays)), {}


class NerfNet(nn.Module):
    """Transformer-conditioned radiance field: the code of a 3D point (15 octaves, 90 values)
    cross-attends into the latents (kv width 768), then density and colour heads."""

    def __init__(self, num_att_blocks: int = 2, pos_start_octave: int = 0, z_dim: int = LATENT_DIM,
                 attention: AttentionImpl = 'auto', checkpointing: bool = False) -> None:
        super().__init__()
        self.pos_encoder = PositionalEncoding(num_octaves=15, start_octave=pos_start_octave)
        dim = self.pos_encoder.out_dim  # 90
        # The reference omits kv_dim here and so cannot be built; the latents are z_dim wide.
        self.transformer = Transformer(dim, depth=num_att_blocks, heads=12, dim_head=64, mlp_dim=1536,
                                       selfatt=False, kv_dim=z_dim, impl=attention,
                                       checkpointing=checkpointing)
        self.color_predictor = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 3), nn.Sigmoid())
        self.density_predictor = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 1),
                                               nn.Softplus())

    def forward(self, z: Tensor, points: Tensor) -> Tuple[Tensor, Tensor]:
        """z [b, n, z_dim], points [b, r, s, 3] -> density [b, r, s], colour [b, r, s, 3]."""
        b, r, s, _ = points.shape
        h = self.transformer(self.pos_encoder(points.reshape(b, r * s, 3)), z)
        density = self.density_predictor(h).view(b, r, s)
        color = self.color_predictor(h).view(b, r, s, 3)
        return density, color


class NerfDecoder(nn.Module):
    """Volumetric SRT (``decoder: nerf``): stratified coarse samples, hierarchical fine samples drawn
    from the coarse weights, composited on white.

    With a shared network (``use_fine_net=False``, the default) the fine image is composited from the
    coarse samples' outputs plus the network evaluated at the fine samples only: the same values and
    gradients as re-evaluating all coarse + fine samples (the reference's way), with 40% fewer network
    evaluations at 128 + 64 samples.
    """

    def __init__(self, num_att_blocks: int = 2, pos_start_octave: int = 0, use_fine_net: bool = False,
                 attention: AttentionImpl = 'auto', checkpointing: bool = False) -> None:
        super().__init__()
        kwargs = dict(num_att_blocks=num_att_blocks, pos_start_octave=pos_start_octave, attention=attention,
                      checkpointing=checkpointing)
        self.coarse_net = NerfNet(**kwargs)
        # A separate fine network is registered only when it exists, so the state dict has no duplicates.
        self.fine_net: Optional[NerfNet] = NerfNet(**kwargs) if use_fine_net else None

    def forward(self, z: Tensor, camera_pos: Tensor, rays: Tensor, min_dist: float = 0.035,
                max_dist: float = 35.0, num_coarse_samples: int = 128, num_fine_samples: int = 64,
                deterministic: bool = False) -> Tuple[Tensor, Extras]:
        """
        Args:
            z: [b, n, 768] scene latents.
            camera_pos: [b, r, 3] ray origins; rays: [b, r, 3] unit directions.
            min_dist, max_dist: depth range of the samples (scene units).
            num_coarse_samples: stratified samples per ray; num_fine_samples: hierarchical samples
                (0: coarse image only; 1: one sample at the coarse expected depth).
            deterministic: segment midpoints and evenly spaced quantiles instead of random draws.
        Returns:
            pixels [b, r, 3] and extras: ``depth`` [b, r], ``coarse_img`` [b, r, 3], ``coarse_depth`` [b, r].
        """
        coarse_depths = volume.stratified_depths(min_dist, max_dist, num_coarse_samples, rays[..., 0],
                                                 deterministic=deterministic)  # [b, r, s_c]
        coarse_density, coarse_color = self.coarse_net(
            z, volume.points_along_rays(camera_pos, rays, coarse_depths))
        coarse = volume.composite(coarse_density, coarse_color, coarse_depths)
        coarse_img = volume.over_white(coarse.rgb, coarse.alpha)
        if num_fine_samples < 1:
            return coarse_img, {'depth': coarse.depth}

        if num_fine_samples == 1:
            fine_depths = coarse.depth.detach().unsqueeze(-1)
        else:
            fine_depths = volume.fine_depths(coarse_depths, coarse.weights, min_dist, num_fine_samples,
                                             deterministic=deterministic)  # [b, r, s_f]
        depths, order = torch.sort(torch.cat((coarse_depths, fine_depths), dim=-1), dim=-1)
        if self.fine_net is None:  # shared network: evaluate only the new samples, then merge
            fine_density, fine_color = self.coarse_net(
                z, volume.points_along_rays(camera_pos, rays, fine_depths))
            density = torch.cat((coarse_density, fine_density), dim=-1).gather(-1, order)
            color = torch.cat((coarse_color, fine_color), dim=-2).gather(
                -2, order.unsqueeze(-1).expand(*order.shape, 3))
        else:
            density, color = self.fine_net(z, volume.points_along_rays(camera_pos, rays, depths))
        fine = volume.composite(density, color, depths)
        extras = {'depth': fine.depth, 'coarse_img': coarse_img, 'coarse_depth': coarse.depth}
        return volume.over_white(fine.rgb, fine.alpha), extras
