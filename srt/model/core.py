"""The SRT model family: configuration and the encoder + decoder pair.

Build from the ``model`` section of a reference-style YAML config::

    config = ModelConfig.from_dict(yaml.safe_load(open('runs/msn/srt/config.yaml'))['model'])
    model = SRT(config)
    z = model.encoder(input_images, input_camera_pos, input_rays)          # [b, n, 768]
    pixels, extras = model.decoder(z, target_camera_pos, target_rays, **render_kwargs)

``model.encoder.state_dict()`` and ``model.decoder.state_dict()`` are the reference checkpoint's
``encoder`` and ``decoder`` entries (same names and shapes for the ``srt`` and ``isrt`` configs).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

from torch import Tensor, nn

from srt.model.decoder import ImprovedSRTDecoder, NerfDecoder, SRTDecoder
from srt.model.encoder import LATENT_DIM, ImprovedSRTEncoder, SRTEncoder
from srt.model.layers import ATTENTION_IMPLS, set_attention_impl, set_checkpointing
from srt.model.osrt import (SLOT_DECODERS, SLOT_DIM, OSRTEncoder, SlotMixerDecoder,
                            SpatialBroadcastDecoder)

ENCODERS = {'srt': SRTEncoder, 'isrt': ImprovedSRTEncoder, 'osrt': OSRTEncoder}
DECODERS = {'lightfield': SRTDecoder, 'isrt': ImprovedSRTDecoder, 'nerf': NerfDecoder,
            'slot_mixer': SlotMixerDecoder, 'spatial_broadcast': SpatialBroadcastDecoder}
# Constructor arguments that are run-time options of ours, not architecture kwargs of the YAML.
_RUNTIME_ARGS = ('attention', 'checkpointing', 'fold_camera_code')


def _architecture_kwargs(cls: type) -> Tuple[str, ...]:
    params = inspect.signature(cls.__init__).parameters
    return tuple(p for p in params if p != 'self' and p not in _RUNTIME_ARGS)


@dataclass
class ModelConfig:
    """Which encoder/decoder to build and with which options (the YAML ``model`` section + ours)."""

    # 'srt' (SRT, CVPR 2022), 'isrt' (improved SRT, OSRT appendix) or 'osrt' (isrt + Slot Attention)
    encoder: str = 'srt'
    # Encoder options: pos_start_octave, num_conv_blocks, num_att_blocks (srt also scale_embeddings;
    # isrt also ours: latent_dim, conv_dim, pos_octaves, ray_octaves; osrt: pos_start_octave,
    # num_slots, slot_dim, slot_iters; ours num_conv_blocks, num_att_blocks).
    encoder_kwargs: Dict[str, Any] = field(default_factory=dict)
    # 'lightfield', 'isrt', 'nerf' (volumetric); for osrt 'slot_mixer' or 'spatial_broadcast'
    decoder: str = 'lightfield'
    # Decoder options: pos_start_octave, num_att_blocks (nerf also use_fine_net, slot_mixer layer_norm;
    # lightfield also ours: latent_dim, pos_octaves, ray_octaves; the slot decoders' slot_dim and
    # hidden_dim are ours, for small models).
    decoder_kwargs: Dict[str, Any] = field(default_factory=dict)
    # 'sdpa' (fused kernel), 'explicit' (softmax(QK^T / sqrt(d)) V, the reference's) or 'auto' (sdpa;
    # explicit for short attention on the CPU, where it is faster). Same function, same weights.
    attention: str = 'auto'
    checkpointing: bool = False  # recompute transformer blocks' activations in backward (saves memory)
    # Skip convolving the constant camera-position planes (exact; False: all 183 planes, the reference's way).
    fold_camera_code: bool = True

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f'model.encoder: unknown encoder {self.encoder!r}; '
                             f'choose one of {sorted(ENCODERS)}')
        if self.decoder not in DECODERS:
            raise ValueError(f'model.decoder: unknown decoder {self.decoder!r}; '
                             f'choose one of {sorted(DECODERS)}')
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f'model.attention: unknown attention {self.attention!r}; choose one of '
                             f'{list(ATTENTION_IMPLS)}')
        for section, cls, kwargs in (('encoder_kwargs', ENCODERS[self.encoder], self.encoder_kwargs),
                                     ('decoder_kwargs', DECODERS[self.decoder], self.decoder_kwargs)):
            allowed = _architecture_kwargs(cls)
            unknown = sorted(set(kwargs) - set(allowed))
            if unknown:
                raise ValueError(f'model.{section}: unknown option(s) {unknown} for {cls.__name__}; '
                                 f'allowed: {list(allowed)}')
        if self.encoder != 'osrt':  # latent_dim: ours, for the small demo model (default 768)
            widths = [kw.get('latent_dim', LATENT_DIM) for kw in (self.encoder_kwargs,
                                                                  self.decoder_kwargs)]
            if widths[0] != widths[1]:
                raise ValueError(f'model.encoder_kwargs.latent_dim ({widths[0]}) and '
                                 f'model.decoder_kwargs.latent_dim ({widths[1]}) must be equal (the '
                                 f'{self.decoder} decoder reads the encoder\'s latents)')
        # Slot latents [b, s, 1536] fit the slot decoders only, and those fit nothing else.
        if (self.encoder == 'osrt') != (self.decoder in SLOT_DECODERS):
            raise ValueError(f'model.decoder: {self.decoder!r} does not fit encoder {self.encoder!r}; the osrt '
                             f'encoder pairs with {list(SLOT_DECODERS)} and only with them')
        enc_dim = self.encoder_kwargs.get('slot_dim', SLOT_DIM)
        if self.encoder == 'osrt' and enc_dim != self.decoder_kwargs.get('slot_dim', SLOT_DIM):
            raise ValueError(f'model.encoder_kwargs.slot_dim {enc_dim} differs from the decoder\'s '
                             f'(model.decoder_kwargs.slot_dim, default {SLOT_DIM}, the reference\'s); '
                             'set both')
        if self.encoder == 'osrt' and enc_dim % 12:
            raise ValueError(f'model.encoder_kwargs.slot_dim {enc_dim}: must be a multiple of 12 (the '
                             "decoder's 12 attention heads split it)")

    @classmethod
    def from_dict(cls, model_section: Mapping[str, Any], **overrides: Any) -> 'ModelConfig':
        """From a YAML ``model`` section (missing keys take the defaults, unknown keys are rejected)."""
        values = {**dict(model_section or {}), **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f'model: unknown key(s) {unknown}; allowed: {sorted(names)}')
        for key in ('encoder_kwargs', 'decoder_kwargs'):
            if values.get(key) is None:
                values[key] = {}
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class SRT(nn.Module):
    """Scene Representation Transformer: ``encoder`` (views -> latents) and ``decoder`` (rays -> pixels)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ENCODERS[config.encoder](**config.encoder_kwargs, attention=config.attention,
                                                checkpointing=config.checkpointing,
                                                fold_camera_code=config.fold_camera_code)
        self.decoder = DECODERS[config.decoder](**config.decoder_kwargs, attention=config.attention,
                                                checkpointing=config.checkpointing)

    def forward(self, input_images: Tensor, input_camera_pos: Tensor, input_rays: Tensor,
                target_camera_pos: Tensor, target_rays: Tensor,
                **render_kwargs: Any) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Encode the input views and render the target rays.

        Args:
            input_images: [b, v, 3, h, w] in [0, 1]; input_camera_pos: [b, v, 3]; input_rays: [b, v, h, w, 3].
            target_camera_pos: [b, r, 3]; target_rays: [b, r, 3].
            render_kwargs: passed to the decoder (min_dist, max_dist, ... for the volumetric decoder).
        Returns:
            pixels [b, r, 3] and the decoder's extras.
        """
        z = self.encoder(input_images, input_camera_pos, input_rays)
        return self.decoder(z, target_camera_pos, target_rays, **render_kwargs)

    def set_attention(self, impl: str) -> None:
        """Switch all attention layers to 'auto', 'sdpa' or 'explicit' (same weights, same function)."""
        set_attention_impl(self, impl)
        self.config = dataclasses.replace(self.config, attention=impl)

    def set_checkpointing(self, enabled: bool) -> None:
        """Turn activation checkpointing of the transformer blocks on or off."""
        set_checkpointing(self, enabled)
        self.config = dataclasses.replace(self.config, checkpointing=enabled)


def build_model(model_section: Mapping[str, Any], **overrides: Any) -> SRT:
    """``SRT(ModelConfig.from_dict(model_section, **overrides))``."""
    return SRT(ModelConfig.from_dict(model_section, **overrides))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
