"""The training objective: the one loss the trainer optimises and ``tools/bench_model.py`` times,
and the guard that notices when it stops being finite."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from srt.distributed import min_over_ranks
from srt.metrics import scorable, segmentation_scores

LOSS_TERMS = ('mse', 'coarse_mse')  # the terms that add up to the loss; the others are scores


def srt_loss(model: nn.Module, x: dict[str, Tensor], render_kwargs: dict[str, Any],
             autocast: Callable[[], ContextManager] = contextlib.nullcontext
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, terms) of one batch, as the reference defines it.

    Args:
        model: an SRT (possibly compiled or DDP-wrapped).
        x: model inputs (``srt.data.to_model_inputs``): input_images [b, v, 3, h, w],
            input_camera_pos [b, v, 3], input_rays [b, v, h, w, 3], target_camera_pos [b, r, 3],
            target_rays [b, r, 3], target_pixels [b, r, 3] in [0, 1].
        render_kwargs: passed to the decoder (``srt.runtime.render_kwargs``).
        autocast: factory of the forward pass's autocast context; the loss itself is fp32.
    Returns:
        loss = mse (the mean over scenes of each scene's pixel MSE) + coarse_mse (the volumetric
        decoder's coarse image, when it has one); terms: the scalar tensors {'mse', 'coarse_mse'},
        and where the decoder segments and ``x`` has ``target_masks`` the scores 'ari' and 'fg_ari'
        of its slot weights (batch means; not part of the loss, as in OSRT's trainer).
    """
    with autocast():
        pred, extras = model(x['input_images'], x['input_camera_pos'], x['input_rays'],
                             x['target_camera_pos'], x['target_rays'], **render_kwargs)
    target = x['target_pixels']
    mse = ((pred.float() - target) ** 2).mean(dim=(1, 2))  # per scene
    terms = {'mse': mse.mean()}
    loss = terms['mse']
    if 'coarse_img' in extras:
        terms['coarse_mse'] = ((extras['coarse_img'].float() - target) ** 2).mean()
        loss = loss + terms['coarse_mse']
    masks = x.get('target_masks')
    if 'segmentation' in extras and masks is not None and scorable(masks, extras['segmentation']):
        with torch.no_grad():
            scores = segmentation_scores(masks, extras['segmentation'].detach().float())
        terms.update({k: v.mean().float() for k, v in scores.items()})
    return loss, terms


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


class FiniteGuard:
    """Notes the first iteration whose loss is not finite (NaN or inf) on the loss's device, so
    that a step costs no host sync; :meth:`first_bad` syncs, agreeing over DDP ranks."""

    NEVER = torch.iinfo(torch.long).max

    def __init__(self, device: torch.device | str) -> None:
        self._first = torch.full((), self.NEVER, dtype=torch.long, device=device)

    def note(self, loss: Tensor, it: int) -> None:
        """Remember ``it`` if ``loss`` is not finite and no earlier iteration was noted."""
        bad = ~torch.isfinite(loss.detach())
        self._first = torch.where(bad & (self._first == self.NEVER), it, self._first)

    def check(self, last_checkpoint: str) -> None:
        """Raise NonFiniteLoss naming the first noted iteration over all ranks and
        ``last_checkpoint`` (a host sync; every rank must call it)."""
        first = int(min_over_ranks(self._first.clone()))
        if first != self.NEVER:
            raise NonFiniteLoss(f'the loss became non-finite (NaN or inf) at iteration {first}; '
                                f'the run stopped without saving. Last checkpoint: '
                                f'{last_checkpoint}. Resume from it with a lower --lr (or check '
                                'the data).')
