"""OSRT: parity with the reference (stelzner/osrt) under deterministic weights, its checkpoint layout,
slot attention's symmetries, gradients, and the reference configs in runs/."""
import functools
import zlib

import numpy as np
import pytest
import torch
import yaml

from srt import checkpoint as ckpt_lib
from srt import config as run_config
from srt.model.layers import Transformer
from srt.model import ModelConfig, build_model, count_parameters
from srt.model.osrt import MixingBlock, reference_init_
from srt.model.slots import SlotAttention
from srt.model.rendering import render_image
from tests.conftest import ROOT, TESTVECTORS, read_key_list

KEYS_FILE = ROOT / 'tests' / 'data' / 'reference_osrt_state_dict_keys.txt'
# Where the reference's runs/<dataset>/osrt/config.yaml live here (its msn set is MSN-Hard).
RUNS = {'msn/osrt': 'msn_hard', 'clevr3d/osrt': 'clevr3d', 'obsurf_msn/osrt': 'obsurf_msn'}
SIX = {'pos_start_octave': -5, 'num_slots': 6}
EXTRA_CONFIGS = {  # the key list's other configs
    'spatial_broadcast': {'encoder': 'osrt', 'encoder_kwargs': SIX, 'decoder': 'spatial_broadcast'},
    'layer_norm': {'encoder': 'osrt', 'encoder_kwargs': SIX, 'decoder': 'slot_mixer',
                   'decoder_kwargs': {'layer_norm': True}},
}
# osrt_variants_nmr.npz: options no shipped config sets.
VARIANTS = {'encoder': 'osrt', 'encoder_kwargs': {'pos_start_octave': -5, 'num_slots': 4, 'slot_iters': 3},
            'decoder': 'slot_mixer',
            'decoder_kwargs': {'pos_start_octave': -5, 'num_att_blocks': 1, 'layer_norm': True}}


def run_yaml(config: str) -> dict:
    return yaml.safe_load((ROOT / 'runs' / RUNS[config] / 'osrt' / 'config.yaml').read_text())


def model_section(config: str) -> dict:
    return run_yaml(config)['model'] if config in RUNS else EXTRA_CONFIGS[config]


@functools.lru_cache(maxsize=None)
def reference_keys():
    """{config: {'encoder'|'decoder': {key: shape}}, config + ' counts': (encoder, total)}."""
    keys, counts = read_key_list(KEYS_FILE)
    return {**keys, **{f'{config} counts': n for config, n in counts.items()}}

def deterministic_weights(part: str, state_dict: dict) -> dict:
    """The OSRT test vectors' weights (tests/data/testvectors/README.md, section model/, OSRT)."""
    out = {}
    for key, tensor in state_dict.items():
        name = f'{part}.{key}'
        u = np.random.default_rng(zlib.crc32(name.encode())).random(tensor.numel()) * 2 - 1
        if key.endswith('.weight') and key.split('.')[-2].startswith('norm'):  # LayerNorm gains
            value = 1 + 0.1 * u
        elif key.endswith('initial_slots'):
            value = u * np.sqrt(3)
        elif tensor.dim() >= 2 and 'embedding' not in name:
            value = u * np.sqrt(3 / np.prod(tensor.shape[1:]))
        else:
            value = 0.1 * u
        out[key] = torch.from_numpy(value.reshape(tuple(tensor.shape)).astype(np.float32))
    return out


def with_weights(module: torch.nn.Module, part: str) -> torch.nn.Module:
    """``module`` (built on the meta device: PyTorch's random init of 83M weights is skipped) on the
    CPU with the deterministic weights of checkpoint part ``part``."""
    module.to_empty(device='cpu')
    module.load_state_dict(deterministic_weights(part, module.state_dict()), strict=True)
    return module


def weighted_model(section: dict):
    """The model of ``section`` with deterministic weights, in eval mode, explicit attention (the
    reference's)."""
    with torch.device('meta'):
        model = build_model(section, attention='explicit')
    for part in ('encoder', 'decoder'):
        with_weights(getattr(model, part), part)
    return model.eval()


