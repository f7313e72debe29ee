"""Building blocks shared by the SRT encoders and decoders: positional codes, attention, transformers.

Axis vocabulary in shape notes: b batch, v views, h, w image rows/columns, r rays, n tokens, d channels.

Parameter names reproduce the reference implementation's state-dict keys (stelzner/srt), e.g.
``transformer.layers.0.0.norm.weight``, ``transformer.layers.0.0.fn.to_qkv.weight``,
``transformer.layers.0.1.fn.net.3.bias``: a checkpoint trained there loads here with ``strict=True``.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

AttentionImpl = Literal['auto', 'sdpa', 'explicit']
ATTENTION_IMPLS = ('auto', 'sdpa', 'explicit')
# 'auto' attends explicitly on the CPU up to this many query-key pairs (per head), SDPA above.
CPU_EXPLICIT_MAX_PAIRS = 2 ** 20


def positional_encoding(coords: Tensor, num_octaves: int, start_octave: int = 0) -> Tensor:
    """Sine/cosine code of coordinates at octaves ``start_octave .. start_octave + num_octaves - 1``.

    Multipliers are ``2**o * pi``. The layout is the reference's: all sines, then all cosines, each
    coordinate-major (x at every octave, then y, then z).

    Args:
        coords: [..., c] coordinates (c = 3 for points and directions).
    Returns:
        [..., c * num_octaves * 2]

    >>> positional_encoding(torch.zeros(2, 3), num_octaves=4).shape
    torch.Size([2, 24])
    """
    octaves = torch.arange(start_octave, start_octave + num_octaves, device=coords.device,
                           dtype=coords.dtype)
    multipliers = torch.pow(2.0, octaves) * math.pi  # [o]; exact powers of two times pi
    scaled = coords.unsqueeze(-1) * multipliers  # [..., c, o]
    # [..., 2, c, o] -> [..., 2 * c * o]: sines then cosines, each coordinate-major. (Stacking, rather
    # than concatenating flattened halves, compiles to a vectorised kernel: 4x faster on the CPU.)
    return torch.stack((torch.sin(scaled), torch.cos(scaled)), dim=-3).flatten(-3)


class PositionalEncoding(nn.Module):
    """Module form of :func:`positional_encoding` (no parameters): [..., 3] -> [..., 6 * num_octaves]."""

    def __init__(self, num_octaves: int = 8, start_octave: int = 0) -> None:
        super().__init__()
        self.num_octaves = num_octaves
        self.start_octave = start_octave

    @property
    def out_dim(self) -> int:
        return 3 * 2 * self.num_octaves

    def forward(self, coords: Tensor) -> Tensor:
        return positional_encoding(coords, self.num_octaves, self.start_octave)

    def extra_repr(self) -> str:
        return f'num_octaves={self.num_octaves}, start_octave={self.start_octave}'


class RayEncoder(nn.Module):
    """Code of a ray: [code of the camera position, code of the unit direction].

    With the SRT settings (15 octaves each, directions from octave 0) the code has 90 + 90 = 180 values.
    """

    def __init__(self, pos_octaves: int = 15, pos_start_octave: int = 0, ray_octaves: int = 15,
                 ray_start_octave: int = 0) -> None:
        super().__init__()
        self.pos_encoding = PositionalEncoding(pos_octaves, pos_start_octave)
        self.ray_encoding = PositionalEncoding(ray_octaves, ray_start_octave)

    @property
    def out_dim(self) -> int:
        return self.pos_encoding.out_dim + self.ray_encoding.out_dim

    def forward(self, camera_pos: Tensor, rays: Tensor) -> Tensor:
        """camera_pos [..., 3], rays [..., 3] (same leading shape) -> [..., 180]."""
        return torch.cat((self.pos_encoding(camera_pos), self.ray_encoding(rays)), dim=-1)


class PreNorm(nn.Module):
    """``fn(LayerNorm(x), **kwargs)``; the norm is only applied to the first argument."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(self.norm(x), **kwargs)


