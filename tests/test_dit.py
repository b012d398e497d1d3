"""DiT: the official computation, both checkpoint layouts, diffusers, merged encoders, noise and VAE inputs."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import ldae_models
from ldae_models.models.dit import dit_diffusers_to_official, dit_official_to_diffusers
from conftest import fake_hf_cache, randomize_, rel_err
from reference import reference_dit

TOL = 1e-5
# A tiny DiT: 8x8x4 latents, patch 2 (16 tokens), width 32, 3 blocks, 2 heads, 10 classes (+ null).
TINY_DIT = dict(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10)
TINY_ENC = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_labels=10, y=10)


def tiny_dit(seed=0):
    return randomize_(ldae_models.create_dit('dit_s_patch2_256', **TINY_DIT), seed).eval()


def official_state_dict(dit):
    """What the official code's torch.save(model.state_dict()) holds: our keys are its keys."""
    return {k: v.clone() for k, v in dit.state_dict().items()}


@pytest.mark.parametrize('t,y', [(0, 3), (121, 10), (999, 0)])
def test_dit_matches_reference_block_by_block(t, y):
    dit = tiny_dit(seed=t)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out, hidden = dit.forward_hidden(x, torch.tensor([t, t]), torch.tensor([y, y]))
    ref_out, ref_hidden = reference_dit(dit.state_dict(), x, t, y, patch=2, heads=2, depth=3, out_channels=8)
    assert out.shape == (2, 8, 8, 8)
    for a, b in zip(hidden, ref_hidden):
        assert rel_err(a, b) < TOL
    assert rel_err(out, ref_out) < TOL


def test_training_checkpoint_loads_its_ema_weights(tmp_path):
    """A DiT training checkpoint {'model': ..., 'ema': ...} loads the EMA weights, through create_dit and timm."""
    live, ema = tiny_dit(seed=1), tiny_dit(seed=2)
    path = tmp_path / 'train.pt'
    torch.save({'model': official_state_dict(live), 'ema': official_state_dict(ema), 'opt': {}, 'args': 3}, path)
    full = ldae_models.create_dit('dit_s_patch2_256', checkpoint=str(path), **TINY_DIT)
    assert torch.equal(full.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)
    enc = timm.create_model('dit_s_patch2_256', pretrained=True, merged=False,
                            pretrained_cfg_overlay=dict(file=str(path)), **TINY_ENC)
    assert torch.equal(enc.blocks[1].mlp.fc1.weight, ema.blocks[1].mlp.fc1.weight)


def test_official_layout_loads_through_timm_and_create_dit(tmp_path):
    dit = tiny_dit()
    sd = official_state_dict(dit)
    path = tmp_path / 'DiT-tiny.pt'
    torch.save(sd, path)  # the released files are plain pickled state dicts
    full = ldae_models.create_dit('dit_s_patch2_256', checkpoint=str(path), **TINY_DIT).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([10, 2])
    with torch.no_grad():
        assert torch.equal(full(x, t, y), dit(x, t, y))
    enc = timm.create_model('dit_s_patch2_256', pretrained=True, merged=False,
                            pretrained_cfg_overlay=dict(file=str(path)), **TINY_ENC).eval()
    assert torch.equal(enc.patch_embed.proj.weight, sd['x_embedder.proj.weight'])
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, sd['blocks.1.mlp.fc2.weight'])
    with torch.no_grad():
        hidden = dit.forward_hidden(x, t, torch.tensor([10, 10]))[1]
        inter = enc.forward_intermediates(x, t=t, output_fmt='NLC', intermediates_only=True)
    for a, b in zip(inter, hidden[:2]):
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize('t,y', [(121, 10), (0, 4), (500, 10)])
def test_merged_dit_encoder_matches_conditional(t, y):
    enc = randomize_(timm.create_model('dit_s_patch2_256', merged=False, **{**TINY_ENC, 't': t, 'y': y}), seed=t).eval()
    vit = enc.merge()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(vit(x), enc(x)) < TOL
        for a, b in zip(vit.forward_intermediates(x, intermediates_only=True),
                        enc.forward_intermediates(x, intermediates_only=True)):
            assert rel_err(a, b) < TOL
        assert rel_err(enc(x, y=3), enc(x)) > 1e-4  # the label does condition


