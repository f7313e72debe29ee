"""SRT encoders: input views -> set of scene latent tokens.

Axis vocabulary: b batch, v views, h, w image rows/columns, n tokens, d channels.

Both encoders run a CNN over each view's image concatenated with the 180-channel ray code (183
channels), turn each cell of the final feature grid into a 768-d patch token and feed the tokens of all
views to a pre-norm transformer (768 wide, 12 heads x 64, MLP 1536, no final norm).

Speed: the 90 camera-position channels of the ray code are constant over a view's pixels, so the first
3x3 convolution's response to them is, at each pixel, the sum over the taps that fall inside the image
of ``(weights of those channels at that tap) . (position code)``. :func:`conv3x3_constant_channels`
computes that exactly (zero padding included) instead of convolving 90 constant planes, which removes
about half of the encoder's most expensive convolution.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srt.model.layers import AttentionImpl, RayEncoder, Transformer

LATENT_DIM = 768


def tap_coverage(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[size, 3] mask of which taps of a 3-tap, zero-padded (padding 1), stride-1 filter see the image.

    Row y uses tap 0 (offset -1) unless y == 0 and tap 2 (offset +1) unless y == size - 1.
    """
    pos = torch.arange(size, device=device)
    return torch.stack((pos > 0, torch.ones_like(pos, dtype=torch.bool), pos < size - 1), dim=-1).to(dtype)


def conv3x3_constant_channels(x: Tensor, weight_var: Tensor, weight_const: Tensor, const: Tensor) -> Tensor:
    """3x3 convolution (stride 1, padding 1, no bias) of an input whose last channels are constant planes.

    Equal to ``conv2d(cat([x, const broadcast over h, w], 1), cat([weight_var, weight_const], 1))``
    up to float rounding, at the cost of a convolution over ``x`` only.

    Args:
        x: [b, c_var, h, w] varying channels.
        weight_var: [d, c_var, 3, 3]
        weight_const: [d, c_const, 3, 3]
        const: [b, c_const] value of each constant channel.
    Returns:
        [b, d, h, w] (channels-last strides when ``x`` has them).
    """
    h, w = x.shape[-2:]
    out = F.conv2d(x, weight_var, padding=1)
    per_tap = torch.einsum('dcyx,bc->bdyx', weight_const, const)  # [b, d, 3, 3]
    rows = tap_coverage(h, x.device, per_tap.dtype)
    cols = tap_coverage(w, x.device, per_tap.dtype)
    # Response at (i, j) = sum of per_tap over the taps inside the image.
    const_out = torch.einsum('iy,bdyx,jx->bijd', rows, per_tap, cols)  # [b, h, w, d]
    return out + const_out.permute(0, 3, 1, 2)


