"""The SRT model family: parity with the reference model's outputs, checkpoint format, shapes, gradients."""
import copy
import functools
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from srt import checkpoint as ckpt_lib
from srt.model.encoder import conv3x3_constant_channels
from srt.model.layers import Attention, positional_encoding
from srt.model import SRT, ModelConfig, build_model, count_parameters
from srt.model.rendering import render_image, render_rays
from tests.conftest import ROOT, TESTVECTORS, read_key_list, tiny_batch

KEYS_FILE = ROOT / 'tests' / 'data' / 'reference_state_dict_keys.txt'
# The model sections of runs/msn/srt and runs/msn/isrt.
CONFIGS = {
    'srt': {'encoder_kwargs': {'pos_start_octave': -5}, 'decoder': 'lightfield',
            'decoder_kwargs': {'pos_start_octave': -5}},
    'isrt': {'encoder': 'isrt', 'encoder_kwargs': {'pos_start_octave': -5}, 'decoder': 'isrt',
             'decoder_kwargs': {'pos_start_octave': -5}},
}
PARAMETER_COUNTS = {'srt': (69_885_600, 73_932_563), 'isrt': (29_514_912, 41_033_583)}


@functools.lru_cache(maxsize=None)
def reference_keys():
    """{config: {'encoder'|'decoder': {key: shape}}} from the reference key list."""
    return read_key_list(KEYS_FILE)[0]

def deterministic_weights(part: str, state_dict: dict) -> dict:
    """The test vectors' weight formula (tests/data/testvectors/README.md, section model/)."""
    out = {}
    for key, tensor in state_dict.items():
        name = f'{part}.{key}'
        u = np.random.default_rng(zlib.crc32(name.encode())).random(tensor.numel()) * 2 - 1
        if key.endswith('norm.weight'):
            value = 1 + 0.1 * u
        elif tensor.dim() >= 2 and 'embedding' not in name:
            value = u * np.sqrt(3 / np.prod(tensor.shape[1:]))
        else:
            value = 0.1 * u
        out[key] = torch.from_numpy(value.reshape(tuple(tensor.shape)).astype(np.float32))
    return out


@functools.lru_cache(maxsize=None)
def reference_model(config: str) -> SRT:
    model = build_model(CONFIGS[config]).eval()
    for part in ('encoder', 'decoder'):
        module = getattr(model, part)
        module.load_state_dict(deterministic_weights(part, module.state_dict()), strict=True)
    return model


@pytest.mark.parametrize('config', ['srt', 'isrt'])
@pytest.mark.parametrize('batch', ['msn', 'nmr'])
def test_matches_reference_outputs(config, batch):
    data = np.load(TESTVECTORS / 'model' / f'{config}_{batch}.npz')
    t = {k: torch.from_numpy(data[k]) for k in data.files}
    model = reference_model(config)
    with torch.no_grad():
        z = model.encoder(t['input_images'], t['input_camera_pos'], t['input_rays'])
        pixels, extras = model.decoder(z, t['target_camera_pos'], t['target_rays'])
    assert tuple(z.shape) == tuple(data['latents_shape'])
    first = t['latents_first64']
    assert (z[:, :first.shape[1]] - first).abs().max().item() <= 1e-4
    assert abs(z.mean().item() - float(data['latents_mean'])) <= 1e-4
    assert abs(z.std().item() - float(data['latents_std'])) <= 1e-4
    assert pixels.shape == t['pixels'].shape and extras == {}
    assert (pixels - t['pixels']).abs().max().item() <= 2e-5


@pytest.mark.parametrize('config', ['srt', 'isrt'])
def test_state_dict_is_the_reference_format(config):
    keys = reference_keys()[config]
    model = build_model(CONFIGS[config])
    for part in ('encoder', 'decoder'):
        ours = {k: tuple(v.shape) for k, v in getattr(model, part).state_dict().items()}
        assert ours == keys[part]
    zeros = {part: {k: torch.zeros(shape) for k, shape in keys[part].items()} for part in keys}
    ckpt_lib.load_model_state(model, zeros)  # strict
    assert all((p == 0).all() for p in model.parameters())
    encoder_count, total = PARAMETER_COUNTS[config]
    assert count_parameters(model.encoder) == encoder_count
    assert count_parameters(model) == total


