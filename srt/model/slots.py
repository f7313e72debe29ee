"""Slot Attention (Locatello et al. 2020) as OSRT's encoder uses it (stelzner/osrt ``SlotAttention``).

Axis vocabulary: b batch, n input tokens, s slots, d channels.

Slots start from a learned ``initial_slots`` [s, d] (shared by every scene, no sampling) and compete
for the input tokens: the attention softmax runs over the *slots*; each slot's update is the weighted
mean of the values over the tokens; a GRU cell and a residual MLP refine the slots. Parameter names are
the reference's state-dict keys: ``initial_slots``, ``to_q``/``to_k``/``to_v`` (no bias), ``gru``
(``nn.GRUCell``), ``mlp.0``/``mlp.2``, ``norm_input``, ``norm_slots``, ``norm_pre_mlp``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SlotAttention(nn.Module):
    """[b, n, input_dim] set latents -> [b, num_slots, slot_dim] slot latents.

    ``iters`` rounds of: q = to_q(norm_slots(slots)); attn = softmax_slots(q k^T / sqrt(slot_dim)) + eps,
    renormalised over the tokens; slots = GRU(attn v, slots); slots += mlp(norm_pre_mlp(slots)).
    """

    def __init__(self, num_slots: int, input_dim: int = 768, slot_dim: int = 1536, hidden_dim: int = 3072,
                 iters: int = 3, eps: float = 1e-8) -> None:
        super().__init__()
        if num_slots < 1 or iters < 1:
            raise ValueError(f'slot attention needs num_slots >= 1 and iters >= 1, got {num_slots}, {iters}')
        self.num_slots = num_slots
        self.slot_dim = slot_dim
        self.iters = iters
        self.eps = eps
        self.scale = slot_dim ** -0.5
        self.initial_slots = nn.Parameter(torch.randn(num_slots, slot_dim))
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_k = nn.Linear(input_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(input_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, slot_dim))
        self.norm_input = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_pre_mlp = nn.LayerNorm(slot_dim)

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs [b, n, input_dim] -> slots [b, num_slots, slot_dim]."""
        b = inputs.shape[0]
        inputs = self.norm_input(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)  # [b, n, d]
        slots = self.initial_slots.unsqueeze(0).expand(b, -1, -1)
        for _ in range(self.iters):
            q = self.to_q(self.norm_slots(slots))  # [b, s, d]
            dots = torch.matmul(q, k.transpose(1, 2)) * self.scale  # [b, s, n]
            # Slots compete for each token (softmax over slots); eps keeps unclaimed slots defined.
            attn = dots.softmax(dim=1) + self.eps
            attn = attn / attn.sum(dim=-1, keepdim=True)  # weighted mean over the tokens
            updates = torch.matmul(attn, v)  # [b, s, d]
            slots = self.gru(updates.flatten(0, 1), slots.flatten(0, 1)).view(b, self.num_slots, self.slot_dim)
            slots = slots + self.mlp(self.norm_pre_mlp(slots))
        return slots

    def extra_repr(self) -> str:
        return f'num_slots={self.num_slots}, slot_dim={self.slot_dim}, iters={self.iters}'