class FeedForward(nn.Module):
    """Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout, as ``net.0`` .. ``net.4``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head attention; self-attention (``to_qkv``) or cross-attention (``to_q`` on x, ``to_kv`` on z).

    ``impl`` picks the kernel; all compute the same function:

    - ``'sdpa'``: ``F.scaled_dot_product_attention`` (fused; never holds the [n_q, n_kv] matrix).
    - ``'explicit'``: ``softmax(q k^T / sqrt(d_head)) v`` with two matmuls and the softmax in fp32;
      for fp32 inputs exactly the reference's computation.
    - ``'auto'``: ``'sdpa'``, except on the CPU for short attention (n_q * n_kv <= 2**20, e.g. the
      encoder's 320 tokens), where PyTorch's CPU flash-attention kernels are up to 2x slower than the
      explicit form. (The fp32 softmax also keeps torch.compile from rewriting it into SDPA.)
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 selfatt: bool = True, kv_dim: Optional[int] = None, impl: AttentionImpl = 'auto') -> None:
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f'attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}')
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.impl = impl
        self.selfatt = selfatt
        if selfatt:
            self.to_qkv = nn.Linear(dim, 3 * inner_dim, bias=False)
        else:
            self.to_q = nn.Linear(dim, inner_dim, bias=False)
            self.to_kv = nn.Linear(kv_dim if kv_dim is not None else dim, 2 * inner_dim, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = (nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out
                       else nn.Identity())

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [b, heads, n, d_head]

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """x [b, n, dim] (queries), z [b, m, kv_dim] (keys/values; cross-attention only) -> [b, n, dim]."""
        if self.selfatt:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            assert z is not None, 'cross-attention needs z'
            q = self.to_q(x)
            k, v = self.to_kv(z).chunk(2, dim=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        impl = self.impl
        if impl == 'auto':  # static: decided from device and shapes while tracing
            cpu_short = q.device.type == 'cpu' and q.shape[-2] * k.shape[-2] <= CPU_EXPLICIT_MAX_PAIRS
            impl = 'explicit' if cpu_short else 'sdpa'
        if impl == 'sdpa':
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [b, heads, n, m]
            attn = torch.softmax(scores, dim=-1, dtype=torch.float32)
            out = torch.matmul(attn.to(v.dtype), v)  # [b, heads, n, d_head]
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))

    def extra_repr(self) -> str:
        return f'heads={self.heads}, dim_head={self.dim_head}, impl={self.impl!r}'


class Transformer(nn.Module):
    """Stack of pre-norm blocks ``x += attn(norm(x), z); x += ff(norm(x))`` without a final norm.

    ``layers.i.0`` is the attention sub-block, ``layers.i.1`` the feed-forward one (reference names).
    With ``checkpointing`` set, each block's activations are recomputed in backward (less memory).
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 dropout: float = 0.0, selfatt: bool = True, kv_dim: Optional[int] = None,
                 impl: AttentionImpl = 'auto', checkpointing: bool = False) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PreNorm(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout,
                                       selfatt=selfatt, kv_dim=kv_dim, impl=impl)),
                PreNorm(dim, FeedForward(dim, mlp_dim, dropout=dropout)),
            ]) for _ in range(depth)])

    @staticmethod
    def _block(attn: nn.Module, ff: nn.Module, x: Tensor, z: Optional[Tensor]) -> Tensor:
        x = attn(x, z=z) + x
        return ff(x) + x

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """x [b, n, dim], z [b, m, kv_dim] or None (self-attention) -> [b, n, dim]."""
        for attn, ff in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._block, attn, ff, x, z, use_reentrant=False)
            else:
                x = self._block(attn, ff, x, z)
        return x


def set_attention_impl(module: nn.Module, impl: AttentionImpl) -> None:
    """Switch every :class:`Attention` below ``module`` to ``impl`` ('auto', 'sdpa' or 'explicit')."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f'attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}')
    for m in module.modules():
        if isinstance(m, Attention):
            m.impl = impl


def set_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of every :class:`Transformer` block below ``module`` on or off."""
    for m in module.modules():
        if isinstance(m, Transformer):
            m.checkpointing = enabled