# -- diffusers ---------------------------------------------------------------------------------------

def _diffusers_dit(seed=0):
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    randomize_(m, seed)
    # diffusers keeps one embedder per block; a converted checkpoint has them all equal
    emb0 = m.transformer_blocks[0].norm1.emb.state_dict()
    for blk in m.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(emb0)
    return m.eval()


def _as_official(m):
    sd = dit_diffusers_to_official(m.state_dict())
    dit = ldae_models.create_dit('dit_s_patch2_256', **TINY_DIT)
    ldae_models.hub.load_state_dict_strict(dit, {**sd, 'pos_embed': dit.pos_embed})
    return dit.eval()


def _official_semantics(m):
    """Undo diffusers' two differences: frequencies over 128 (not 127) and MLP LayerNorm eps 1e-6 (not 1e-5)."""
    for blk in m.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
        blk.norm3.eps = 1e-6
    return m


def _diffusers_hidden(m, x, t, y):
    hidden = []
    hooks = [blk.register_forward_hook(lambda mod, i, o: hidden.append(o)) for blk in m.transformer_blocks]
    with torch.no_grad():
        out = m(x, timestep=t, class_labels=y).sample
    for h in hooks:
        h.remove()
    return out, hidden


def test_converter_round_trip_is_exact():
    m = _diffusers_dit()
    sd = m.state_dict()
    back = dit_official_to_diffusers(dit_diffusers_to_official(sd))
    assert back.keys() == {k for k in sd if not k.startswith('pos_embed.pos_embed')}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_diffusers_matches_block_by_block_with_the_same_conditioning():
    m = _diffusers_dit()
    dit = _as_official(m)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 640]), torch.tensor([10, 7])
    with torch.no_grad():
        h = m.pos_embed(x)
        mine = dit.x_embedder(x) + dit.pos_embed
        assert rel_err(mine, h) < TOL
        for i, blk in enumerate(m.transformer_blocks):
            c = blk.norm1.emb(t, y, hidden_dtype=h.dtype)  # diffusers' conditioning vector, fed to both
            ref = blk(h, timestep=t, class_labels=y)
            ours = dit.blocks[i](h, c)
            # only the MLP LayerNorm eps differs (1e-5 vs 1e-6)
            assert rel_err(ours, ref) < 1e-3
            dit.blocks[i].norm2.eps = 1e-5
            assert rel_err(dit.blocks[i](h, c), ref) < TOL
            dit.blocks[i].norm2.eps = 1e-6
            h = ref


def test_diffusers_with_official_semantics_matches_end_to_end():
    m = _official_semantics(_diffusers_dit(seed=1))
    dit = _as_official(m)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([1, 10])
    ref_out, ref_hidden = _diffusers_hidden(m, x, t, y)
    with torch.no_grad():
        out, hidden = dit.forward_hidden(x, t, y)
    for a, b in zip(hidden, ref_hidden):
        assert rel_err(a, b) < TOL
    assert rel_err(out, ref_out) < TOL


def test_measured_difference_of_unmodified_diffusers():
    """The official computation vs diffusers as it is, one difference at a time, per timestep (measured)."""
    x, y = torch.randn(1, 4, 8, 8), torch.tensor([10])
    errs = {}
    for effect in ('eps', 'freq'):
        m = _diffusers_dit(seed=2)
        for blk in m.transformer_blocks:  # keep only the difference under study
            if effect == 'eps':
                blk.norm1.emb.time_proj.downscale_freq_shift = 0
            else:
                blk.norm3.eps = 1e-6
        dit = _as_official(m)
        for t in (0, 10, 121, 500, 999):
            ref_out, _ = _diffusers_hidden(m, x, torch.tensor([t]), y)
            with torch.no_grad():
                errs[effect, t] = rel_err(dit(x, torch.tensor([t]), y), ref_out)
    print('relative output error vs diffusers: ' + ', '.join(f'{e} t={t}: {v:.1e}' for (e, t), v in errs.items()))
    assert all(1e-7 < errs['eps', t] < 1e-2 for t in (0, 10, 121, 500, 999))  # LayerNorm eps 1e-5 vs 1e-6
    assert errs['freq', 0] < 1e-6  # cos(0) = 1, sin(0) = 0 whatever the frequencies
    assert errs['freq', 10] < errs['freq', 121] < errs['freq', 999]  # the phase error grows with t