class SRTConvBlock(nn.Module):
    """conv3x3 (stride 1) -> ReLU -> conv3x3 (stride 2) -> ReLU, no biases, as ``layers.0`` / ``layers.2``.

    [b, idim, h, w] -> [b, odim, ceil(h / 2), ceil(w / 2)]; hdim defaults to idim, odim to 2 * hdim.
    """

    def __init__(self, idim: int, hdim: Optional[int] = None, odim: Optional[int] = None) -> None:
        super().__init__()
        hdim = idim if hdim is None else hdim
        odim = 2 * hdim if odim is None else odim
        self.layers = nn.Sequential(
            nn.Conv2d(idim, hdim, kernel_size=3, stride=1, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(hdim, odim, kernel_size=3, stride=2, padding=1, bias=False), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def forward_constant_channels(self, x: Tensor, const: Tensor, const_start: int) -> Tensor:
        """Same as ``forward(x')`` where x' inserts ``const.shape[1]`` constant planes at channel
        ``const_start`` of ``x``: x [b, c_var, h, w], const [b, c_const]."""
        weight = self.layers[0].weight
        c_const = const.shape[1]
        weight_var = torch.cat((weight[:, :const_start], weight[:, const_start + c_const:]), dim=1)
        weight_const = weight[:, const_start:const_start + c_const]
        x = torch.relu(conv3x3_constant_channels(x, weight_var, weight_const, const))
        return self.layers[3](self.layers[2](x))


class _PatchTransformerEncoder(nn.Module):
    """Shared trunk: ray code + CNN per view -> patch tokens -> (subclass hook) -> transformer."""

    def __init__(self, num_conv_blocks: int, num_att_blocks: int, pos_start_octave: int,
                 attention: AttentionImpl = 'auto', checkpointing: bool = False,
                 fold_camera_code: bool = True, latent_dim: int = LATENT_DIM,
                 conv_dim: int = 96, pos_octaves: int = 15, ray_octaves: int = 15) -> None:
        super().__init__()
        if latent_dim % 64:
            raise ValueError(f'latent_dim must be a multiple of 64 (heads of 64), got {latent_dim}')
        if num_conv_blocks < 1:
            raise ValueError(f'num_conv_blocks must be >= 1, got {num_conv_blocks}')
        # Skip convolving the constant camera-position planes (exact, see the module docstring).
        self.fold_camera_code = fold_camera_code
        self.channels_last = True  # memory format of the CNN's activations (a speed option only)
        self.ray_encoder = RayEncoder(pos_octaves=pos_octaves, pos_start_octave=pos_start_octave,
                                      ray_octaves=ray_octaves)
        in_dim = 3 + self.ray_encoder.out_dim  # RGB and the ray code (183 with 15 + 15 octaves)
        blocks = [SRTConvBlock(idim=in_dim, hdim=conv_dim)]
        dim = 2 * conv_dim
        for _ in range(1, num_conv_blocks):
            blocks.append(SRTConvBlock(idim=dim))
            dim *= 2
        self.conv_blocks = nn.Sequential(*blocks)
        self.per_patch_linear = nn.Conv2d(dim, latent_dim, kernel_size=1)
        self.transformer = Transformer(latent_dim, depth=num_att_blocks, heads=latent_dim // 64,
                                       dim_head=64, mlp_dim=2 * latent_dim, selfatt=True,
                                       impl=attention, checkpointing=checkpointing)

    def patch_features(self, images: Tensor, camera_pos: Tensor, rays: Tensor) -> Tensor:
        """Per-view CNN features.

        Args:
            images: [b, 3, h, w] in [0, 1]; camera_pos: [b, 3]; rays: [b, h, w, 3].
        Returns:
            [b, 768, h', w'] with h' = h / 2**num_conv_blocks (rounded up per block).
        """
        pos_code = self.ray_encoder.pos_encoding(camera_pos)  # [b, 90]
        dir_code = self.ray_encoder.ray_encoding(rays)  # [b, h, w, 90]
        if self.fold_camera_code:
            # [b, h, w, 93] channels-last: RGB and direction code; the position code is folded.
            x = torch.cat((images.permute(0, 2, 3, 1), dir_code), dim=-1).permute(0, 3, 1, 2)
            x = self.conv_blocks[0].forward_constant_channels(x.contiguous(memory_format=self._format()),
                                                              pos_code, const_start=3)
        else:  # the reference's way: all 183 planes through the first convolution
            b, h, w, _ = rays.shape
            pos_planes = pos_code[:, :, None, None].expand(b, pos_code.shape[1], h, w)
            x = torch.cat((images, pos_planes, dir_code.permute(0, 3, 1, 2)), dim=1)
            x = self.conv_blocks[0](x.contiguous(memory_format=self._format()))
        for block in self.conv_blocks[1:]:
            x = block(x)
        return self.per_patch_linear(x)

    def _format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def add_pixel_embedding(self, x: Tensor) -> Tensor:
        """Hook on the feature grid [b * v, 768, h', w'] (nothing here)."""
        return x

    def add_embeddings(self, x: Tensor) -> Tensor:
        """Hook on the patch tokens [b, v, n_view, 768] (nothing here)."""
        return x

    def forward(self, images: Tensor, camera_pos: Tensor, rays: Tensor) -> Tensor:
        """
        Args:
            images: [b, v, 3, h, w] in [0, 1]; view 0 is the canonical view.
            camera_pos: [b, v, 3]
            rays: [b, v, h, w, 3] unit directions.
        Returns:
            latents [b, v * h' * w', 768], tokens ordered view-major, then row-major over the patch grid.
        """
        b, v = images.shape[:2]
        x = self.patch_features(images.flatten(0, 1), camera_pos.flatten(0, 1), rays.flatten(0, 1))
        x = self.add_pixel_embedding(x)
        x = x.flatten(2, 3).transpose(1, 2)  # [b * v, n_view, 768]
        x = self.add_embeddings(x.unflatten(0, (b, v)))  # [b, v, n_view, 768]
        return self.transformer(x.flatten(1, 2))


class SRTEncoder(_PatchTransformerEncoder):
    """The SRT encoder (CVPR 2022 as built by the reference): 4 conv blocks, learned pixel embedding
    (1, 768, 15, 20) cropped to the patch grid, canonical / non-canonical camera embeddings, 10
    transformer layers."""

    def __init__(self, num_conv_blocks: int = 4, num_att_blocks: int = 10, pos_start_octave: int = 0,
                 scale_embeddings: bool = False, attention: AttentionImpl = 'auto',
                 checkpointing: bool = False, fold_camera_code: bool = True) -> None:
        super().__init__(num_conv_blocks, num_att_blocks, pos_start_octave, attention, checkpointing,
                         fold_camera_code)
        std = 1.0 / math.sqrt(LATENT_DIM) if scale_embeddings else 1.0
        self.pixel_embedding = nn.Parameter(torch.randn(1, LATENT_DIM, 15, 20) * std)
        self.canonical_camera_embedding = nn.Parameter(torch.randn(1, 1, LATENT_DIM) * std)
        self.non_canonical_camera_embedding = nn.Parameter(torch.randn(1, 1, LATENT_DIM) * std)

    def add_pixel_embedding(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        grid_h, grid_w = self.pixel_embedding.shape[-2:]
        if h > grid_h or w > grid_w:
            raise ValueError(f'patch grid {h}x{w} exceeds the pixel embedding ({grid_h}x{grid_w}); '
                             'use smaller images or more conv blocks')
        return x + self.pixel_embedding[:, :, :h, :w]

    def add_embeddings(self, x: Tensor) -> Tensor:
        b, v = x.shape[:2]
        camera_embedding = torch.cat(  # [b, v, 768]: canonical for view 0, non-canonical for the rest
            (self.canonical_camera_embedding.expand(b, 1, -1),
             self.non_canonical_camera_embedding.expand(b, v - 1, -1)), dim=1)
        return x + camera_embedding[:, :, None, :]


class ImprovedSRTEncoder(_PatchTransformerEncoder):
    """The improved SRT encoder (OSRT appendix A.4): 3 conv blocks, no pixel or camera embeddings,
    5 transformer layers.

    Ours, for small CPU models (the defaults are the reference's): ``latent_dim`` (token width, a
    multiple of 64: heads of 64, MLP 2x), ``conv_dim`` (width of the first conv block, doubling per
    block), ``pos_octaves`` / ``ray_octaves`` (octaves of the camera-position / ray-direction code).
    """

    def __init__(self, num_conv_blocks: int = 3, num_att_blocks: int = 5, pos_start_octave: int = 0,
                 attention: AttentionImpl = 'auto', checkpointing: bool = False,
                 fold_camera_code: bool = True, latent_dim: int = LATENT_DIM,
                 conv_dim: int = 96, pos_octaves: int = 15, ray_octaves: int = 15) -> None:
        super().__init__(num_conv_blocks, num_att_blocks, pos_start_octave, attention, checkpointing,
                         fold_camera_code, latent_dim, conv_dim, pos_octaves, ray_octaves)
