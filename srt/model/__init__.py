"""The SRT model family: layers, encoders, decoders, volume rendering, weight init, chunked
rendering. Imports nothing from ``pipeline``: a model is tensors in, tensors out.

``SRT``, ``ModelConfig``, ``build_model`` and ``count_parameters`` live in ``srt.model.core``.
"""
from srt.model.core import SRT, ModelConfig, build_model, count_parameters

__all__ = ['SRT', 'ModelConfig', 'build_model', 'count_parameters']
