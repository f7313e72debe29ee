"""OSRT (Sajjadi et al., NeurIPS 2022) as the public PyTorch implementation builds it (stelzner/osrt).

Axis vocabulary: b batch, v views, r rays, n set-latent tokens, s slots, d channels.

- ``encoder: osrt`` (:class:`OSRTEncoder`): the improved SRT encoder (``srt_encoder``: 3 conv
  blocks, 5 transformer layers) turns the input views into set latents [b, n, 768]; Slot Attention
  (``slot_attention``) turns those into ``num_slots`` slot latents [b, s, 1536].
- ``decoder: slot_mixer`` (:class:`SlotMixerDecoder`): per query ray, the allocation transformer (the
  improved SRT decoder's ray code -> input MLP -> cross-attention into the slots) gives a query; the
  mixing block turns its dot products with the slots into per-ray slot weights (softmax over slots,
  an unsupervised segmentation) and mixes the slots with them; the render MLP maps [mixed slot, query]
  to RGB.
- ``decoder: spatial_broadcast`` (:class:`SpatialBroadcastDecoder`): every slot is decoded
  independently with the ray code into RGB and a logit; the softmax of the logits over the slots mixes
  the colours.

The reference's sizes are fixed (inner encoder 3 conv blocks and 5 transformer layers, 1536-d slots
and render MLPs); ``num_conv_blocks``/``num_att_blocks`` (encoder) and ``slot_dim``/``hidden_dim``
(decoders) are our options for small CPU models, their defaults the reference's.

Both decoders are called as ``decoder(slots, camera_pos, rays) -> (pixels [b, r, 3], extras)`` with
``extras['segmentation']`` the per-ray slot weights [b, r, s] (they sum to 1 over the slots).
Parameter names are the reference's state-dict keys, so its checkpoints load with ``strict=True``.
The blocks (ray code, attention, transformer, the improved SRT encoder) are the SRT family's own.
"""
from __future__ import annotations

from typing import Dict, Tuple

import math

import torch
from torch import Tensor, nn

from srt.model.decoder import RayPredictor
from srt.model.encoder import ImprovedSRTEncoder
from srt.model.layers import Attention, AttentionImpl, FeedForward, RayEncoder
from srt.model.slots import SlotAttention

SET_LATENT_DIM = 768  # the improved SRT encoder's token width
SLOT_DIM = 1536  # the reference's slot width (its decoders are built for this width only)
RENDER_HIDDEN = 1536
Extras = Dict[str, Tensor]


class OSRTEncoder(nn.Module):
    """Input views -> slot latents [b, num_slots, slot_dim] (``encoder: osrt``).

    ``slot_iters`` rounds of Slot Attention (the reference's default is 1). ``randomize_initial_slots``
    is accepted for the reference's config spelling but only False works there (its sampling path reads
    an attribute that is never set), so True is refused. ``num_conv_blocks`` / ``num_att_blocks`` size
    the inner SRT encoder (ours, for small CPU models; the reference's are fixed at 3 and 5).
    """

    def __init__(self, pos_start_octave: int = 0, num_slots: int = 6, slot_dim: int = SLOT_DIM,
                 slot_iters: int = 1, randomize_initial_slots: bool = False, num_conv_blocks: int = 3,
                 num_att_blocks: int = 5, attention: AttentionImpl = 'auto', checkpointing: bool = False,
                 fold_camera_code: bool = True) -> None:
        super().__init__()
        if randomize_initial_slots:
            raise ValueError('model.encoder_kwargs.randomize_initial_slots: True is not supported (the '
                             "reference's sampling path cannot run: it never defines the slots' stdev); "
                             'use False')
        self.srt_encoder = ImprovedSRTEncoder(num_conv_blocks=num_conv_blocks,
                                              num_att_blocks=num_att_blocks,
                                              pos_start_octave=pos_start_octave, attention=attention,
                                              checkpointing=checkpointing, fold_camera_code=fold_camera_code)
        self.slot_attention = SlotAttention(num_slots, input_dim=SET_LATENT_DIM, slot_dim=slot_dim,
                                            iters=slot_iters)

    @property
    def conv_blocks(self) -> nn.Sequential:
        """The CNN of the inner SRT encoder (what weight-init schemes adjust)."""
        return self.srt_encoder.conv_blocks

    def forward(self, images: Tensor, camera_pos: Tensor, rays: Tensor) -> Tensor:
        """images [b, v, 3, h, w] in [0, 1], camera_pos [b, v, 3], rays [b, v, h, w, 3] -> [b, s, slot_dim]."""
        return self.slot_attention(self.srt_encoder(images, camera_pos, rays))