def test_diffusers_layout_from_offline_hub_cache(tmp_path):
    m = _diffusers_dit(seed=3)
    weights = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(weights))
    fake_hf_cache(tmp_path / 'hf', 'facebook/DiT-tiny', {'diffusion_pytorch_model.safetensors': weights})
    (tmp_path / 'hf/models--facebook--DiT-tiny/snapshots' / ('a' * 40) / 'transformer').mkdir()
    (tmp_path / 'hf/models--facebook--DiT-tiny/snapshots' / ('a' * 40) / 'diffusion_pytorch_model.safetensors').rename(
        tmp_path / 'hf/models--facebook--DiT-tiny/snapshots' / ('a' * 40) / 'transformer/diffusion_pytorch_model.safetensors')
    enc = timm.create_model('dit_s_patch2_256', pretrained=True, merged=False, cache_dir=str(tmp_path / 'hf'),
                            pretrained_cfg_overlay=dict(hf_hub_id='facebook/DiT-tiny',
                                                        hf_hub_filename='transformer/diffusion_pytorch_model.safetensors'),
                            **TINY_ENC)
    dit = _as_official(m)
    assert torch.equal(enc.blocks[0].attn.qkv.weight, dit.blocks[0].attn.qkv.weight)
    assert torch.equal(enc.y_embedder.embedding_table.weight, dit.y_embedder.embedding_table.weight)


# -- inputs: noise and VAE -------------------------------------------------------------------------------

def test_noise_follows_ddpm_schedule():
    enc = randomize_(timm.create_model('dit_s_patch2_256', merged=False, **{**TINY_ENC, 't': 121}))
    x = torch.randn(2, 4, 8, 8)
    xt, eps = enc.add_noise(x, generator=torch.Generator().manual_seed(0))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.prod(1 - betas[:122])
    assert rel_err(xt, (abar.sqrt() * x + (1 - abar).sqrt() * eps).float()) < 1e-6
    enc = enc.eval()
    wrapped = timm.create_model('dit_s_patch2_256', noisy_input=True, **{**TINY_ENC, 't': 121})
    assert isinstance(wrapped, ldae_models.DiffusionInput) and wrapped.noisy_input and wrapped.t == 121
    a = wrapped(x, generator=torch.Generator().manual_seed(1))
    b = wrapped(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, wrapped.model(x))
    # the conditional encoder noises by itself, with the same draw
    cond = timm.create_model('dit_s_patch2_256', merged=False, noisy_input=True, **{**TINY_ENC, 't': 121})
    cond.load_state_dict(enc.state_dict())
    with torch.no_grad():
        xt_same = enc.add_noise(x, generator=torch.Generator().manual_seed(1))[0]
        assert rel_err(cond(x, generator=torch.Generator().manual_seed(1)), enc(xt_same)) < 1e-6


def test_ddae_preset_can_be_tapped():
    """DDAE's preset (merged, noisy input at t = 121) answers the encoder contract: block 13 of a 28-block DiT."""
    with torch.device('meta'):
        assert len(timm.create_model('dit_xl_patch2_256', **ldae_models.DDAE_DIT_PRESET).blocks) == 14
    m = timm.create_model('dit_s_patch2_256', **{**ldae_models.DDAE_DIT_PRESET, **TINY_ENC, 'y': 10}).eval()
    randomize_(m, seed=2)
    x = torch.randn(2, 4, 8, 8)
    a = ldae_models.extract_features(m, x, layers=[0, 1], generator=torch.Generator().manual_seed(0))
    b = ldae_models.extract_features(m, x, layers=[0, 1], generator=torch.Generator().manual_seed(0))
    clean = ldae_models.extract_features(m, x, layers=[1], noisy_input=False)
    assert set(a) == {(0, 121.0), (1, 121.0)} and torch.equal(a[(1, 121.0)], b[(1, 121.0)])
    assert not torch.allclose(a[(1, 121.0)], clean[(1, 121.0)])  # noisy by default
    with pytest.raises(ValueError, match='merged at'):
        ldae_models.extract_features(m, x, layers=[0], ts=[10])


