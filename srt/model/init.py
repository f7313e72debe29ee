"""Initialisation of a fresh model.

PyTorch's default convolution init (kaiming_uniform with a = sqrt(5), the reference's) scales the
second moment of activations by ~1/6 per conv + ReLU layer, so after the SRT encoder's conv stack the
image signal is ~1e-3 of the learned pixel/camera embeddings: at the start of training the latents
barely depend on the input views (measured on the demo data, 3 conv blocks: the spread of the
latents across scenes is 7e-4 of their scale; with He init 0.37). The reference trains long enough to
grow out of it; a short run does not. The same holds for the input: the colour channels are 3 of
183 input channels beside the ray code, so images move the latents ~15x less than cameras do at
init. ``he`` initialises the encoder's convolutions for ReLU (variance 2 / fan_in, zero bias) and
scales the first convolution's colour weights by sqrt(180 / 3) to balance the two input groups;
``torch`` keeps PyTorch's defaults. Checkpoints are unaffected.

``reference`` (the default) is what each model's reference implementation does by default: PyTorch's
defaults for the SRT models (stelzner/srt builds plain ``nn.Linear`` layers), and for OSRT
(stelzner/osrt, whose ``use_default_init`` is False unless a config sets it) the JAX/ViT-style
initialisation of its linear layers, :func:`srt.model.osrt.reference_init_`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from srt.model.core import SRT, ModelConfig
from srt.model.osrt import reference_init_

INIT_SCHEMES = ('reference', 'torch', 'he')


def init_weights(model: SRT, scheme: str) -> SRT:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f'init scheme {scheme!r} is not one of {INIT_SCHEMES}')
    if scheme == 'reference':
        return reference_init_(model) if model.config.encoder == 'osrt' else model
    if scheme == 'he':
        for module in model.encoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # The 3 colour channels are 3 of the first conv's 183 inputs (the other 180 are the ray
        # code): balance the two groups, or the latents hardly depend on the images.
        first = model.encoder.conv_blocks[0].layers[0]
        with torch.no_grad():
            first.weight[:, :3] *= math.sqrt((first.weight.shape[1] - 3) / 3)
    return model


def make_model(config: ModelConfig, seed: int, scheme: str) -> SRT:
    """The model a run starts from: seeded construction, then ``scheme`` (trainer and demo agree)."""
    torch.manual_seed(seed)
    return init_weights(SRT(config), scheme)
