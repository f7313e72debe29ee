"""torch.compile of the whole training computation: one graph (no breaks), same values as eager."""
import torch

from srt.model import build_model
from tests.conftest import tiny_batch

# Reference layer widths, fewest layers: compiles in well under a minute on 2 cores.
TINY_ENCODER = {'num_conv_blocks': 1, 'num_att_blocks': 1, 'pos_start_octave': -5}
NERF_KWARGS = dict(min_dist=0.5, max_dist=4.0, num_coarse_samples=6, num_fine_samples=3)


def _loss_and_grads(model, fn, batch, target, **kwargs):
    model.zero_grad(set_to_none=True)
    pixels, extras = fn(batch, **kwargs)
    loss = (pixels - target).square().mean()
    if 'coarse_img' in extras:
        loss = loss + (extras['coarse_img'] - target).square().mean()
    loss.backward()
    return pixels.detach(), {k: v.detach() for k, v in extras.items()}, \
        {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_compiled_matches_eager(section, **kwargs):
    torch.manual_seed(0)
    model = build_model(section)
    batch = tiny_batch(b=2, v=2, h=8, w=8, r=4)
    target = torch.rand(2, 4, 3)

    def forward(batch, **kw):
        return model(**batch, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True)  # fullgraph: a graph break is an error
    eager = _loss_and_grads(model, forward, batch, target, **kwargs)
    got = _loss_and_grads(model, compiled, batch, target, **kwargs)
    torch.testing.assert_close(got[0], eager[0], atol=1e-5, rtol=1e-4)
    assert got[1].keys() == eager[1].keys()
    for key in eager[1]:
        torch.testing.assert_close(got[1][key], eager[1][key], atol=1e-4, rtol=1e-4)
    for name, grad in eager[2].items():
        torch.testing.assert_close(got[2][name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_compiled_lightfield_model_matches_eager():
    _check_compiled_matches_eager({'encoder_kwargs': TINY_ENCODER, 'decoder': 'lightfield',
                                   'decoder_kwargs': {'num_att_blocks': 1, 'pos_start_octave': -5}})


def test_compiled_volumetric_model_matches_eager():
    """Stratified and hierarchical sampling keep static shapes: no graph breaks, no host syncs."""
    _check_compiled_matches_eager({'encoder_kwargs': TINY_ENCODER, 'decoder': 'nerf',
                                   'decoder_kwargs': {'num_att_blocks': 1}},
                                  deterministic=True, **NERF_KWARGS)


def test_compiled_random_sampling_and_bf16_autocast():
    torch.manual_seed(0)
    model = build_model({'encoder_kwargs': TINY_ENCODER, 'decoder': 'nerf',
                         'decoder_kwargs': {'num_att_blocks': 1}})
    batch = tiny_batch(b=1, v=1, h=8, w=8, r=4)

    def forward(batch):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return model(**batch, **NERF_KWARGS)

    torch._dynamo.reset()
    pixels, extras = torch.compile(forward, fullgraph=True)(batch)
    pixels.float().sum().backward()
    assert pixels.shape == (1, 4, 3) and torch.isfinite(pixels).all()
    assert all(p.grad is not None for p in model.parameters())
