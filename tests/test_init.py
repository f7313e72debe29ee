"""Initialisation schemes of a fresh model (srt/model/init.py)."""
import pytest
import torch

from srt.model.init import make_model
from srt.model import SRT, ModelConfig
from srt.model.osrt import reference_init_

SMALL = dict(encoder_kwargs={'num_conv_blocks': 2, 'num_att_blocks': 1},
             decoder_kwargs={'num_att_blocks': 1})


def latent_spread(model, seed=0):
    """Spread of the latents across 4 random scenes (same cameras), relative to their scale."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 1, 3, 32, 32, generator=g)
    pos = torch.zeros(1, 1, 3).expand(4, 1, 3)
    rays = torch.nn.functional.normalize(torch.randn(1, 1, 32, 32, 3, generator=g), dim=-1)
    with torch.no_grad():
        z = model.encoder(images, pos, rays.expand(4, -1, -1, -1, -1))
    return (z.std(0).mean() / z.std()).item()


@pytest.mark.parametrize('encoder', ['srt', 'isrt'])
def test_he_init_makes_latents_depend_on_the_images(encoder):
    config = ModelConfig.from_dict({'encoder': encoder, 'decoder': 'lightfield', **SMALL})
    torch_init, he = make_model(config, 0, 'torch'), make_model(config, 0, 'he')
    assert latent_spread(he) > 10 * latent_spread(torch_init)
    # The scheme touches only the encoder's convolutions: the rest is the seeded construction.
    convs = {f'encoder.{m}.{p}' for m, module in he.encoder.named_modules()
             if isinstance(module, torch.nn.Conv2d) for p in ('weight', 'bias')}
    assert convs
    for (name, a), (_, b) in zip(torch_init.state_dict().items(), he.state_dict().items()):
        if name not in convs:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_make_model_is_seeded_and_rejects_unknown_schemes():
    config = ModelConfig.from_dict({'encoder': 'srt', 'decoder': 'lightfield', **SMALL})
    a, b = make_model(config, 3, 'he').state_dict(), make_model(config, 3, 'he').state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match='init scheme'):
        make_model(config, 0, 'xavier')


def test_reference_scheme_is_each_reference_default():
    """'reference': PyTorch's init for SRT (stelzner/srt), reference_init_ for OSRT (stelzner/osrt's
    default, use_default_init False)."""
    srt = ModelConfig.from_dict({'encoder': 'srt', 'decoder': 'lightfield', **SMALL})
    a, b = make_model(srt, 1, 'reference').state_dict(), make_model(srt, 1, 'torch').state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    osrt = ModelConfig.from_dict({'encoder': 'osrt', 'decoder': 'slot_mixer',
                                  'encoder_kwargs': {'num_slots': 2, 'slot_dim': 24, 'num_att_blocks': 1},
                                  'decoder_kwargs': {'slot_dim': 24, 'hidden_dim': 16}})
    ours = make_model(osrt, 1, 'reference')
    torch.manual_seed(1)  # make_model's seeding, then the reference's init of the linear layers
    want = reference_init_(SRT(osrt)).state_dict()
    assert all(torch.equal(want[k], v) for k, v in ours.state_dict().items())
    mlp = ours.decoder.render_mlp.net[0]
    assert (mlp.bias == 0).all()  # SRTLinear: zero biases (PyTorch's default would not be)
    bound = (6 / sum(mlp.weight.shape)) ** 0.5  # Xavier-uniform
    assert mlp.weight.abs().max() <= bound
    assert not (make_model(osrt, 1, 'torch').decoder.render_mlp.net[0].bias == 0).all()