class MixingBlock(nn.Module):
    """Per-ray slot weights from query-slot dot products, and the slots mixed with them.

    ``to_q`` [att_dim, input_dim] and ``to_k`` [att_dim, slot_dim] without bias; with ``layer_norm``
    the query is normed before ``to_q`` (``norm1``) and the mixed slot after mixing (``norm2``).
    """

    def __init__(self, input_dim: int = 180, slot_dim: int = SLOT_DIM, att_dim: int = SLOT_DIM,
                 layer_norm: bool = False) -> None:
        super().__init__()
        self.to_q = nn.Linear(input_dim, att_dim, bias=False)
        self.to_k = nn.Linear(slot_dim, att_dim, bias=False)
        self.layer_norm = layer_norm
        if layer_norm:
            self.norm1 = nn.LayerNorm(input_dim)
            self.norm2 = nn.LayerNorm(slot_dim)
        self.scale = att_dim ** -0.5

    def forward(self, x: Tensor, slots: Tensor) -> Tuple[Tensor, Tensor]:
        """x [b, r, input_dim] queries, slots [b, s, slot_dim] -> mixed slots [b, r, slot_dim], weights [b, r, s]."""
        if self.layer_norm:
            x = self.norm1(x)
        q, k = self.to_q(x), self.to_k(slots)
        weights = (torch.matmul(q, k.transpose(1, 2)) * self.scale).softmax(dim=-1)  # [b, r, s]
        mixed = torch.matmul(weights, slots)  # [b, r, slot_dim]
        if self.layer_norm:
            mixed = self.norm2(mixed)
        return mixed, weights


def _render_layers(input_dim: int, out_dims: int, hidden: int = RENDER_HIDDEN) -> list:
    """Linear(input_dim, hidden) -> LeakyReLU -> 3 x (Linear(hidden, hidden) -> LeakyReLU) ->
    Linear(hidden, out_dims)."""
    layers = [nn.Linear(input_dim, hidden), nn.LeakyReLU()]
    for _ in range(3):
        layers += [nn.Linear(hidden, hidden), nn.LeakyReLU()]
    layers.append(nn.Linear(hidden, out_dims))
    return layers