def _differently_initialised(model):
    """A copy of ``model`` in which every floating-point tensor of its state differs."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for value in other.state_dict().values():
            if value.is_floating_point():
                value.add_(1.0)
    assert not any(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     other.state_dict().values())
                   if a.is_floating_point())
    return other


def assert_same_state(model, other):
    want, got = model.state_dict(), other.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want), \
        [k for k in want if not torch.equal(got[k], want[k])][:5]


def test_checkpoint_file_round_trip_and_wrapped_prefixes(tmp_path):
    model = build_model(CONFIGS['isrt'])
    state = ckpt_lib.reference_state_dicts(model)
    optimizer = torch.optim.Adam(model.parameters())
    path = tmp_path / 'model.pt'
    torch.save({**state, 'optimizer': optimizer.state_dict(), 'it': 7, 'epoch_it': 1, 't': 3.5,
                'loss_val_best': np.float64(-np.inf), 'run_id': 'abc'}, path)
    other = _differently_initialised(model)
    rest = ckpt_lib.load_reference_checkpoint(other, path)
    assert rest['it'] == 7 and rest['run_id'] == 'abc' and 'optimizer' in rest
    assert_same_state(model, other)

    # State dicts of a compiled / DDP-wrapped module, and a bare whole-model state dict.
    wrapped = {part: {f'module._orig_mod.{k}': v for k, v in sd.items()} for part, sd in state.items()}
    other = _differently_initialised(model)
    ckpt_lib.load_model_state(other, wrapped)
    assert_same_state(model, other)
    flat = {f'_orig_mod.{k}': v for k, v in model.state_dict().items()}
    torch.save(flat, tmp_path / 'flat.pt')
    other = _differently_initialised(model)
    ckpt_lib.load_reference_checkpoint(other, tmp_path / 'flat.pt')
    assert_same_state(model, other)


def test_checkpoint_mismatch_is_reported_clearly():
    model = build_model(CONFIGS['isrt'])
    state = ckpt_lib.reference_state_dicts(model)
    del state['encoder']['per_patch_linear.bias']
    state['decoder']['extra.weight'] = torch.zeros(1)
    state['decoder']['render_mlp.8.bias'] = torch.zeros(4)
    with pytest.raises(ckpt_lib.CheckpointError) as err:
        ckpt_lib.load_model_state(model, state)
    message = str(err.value)
    assert 'missing keys (1): per_patch_linear.bias' in message
    assert 'unexpected keys (1): extra.weight' in message
    assert 'render_mlp.8.bias: checkpoint (4,) vs model (3,)' in message


def test_config_from_yaml_and_rejects_unknown_names():
    for path in sorted(ROOT.glob('runs/*/*/config.yaml')):
        config = ModelConfig.from_dict(yaml.safe_load(path.read_text())['model'])
        assert config.encoder in ('srt', 'isrt', 'osrt')  # osrt: tests/test_osrt.py
        assert config.decoder in ('lightfield', 'isrt', 'nerf', 'slot_mixer')
        assert config.encoder_kwargs['pos_start_octave'] == -5
    assert ModelConfig.from_dict({'decoder': 'nerf'}).encoder == 'srt'
    with pytest.raises(ValueError, match='unknown decoder'):
        ModelConfig(decoder='volumetric')
    with pytest.raises(ValueError, match='unknown encoder'):
        ModelConfig(encoder='slots')
    with pytest.raises(ValueError, match=r"model.encoder_kwargs: unknown option\(s\) \['num_heads'\]"):
        ModelConfig(encoder_kwargs={'num_heads': 4})
    with pytest.raises(ValueError, match='unknown key'):
        ModelConfig.from_dict({'decoder': 'nerf', 'latent_dim': 3})


def test_positional_encoding_layout():
    x = torch.tensor([[0.1, -0.2, 0.3]])
    code = positional_encoding(x, num_octaves=2, start_octave=-1)
    scaled = [c * (2.0 ** o) * np.pi for c in (0.1, -0.2, 0.3) for o in (-1, 0)]  # coordinate-major
    expected = np.concatenate([np.sin(scaled), np.cos(scaled)])
    np.testing.assert_allclose(code[0].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize('size', [(1, 1), (1, 5), (4, 1), (6, 7)])
def test_folded_camera_code_convolution_is_exact(size):
    g = torch.Generator().manual_seed(1)
    h, w = size
    x = torch.randn(3, 5, h, w, generator=g)
    const = torch.randn(3, 4, generator=g)
    weight = torch.randn(6, 9, 3, 3, generator=g)
    full = torch.cat((x, const[:, :, None, None].expand(3, 4, h, w)), dim=1)
    expected = F.conv2d(full, weight, padding=1)
    got = conv3x3_constant_channels(x, weight[:, :5], weight[:, 5:], const)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('selfatt', [True, False])
def test_sdpa_matches_explicit_attention(selfatt):
    torch.manual_seed(0)
    attn = Attention(180, heads=12, dim_head=64, selfatt=selfatt, kv_dim=None if selfatt else 768)
    x = torch.randn(2, 50, 180)
    z = None if selfatt else torch.randn(2, 40, 768)
    attn.impl = 'sdpa'
    fused = attn(x, z=z)
    attn.impl = 'explicit'
    explicit = attn(x, z=z)
    assert (fused - explicit).abs().max().item() <= 1e-5


def test_auto_attention_is_explicit_only_for_short_attention_on_cpu(monkeypatch):
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or fused(*a, **k))
    attn = Attention(64, heads=2, dim_head=32)  # impl 'auto'
    x = torch.randn(1, 100, 64)
    auto = attn(x)  # 100 x 100 query-key pairs: explicit
    assert not calls
    attn(torch.randn(1, 1100, 64))  # 1100 x 1100 > 2**20: SDPA
    assert len(calls) == 1
    attn.impl = 'sdpa'
    torch.testing.assert_close(attn(x), auto, atol=1e-5, rtol=1e-5)


def test_sdpa_matches_explicit_in_the_model():
    model = reference_model('srt')
    data = np.load(TESTVECTORS / 'model' / 'srt_nmr.npz')
    t = {k: torch.from_numpy(data[k]) for k in data.files}
    outputs = {}
    with torch.no_grad():
        for impl in ('explicit', 'sdpa'):
            model.set_attention(impl)
            z = model.encoder(t['input_images'], t['input_camera_pos'], t['input_rays'])
            outputs[impl] = (z, model.decoder(z, t['target_camera_pos'], t['target_rays'])[0])
    model.set_attention('sdpa')
    assert (outputs['sdpa'][0] - outputs['explicit'][0]).abs().max().item() <= 1e-4  # latents ~ +-10
    assert (outputs['sdpa'][1] - outputs['explicit'][1]).abs().max().item() <= 1e-5


def test_folded_and_reference_encoders_agree():
    model = reference_model('isrt')
    data = np.load(TESTVECTORS / 'model' / 'isrt_nmr.npz')
    args = [torch.from_numpy(data[k]) for k in ('input_images', 'input_camera_pos', 'input_rays')]
    with torch.no_grad():
        folded = model.encoder(*args)
        model.encoder.fold_camera_code = False
        model.encoder.channels_last = False  # the reference's layout too
        plain = model.encoder(*args)
        model.encoder.fold_camera_code = model.encoder.channels_last = True
    assert (folded - plain).abs().max().item() <= 1e-4


TINY = {  # reference widths, fewer layers: fast
    'srt': {'encoder_kwargs': {'num_conv_blocks': 2, 'num_att_blocks': 1, 'pos_start_octave': -5},
            'decoder': 'lightfield', 'decoder_kwargs': {'num_att_blocks': 1, 'pos_start_octave': -5}},
    'isrt': {'encoder': 'isrt', 'encoder_kwargs': {'num_conv_blocks': 2, 'num_att_blocks': 1},
             'decoder': 'isrt', 'decoder_kwargs': {'num_att_blocks': 1}},
    'nerf': {'encoder_kwargs': {'num_conv_blocks': 2, 'num_att_blocks': 1},
             'decoder': 'nerf', 'decoder_kwargs': {'num_att_blocks': 1, 'use_fine_net': True}},
}
NERF_KWARGS = dict(min_dist=0.5, max_dist=4.0, num_coarse_samples=8, num_fine_samples=4)


@pytest.mark.parametrize('config', ['srt', 'isrt', 'nerf'])
def test_output_shapes(config):
    torch.manual_seed(0)
    model = build_model(TINY[config])
    batch = tiny_batch(b=2, v=3, h=16, w=24, r=5)
    with torch.no_grad():
        z = model.encoder(batch['input_images'], batch['input_camera_pos'], batch['input_rays'])
        assert z.shape == (2, 3 * 4 * 6, 768)
        pixels, extras = model(**batch, **NERF_KWARGS)
    assert pixels.shape == (2, 5, 3)
    if config == 'nerf':
        assert extras['depth'].shape == (2, 5) and extras['coarse_depth'].shape == (2, 5)
        assert extras['coarse_img'].shape == (2, 5, 3)
    # The full-size SRT encoder (4 conv blocks) on 16x16 views: a 1x1 patch grid per view.
    full = build_model(CONFIGS['srt'])
    with torch.no_grad():
        z = full.encoder(batch['input_images'][:1, :, :, :16, :16], batch['input_camera_pos'][:1],
                         batch['input_rays'][:1, :, :16, :16])
    assert z.shape == (1, 3, 768)


@pytest.mark.parametrize('config', ['srt', 'isrt', 'nerf'])
def test_every_parameter_receives_a_gradient(config):
    torch.manual_seed(0)
    model = build_model(TINY[config])
    pixels, extras = model(**tiny_batch(b=2, v=2, h=16, w=16, r=6), **NERF_KWARGS)
    loss = pixels.square().mean() + sum(v.square().mean() for k, v in extras.items() if k == 'coarse_img')
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_model(TINY['srt'])
    batch = tiny_batch(b=1, v=2, h=16, w=16, r=6)
    grads = []
    for enabled in (False, True):
        model.set_checkpointing(enabled)
        model.zero_grad()
        model(**batch)[0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('config', ['srt', 'nerf'])
def test_chunked_rendering_matches_one_pass(config):
    torch.manual_seed(0)
    model = build_model(TINY[config]).eval()
    batch = tiny_batch(b=2, v=1, h=16, w=16)
    kwargs = dict(NERF_KWARGS, deterministic=True) if config == 'nerf' else {}
    with torch.no_grad():
        z = model.encoder(batch['input_images'], batch['input_camera_pos'], batch['input_rays'])
        rays = batch['input_rays'][:, 0, :5, :7]  # [2, 5, 7, 3]
        pos = batch['input_camera_pos'][:, 0]
        image, extras = render_image(model, z, pos, rays, chunk=4, **kwargs)
        flat, flat_extras = render_rays(model.decoder, z, pos[:, None].expand(2, 35, 3),
                                        rays.reshape(2, 35, 3), chunk=1000, **kwargs)
    assert image.shape == (2, 5, 7, 3)
    torch.testing.assert_close(image.reshape(2, 35, 3), flat, atol=1e-6, rtol=1e-6)
    for key, value in flat_extras.items():
        assert extras[key].shape == (2, 5, 7, *value.shape[2:])
        torch.testing.assert_close(extras[key].reshape(value.shape), value, atol=1e-6, rtol=1e-6)


def test_narrow_model_options_shape_the_model():
    """The demo's small-model options (latent width, conv width, code octaves) change the shapes they
    name, and the encoder and decoder widths must agree."""
    kw = {'latent_dim': 192, 'pos_octaves': 8, 'ray_octaves': 6}
    model = SRT(ModelConfig(encoder='isrt', encoder_kwargs={'num_conv_blocks': 2, 'num_att_blocks': 1,
                                                           'conv_dim': 16, **kw},
                            decoder='lightfield', decoder_kwargs={'num_att_blocks': 1, **kw}))
    assert model.encoder.conv_blocks[0].layers[0].weight.shape == (16, 3 + 6 * 8 + 6 * 6, 3, 3)
    assert model.encoder.per_patch_linear.weight.shape[:2] == (192, 64)
    assert model.decoder.ray_predictor.query_encoder.out_dim == 6 * 8 + 6 * 6
    images, rays = torch.rand(2, 2, 3, 16, 16), F.normalize(torch.randn(2, 2, 16, 16, 3), dim=-1)
    z = model.encoder(images, torch.randn(2, 2, 3), rays)
    assert z.shape == (2, 2 * 4 * 4, 192)
    pixels, _ = model.decoder(z, torch.randn(2, 5, 3), F.normalize(torch.randn(2, 5, 3), dim=-1))
    assert pixels.shape == (2, 5, 3)
    with pytest.raises(ValueError, match='encoder_kwargs.latent_dim.*decoder_kwargs.latent_dim'):
        ModelConfig(encoder='isrt', encoder_kwargs={'latent_dim': 192}, decoder='lightfield')
    with pytest.raises(ValueError, match='multiple of 64'):
        SRT(ModelConfig(encoder='isrt', encoder_kwargs={'latent_dim': 100},
                        decoder='lightfield', decoder_kwargs={'latent_dim': 100}))