@functools.lru_cache(maxsize=None)
def variants_model():
    return weighted_model(VARIANTS)


def meta_decoder(name: str) -> torch.nn.Module:
    with torch.device('meta'):
        return build_model({**VARIANTS, 'decoder': name, 'decoder_kwargs': {'pos_start_octave': -5}}).decoder


def inputs(data):
    return [torch.from_numpy(data[k]) for k in ('input_images', 'input_camera_pos', 'input_rays')]


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - torch.as_tensor(b)).abs().max().item()


@pytest.mark.parametrize('config', sorted(RUNS) + sorted(EXTRA_CONFIGS))
def test_state_dict_is_the_reference_format(config):
    keys = reference_keys()
    with torch.device('meta'):
        model = build_model(model_section(config))
    for part in ('encoder', 'decoder'):
        ours = {k: tuple(v.shape) for k, v in getattr(model, part).state_dict().items()}
        assert ours == keys[config][part]
    assert (count_parameters(model.encoder), count_parameters(model)) == keys[config + ' counts']


def test_reference_layout_state_dict_loads_strictly():
    shapes = reference_keys()['clevr3d/osrt']
    with torch.device('meta'):
        model = build_model(model_section('clevr3d/osrt'))
    model.to_empty(device='cpu')
    state = {part: {k: torch.full(shape, 0.5) for k, shape in shapes[part].items()} for part in shapes}
    ckpt_lib.load_model_state(model, state)  # strict
    assert all((p == 0.5).all() for p in model.parameters())
    state['encoder']['slot_attention.initial_slots'] = torch.zeros(7, 1536)  # a 7-slot checkpoint
    with pytest.raises(ckpt_lib.CheckpointError, match='initial_slots'):
        ckpt_lib.load_model_state(model, state)


@pytest.mark.parametrize('name, config', [('msn', 'msn/osrt'), ('clevr3d', 'clevr3d/osrt')])
def test_matches_reference_outputs(name, config):
    data = np.load(TESTVECTORS / 'model' / f'osrt_{name}.npz')
    model = weighted_model(model_section(config))
    rays = [torch.from_numpy(data[k]) for k in ('target_camera_pos', 'target_rays')]
    with torch.no_grad():
        set_latents = model.encoder.srt_encoder(*inputs(data))
        slots = model.encoder.slot_attention(set_latents)  # (the whole encoder: the variants' test)
        pixels, extras = model.decoder(slots, *rays)
    assert tuple(set_latents.shape) == tuple(data['set_latents_shape'])
    assert max_diff(set_latents[:, :64], data['set_latents_first64']) <= 1e-4
    assert abs(set_latents.std().item() - float(data['set_latents_std'])) <= 1e-4
    assert max_diff(slots, data['slots']) <= 1e-4
    assert max_diff(pixels, data['pixels']) <= 2e-5
    assert set(extras) == {'segmentation'}
    assert max_diff(extras['segmentation'], data['segmentation']) <= 2e-5
    torch.testing.assert_close(extras['segmentation'].sum(-1), torch.ones(pixels.shape[:2]))


def test_variants_match_reference_outputs():
    """3 slot iterations, mixing-block layer norms, a 1-layer allocation transformer, and the
    spatial-broadcast decoder on the same slots."""
    data = np.load(TESTVECTORS / 'model' / 'osrt_variants_nmr.npz')
    model = variants_model()
    broadcast = with_weights(meta_decoder('spatial_broadcast'), 'decoder').eval()
    rays = [torch.from_numpy(data[k]) for k in ('target_camera_pos', 'target_rays')]
    with torch.no_grad():
        slots = model.encoder(*inputs(data))
        outputs = {'slot_mixer': model.decoder(slots, *rays), 'spatial_broadcast': broadcast(slots, *rays)}
    assert max_diff(slots, data['slots']) <= 1e-4
    for name, (pixels, extras) in outputs.items():
        assert max_diff(pixels, data[f'pixels_{name}']) <= 2e-5
        assert max_diff(extras['segmentation'], data[f'segmentation_{name}']) <= 2e-5