class RenderMLP(nn.Module):
    """[..., input_dim] -> RGB in (0, 1): ``net.0`` .. ``net.8`` linear layers with leaky ReLUs, then a sigmoid."""

    def __init__(self, input_dim: int = SLOT_DIM + 180, hidden_dim: int = RENDER_HIDDEN) -> None:
        super().__init__()
        self.net = nn.Sequential(*_render_layers(input_dim, 3, hidden_dim), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SlotMixerDecoder(nn.Module):
    """The Slot Mixer decoder (``decoder: slot_mixer``). ``slot_dim`` (the encoder's) and the render
    MLP's ``hidden_dim`` are ours, for small CPU models (the reference's are fixed at 1536)."""

    def __init__(self, num_att_blocks: int = 2, pos_start_octave: int = 0, layer_norm: bool = False,
                 slot_dim: int = SLOT_DIM, hidden_dim: int = RENDER_HIDDEN,
                 attention: AttentionImpl = 'auto', checkpointing: bool = False) -> None:
        super().__init__()
        self.allocation_transformer = RayPredictor(num_att_blocks, pos_start_octave, z_dim=slot_dim,
                                                   input_mlp=True, output_mlp=False, attention=attention,
                                                   checkpointing=checkpointing)
        query_dim = self.allocation_transformer.query_encoder.out_dim  # 180
        self.mixing_block = MixingBlock(input_dim=query_dim, slot_dim=slot_dim, att_dim=slot_dim,
                                        layer_norm=layer_norm)
        self.render_mlp = RenderMLP(slot_dim + query_dim, hidden_dim)

    def forward(self, slots: Tensor, camera_pos: Tensor, rays: Tensor, **render_kwargs) -> Tuple[Tensor, Extras]:
        """slots [b, s, slot_dim], camera_pos [b, r, 3], rays [b, r, 3] -> pixels [b, r, 3],
        {'segmentation': [b, r, s]}."""
        allocation = self.allocation_transformer
        queries = allocation.input_mlp(allocation.query_encoder(camera_pos, rays))  # [b, r, 180]
        x = allocation.transformer(queries, slots)  # [b, r, 180]
        mixed, weights = self.mixing_block(x, slots)
        # The render MLP sees the query before attention (the reference's RayPredictor returns it).
        pixels = self.render_mlp(torch.cat((mixed, queries), dim=-1))
        return pixels, {'segmentation': weights}


class SpatialBroadcastDecoder(nn.Module):
    """Each slot decoded on its own (``decoder: spatial_broadcast``): [ray code, slot] -> (logit, RGB);
    pixels are the slots' colours mixed by the softmax of the logits over the slots."""

    def __init__(self, pos_start_octave: int = 0, slot_dim: int = SLOT_DIM,
                 hidden_dim: int = RENDER_HIDDEN, attention: AttentionImpl = 'auto',
                 checkpointing: bool = False) -> None:
        super().__init__()  # attention/checkpointing: no attention here; accepted like every decoder
        self.query_encoder = RayEncoder(pos_octaves=15, pos_start_octave=pos_start_octave, ray_octaves=15)
        self.render_mlp = nn.Sequential(*_render_layers(self.query_encoder.out_dim + slot_dim, 4,
                                                        hidden_dim))

    def forward(self, slots: Tensor, camera_pos: Tensor, rays: Tensor, **render_kwargs) -> Tuple[Tensor, Extras]:
        """slots [b, s, slot_dim], camera_pos [b, r, 3], rays [b, r, 3] -> pixels [b, r, 3],
        {'segmentation': [b, r, s]}."""
        b, s, d = slots.shape
        r = rays.shape[1]
        queries = self.query_encoder(camera_pos, rays)  # [b, r, 180]
        per_slot = torch.cat((queries.unsqueeze(2).expand(b, r, s, queries.shape[-1]),
                              slots.unsqueeze(1).expand(b, r, s, d)), dim=-1)  # [b, r, s, 1716]
        out = self.render_mlp(per_slot)  # [b, r, s, 4]: logit, RGB
        weights = out[..., 0].softmax(dim=2)  # [b, r, s]
        pixels = (torch.sigmoid(out[..., 1:]) * weights.unsqueeze(-1)).sum(dim=2)
        return pixels, {'segmentation': weights}


SLOT_DECODERS = ('slot_mixer', 'spatial_broadcast')


@torch.no_grad()
def reference_init_(model: nn.Module) -> nn.Module:
    """Initialise the linear layers of an OSRT model as the reference does by default
    (``use_default_init: False``; stelzner/osrt ``osrt/layers.py`` JaxLinear / ViTLinear / SRTLinear).

    - attention projections and Slot Attention's linears ("JaxLinear"): weights from a normal with
      std sqrt(1 / fan_in) truncated at 2 std, zero biases;
    - transformer feed-forward layers ("ViTLinear"): Xavier-uniform weights, biases N(0, 1e-6^2);
    - every other linear layer, the decoders' MLPs ("SRTLinear"): Xavier-uniform weights, zero biases.

    Convolutions, LayerNorms, the GRU cell and ``initial_slots`` (standard normal) keep PyTorch's
    defaults, as there. Returns ``model``.
    """
    kinds = {}
    for module in model.modules():
        kind = ('jax' if isinstance(module, (Attention, SlotAttention)) else
                'vit' if isinstance(module, FeedForward) else None)
        if kind is not None:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    kinds.setdefault(sub, kind)
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        kind = kinds.get(module, 'srt')
        if kind == 'jax':
            std = math.sqrt(1 / module.weight.shape[1])
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        else:
            nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            if kind == 'vit':
                nn.init.normal_(module.bias, std=1e-6)
            else:
                nn.init.zeros_(module.bias)
    return model