def test_vae_attached_takes_images():
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                  down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                                  norm_num_groups=4, layers_per_block=1).eval()
    model = timm.create_model('dit_s_patch2_256', vae=vae, **TINY_ENC).eval()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        lat = vae.encode(img).latent_dist.mean * 0.18215
        assert rel_err(model(img), model.model(lat)) < 1e-6
    assert model.pretrained_cfg['input_size'] == (3, 64, 64) and model.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match='RGB images'):
        model(torch.randn(2, 4, 8, 8))


# -- registry, preset, bad input ----------------------------------------------------------------------------

def test_registry_tags_and_ddae_preset():
    names = timm.list_models('dit_*')
    from ldae_models.models.dit import DIT_CONFIGS, _SIZES
    assert len([n for n in names if n.startswith('dit_')]) == len(DIT_CONFIGS) == len(_SIZES) * 3 * 2  # patch, res
    tags = timm.list_pretrained('dit*')
    assert {'dit_xl_patch2_256.fb_in1k', 'dit_xl_patch2_512.fb_in1k', 'dit_xl_patch2_256.fb_in1k_diffusers',
            'dit_xl_patch2_512.fb_in1k_diffusers'} <= set(tags)
    cfg = timm.models.get_pretrained_cfg('dit_xl_patch2_256.fb_in1k')
    assert cfg.url.endswith('DiT-XL-2-256x256.pt') and cfg.license == 'cc-by-nc-4.0'
    assert any('class labels' in n for n in cfg.notes)
    with torch.device('meta'):
        m = timm.create_model('dit_xl_patch2_256', **ldae_models.DDAE_DIT_PRESET)  # merged: the input stage noises
        c = timm.create_model('dit_xl_patch2_256', merged=False, **ldae_models.DDAE_DIT_PRESET)  # noises by itself
    assert isinstance(m, ldae_models.DiffusionInput) and m.noisy_input and m.t == 121
    assert len(m.model.blocks) == 14 and m.model.t == 121 and m.model.embed_dim == 1152
    assert isinstance(c, ldae_models.DiTEncoder) and c.noisy_input and c.t == 121 and c.y == 1000
    with torch.device('meta'):
        d = timm.create_model('dit_xl_patch2_256', merged=False)
    assert len(d.blocks) == 14 and d.t == 121 and d.y == 1000  # the documented default
    with torch.device('meta'):
        dit_xl = ldae_models.DiT(depth=28, hidden_size=1152, num_heads=16, input_size=32, patch_size=2)
    # DiT-XL/2: 675,129,632 counting the fixed position embedding, a Parameter in the official code, a buffer here
    assert sum(p.numel() for p in dit_xl.parameters()) + dit_xl.pos_embed.numel() == 675_129_632


def test_dit_bad_inputs():
    dit = tiny_dit()
    with pytest.raises(ValueError, match='expected latents'):
        dit(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match='timestep t'):
        dit(torch.randn(1, 4, 8, 8), torch.tensor([1000]), torch.tensor([1]))
    with pytest.raises(ValueError, match='label y'):
        dit(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([11]))
    with pytest.raises(ValueError, match='label y'):
        timm.create_model('dit_s_patch2_256', **{**TINY_ENC, 'y': 11})
    for merged in (False, True):  # the message teaches what a DiT encoder wants
        with pytest.raises(ValueError, match=r'SD-VAE latents \(4 x 8 x 8 for 64 px images\).*vae='):
            timm.create_model('dit_s_patch2_256', merged=merged, **TINY_ENC)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match='unknown DiT'):
        ldae_models.create_dit('dit_xxl_patch2_256')