def test_slot_attention_symmetries():
    torch.manual_seed(0)
    attention = SlotAttention(num_slots=5, input_dim=12, slot_dim=16, hidden_dim=20, iters=3)
    tokens = torch.randn(2, 30, 12)
    with torch.no_grad():
        slots = attention(tokens)
        assert slots.shape == (2, 5, 16)
        # The tokens are a set: their order does not matter.
        torch.testing.assert_close(attention(tokens[:, torch.randperm(30)]), slots, atol=1e-5, rtol=1e-5)
        # The slots are exchangeable: permuting the initial slots permutes the result.
        order = torch.tensor([3, 0, 4, 1, 2])
        attention.initial_slots.copy_(attention.initial_slots[order])
        torch.testing.assert_close(attention(tokens), slots[:, order], atol=1e-5, rtol=1e-5)


def test_every_parameter_receives_a_gradient():
    with torch.device('meta'):  # 2 slot iterations: the GRU's hidden-state path is used too
        model = build_model({'encoder': 'osrt', 'encoder_kwargs': {'num_slots': 3, 'slot_iters': 2},
                             'decoder': 'slot_mixer'})
    encoder, mixer = with_weights(model.encoder, 'encoder'), with_weights(model.decoder, 'decoder')
    broadcast = with_weights(meta_decoder('spatial_broadcast'), 'decoder')
    g = torch.Generator().manual_seed(0)
    rays = torch.nn.functional.normalize(torch.randn(1, 1, 16, 16, 3, generator=g), dim=-1)
    target = torch.nn.functional.normalize(torch.randn(1, 6, 3, generator=g), dim=-1)
    slots = encoder(torch.rand(1, 1, 3, 16, 16, generator=g), torch.randn(1, 1, 3, generator=g), rays)
    loss = 0
    for decoder in (mixer, broadcast):
        pixels, extras = decoder(slots, torch.randn(1, 6, 3, generator=g), target)
        assert pixels.shape == (1, 6, 3) and extras['segmentation'].shape == (1, 6, 3)
        loss = loss + pixels.square().mean() + extras['segmentation'][..., 0].mean()
    loss.backward()
    for module in (encoder, mixer, broadcast):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rendered_images_carry_per_pixel_slot_weights():
    model = variants_model()
    data = np.load(TESTVECTORS / 'model' / 'osrt_variants_nmr.npz')
    images, positions, rays = inputs(data)
    with torch.no_grad():
        slots = model.encoder(images, positions, rays)
        image, extras = render_image(model, slots, positions[:, 0], rays[:, 0, :6, :5], chunk=7)
    assert image.shape == (1, 6, 5, 3) and extras['segmentation'].shape == (1, 6, 5, 4)


def test_reference_init_follows_the_layer_kinds():
    torch.manual_seed(0)
    parts = torch.nn.ModuleDict({
        'slots': SlotAttention(num_slots=3, input_dim=96, slot_dim=128, hidden_dim=160),
        'transformer': Transformer(64, depth=1, heads=2, dim_head=32, mlp_dim=192, selfatt=False, kv_dim=128),
        'mixing': MixingBlock(input_dim=64, slot_dim=128, att_dim=128)})
    for p in parts.parameters():
        torch.nn.init.constant_(p, 7.0)
    reference_init_(parts)
    attn, ff = parts['transformer'].layers[0][0].fn, parts['transformer'].layers[0][1].fn
    for jax in (parts['slots'].to_k, parts['slots'].mlp[0], attn.to_q, attn.to_kv, attn.to_out[0]):
        std = (1 / jax.weight.shape[1]) ** 0.5  # normal truncated at 2 std: std * 0.88 after truncation
        assert jax.weight.abs().max() <= 2 * std and 0.8 * std < jax.weight.std() < 0.95 * std
    assert (attn.to_out[0].bias == 0).all() and (parts['slots'].mlp[0].bias == 0).all()
    for xavier in (ff.net[0], ff.net[3], parts['mixing'].to_q, parts['mixing'].to_k):
        bound = (6 / sum(xavier.weight.shape)) ** 0.5
        assert xavier.weight.abs().max() <= bound and xavier.weight.abs().max() > 0.9 * bound
    assert 0 < ff.net[0].bias.abs().max() < 1e-5  # ViT biases: N(0, 1e-6^2)
    # LayerNorms, the GRU and the initial slots are not linear layers: left as they were.
    assert (parts['slots'].gru.weight_ih == 7).all() and (parts['slots'].norm_input.weight == 7).all()
    assert (parts['slots'].initial_slots == 7).all()


@pytest.mark.parametrize('config', sorted(RUNS))
def test_reference_configs_are_accepted_unchanged(config):
    raw = run_yaml(config)
    assert run_config.REFERENCE_CONFIGS[f'{RUNS[config]}/osrt'] == raw
    cfg = run_config.build(raw)
    assert (cfg.model.encoder, cfg.model.decoder) == ('osrt', 'slot_mixer')
    assert cfg.model.encoder_kwargs['num_slots'] == reference_keys()[config]['encoder'][
        'slot_attention.initial_slots'][0]
    assert run_config.model_name(cfg.model) == 'osrt'
    assert cfg.data.dataset == RUNS[config]  # 'osrt' (the reference's name for MSN-Hard) -> msn_hard
    assert cfg.data.canonical_view is False  # OSRT's loaders use world coordinates
    assert run_config.reference_config(RUNS[config], 'osrt')['model'] == raw['model']


def test_osrt_config_errors_name_the_option():
    with pytest.raises(ValueError, match='model.decoder.*osrt encoder pairs with'):
        ModelConfig(encoder='osrt')  # the default light-field decoder cannot read slots
    with pytest.raises(ValueError, match='model.decoder.*osrt encoder pairs with'):
        ModelConfig(encoder='isrt', decoder='slot_mixer')
    with pytest.raises(ValueError, match='model.encoder_kwargs.slot_dim'):
        ModelConfig(encoder='osrt', encoder_kwargs={'slot_dim': 768}, decoder='slot_mixer')
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_heads'\]"):
        ModelConfig(encoder='osrt', decoder='slot_mixer', decoder_kwargs={'num_heads': 2})
    with pytest.raises(ValueError, match='randomize_initial_slots'):
        build_model({'encoder': 'osrt', 'encoder_kwargs': {'randomize_initial_slots': True},
                     'decoder': 'slot_mixer'})
    with pytest.raises(ValueError, match='multiple of 12'):
        ModelConfig(encoder='osrt', encoder_kwargs={'slot_dim': 100}, decoder='slot_mixer',
                    decoder_kwargs={'slot_dim': 100})


@pytest.mark.parametrize('decoder', ['slot_mixer', 'spatial_broadcast'])
def test_small_sizes_of_ours(decoder):
    """Our size options (for CPU runs): a narrower model with the same structure and key names."""
    small = {'encoder': 'osrt', 'encoder_kwargs': {'num_slots': 3, 'slot_dim': 48, 'num_att_blocks': 1,
                                                   'num_conv_blocks': 2},
             'decoder': decoder, 'decoder_kwargs': {'slot_dim': 48, 'hidden_dim': 32}}
    model = build_model(small)
    with torch.device('meta'):
        full = build_model({**small, 'encoder_kwargs': {'num_slots': 3}, 'decoder_kwargs': {}})
    for part in ('encoder', 'decoder'):
        keys = set(getattr(model, part).state_dict())
        assert keys <= set(getattr(full, part).state_dict())  # fewer layers, same names
    assert model.decoder.render_mlp.state_dict()[
        'net.0.weight' if decoder == 'slot_mixer' else '0.weight'].shape == (32, 48 + 180)
    assert count_parameters(model) < count_parameters(full) / 10
    from tests.conftest import tiny_batch
    x = tiny_batch(b=2, v=2, h=16, w=16, r=7)
    pixels, extras = model(**x)
    assert pixels.shape == (2, 7, 3) and extras['segmentation'].shape == (2, 7, 3)
