"""Weights: every source, sha256, safe reading, strict loading, EMA preference, publishing, plain-timm export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import ldae_models
from ldae_models.hub.sources import resolve_file
from ldae_models.hub import (CheckpointError, CheckpointMismatchError, ChecksumError, SourceError, WeightSource,
                             cfg_sha256, read_checkpoint, sha256_note, sha256_of, weight_source)
from conftest import TINY, fake_hf_cache, randomize_, rel_err, smooth_images

NAME = 'ldae_vit_tiny_patch4_32'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny DAE with random weights and a fitted tokenizer, saved in several layouts."""
    root = tmp_path_factory.mktemp('ckpt')
    torch.manual_seed(0)
    dae = ldae_models.create_dae(NAME, **TINY)
    dae.fit_tokenizer([smooth_images(8, seed=s) for s in range(3)])
    randomize_(dae, seed=7)
    enc_sd = {k: v.clone() for k, v in dae.encoder.state_dict().items()}
    paths = dict(safetensors=root / 'enc.safetensors', pickle=root / 'enc.bin', dae=root / 'dae_train.pth')
    save_file(enc_sd, str(paths['safetensors']))
    torch.save(enc_sd, paths['pickle'])
    wrapped = {'model': {'module.' + k: v for k, v in dae.state_dict().items()}, 'epoch': 3, 'step': torch.tensor(9)}
    torch.save(wrapped, paths['dae'])
    return dict(dae=dae, enc_sd=enc_sd, paths=paths, root=root)


def create(pretrained=True, **kw):
    overlay = kw.pop('pretrained_cfg_overlay', None)
    if overlay is not None:  # the tag's packaged file comes first in timm's order: an overlay source replaces it
        kw['pretrained_cfg_overlay'] = {'file': None, **overlay}
    return timm.create_model(NAME, pretrained=pretrained, merged=False, **{**TINY, **kw})


def same_weights(model, sd):
    own = model.state_dict()
    return own.keys() == sd.keys() and all(torch.equal(own[k], sd[k]) for k in sd)


@pytest.mark.parametrize('layout', ['safetensors', 'pickle', 'dae'])
def test_file_sources_give_the_same_weights(trained, layout):
    m = create(pretrained_cfg_overlay=dict(file=str(trained['paths'][layout])))
    assert same_weights(m, trained['enc_sd'])


def test_state_dict_and_create_model_merged(trained):
    m = create(pretrained_cfg_overlay=dict(state_dict=trained['enc_sd']))
    assert same_weights(m, trained['enc_sd'])
    vit = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(trained['paths']['safetensors'])),
                            **TINY)
    x = smooth_images(3)
    with torch.no_grad():
        assert rel_err(vit(x), m(x)) < 1e-5


def test_hf_hub_id_source_from_offline_cache(trained, tmp_path):
    path = trained['paths']['safetensors']
    fake_hf_cache(tmp_path, 'ldae/tiny-test', {'model.safetensors': path})
    m = create(pretrained_cfg_overlay=dict(hf_hub_id='ldae/tiny-test', notes=(sha256_note(sha256_of(path)),)),
               cache_dir=str(tmp_path))
    assert same_weights(m, trained['enc_sd'])
    # a pickle-only repo falls back to pytorch_model.bin, read with weights_only
    fake_hf_cache(tmp_path, 'ldae/tiny-bin', {'pytorch_model.bin': trained['paths']['pickle']})
    assert same_weights(create(pretrained_cfg_overlay=dict(hf_hub_id='ldae/tiny-bin'), cache_dir=str(tmp_path)),
                        trained['enc_sd'])


def test_url_source_downloads_once_and_checks_sha256(trained, tmp_path):
    path = trained['paths']['safetensors']
    url = path.as_uri()  # file:// goes through the same download code as https://
    cfg = dict(url=url, notes=(sha256_note(sha256_of(path)),))
    m = create(pretrained_cfg_overlay=cfg, cache_dir=str(tmp_path))
    assert same_weights(m, trained['enc_sd']) and (tmp_path / path.name).is_file()
    assert weight_source(cfg).available_offline(cache_dir=tmp_path)


def test_sha256_mismatch_raises_and_deletes_download(trained, tmp_path):
    path = trained['paths']['safetensors']
    cfg = dict(url=path.as_uri(), notes=(sha256_note('0' * 64),))
    with pytest.raises(ChecksumError, match='sha256 mismatch.*deleted'):
        create(pretrained_cfg_overlay=cfg, cache_dir=str(tmp_path))
    assert not (tmp_path / path.name).exists()
    snap = fake_hf_cache(tmp_path / 'hf', 'ldae/bad', {'model.safetensors': path})
    with pytest.raises(ChecksumError, match='sha256 mismatch'):
        create(pretrained_cfg_overlay=dict(hf_hub_id='ldae/bad', notes=(sha256_note('1' * 64),)),
               cache_dir=str(tmp_path / 'hf'))
    assert not (snap / 'model.safetensors').exists()
    # a local file of the user's is reported, not deleted
    with pytest.raises(ChecksumError):
        create(pretrained_cfg_overlay=dict(file=str(path), notes=(sha256_note('2' * 64),)))
    assert path.exists()


class _Exploit:
    """Unpickling this would run ``open(marker, 'w')``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'pwned'
    bad = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'payload': _Exploit(str(marker))}, bad)
    with pytest.raises(CheckpointError, match='refusing to load'):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match='refusing to load'):
        create(pretrained_cfg_overlay=dict(file=str(bad)))
    assert not marker.exists()


def test_truncated_safetensors_is_named(trained, tmp_path):
    data = trained['paths']['safetensors'].read_bytes()
    cut = tmp_path / 'cut.safetensors'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        create(pretrained_cfg_overlay=dict(file=str(cut)))
    junk = tmp_path / 'junk.bin'
    junk.write_bytes(b'\x00not a checkpoint')
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        read_checkpoint(junk)


def test_checkpoint_of_another_model_is_reported(trained, tmp_path):
    other = tmp_path / 'other.safetensors'
    save_file({k: v.contiguous() for k, v in timm.create_model('vit_tiny_patch16_224').state_dict().items()},
              str(other))
    with pytest.raises(CheckpointMismatchError, match='missing keys.*t_embedder') as e:
        create(pretrained_cfg_overlay=dict(file=str(other)))
    assert 'unexpected keys: blocks.0.norm1.bias' in str(e.value) and '(131 in all)' in str(e.value)  # not its head
    with pytest.raises(CheckpointMismatchError, match=r'shape mismatches: pos_embed.*patch_embed.proj.weight: checkpoint \(32, 3, 4, 4\) vs model \(64, 3, 4, 4\)'):
        create(pretrained_cfg_overlay=dict(file=str(trained['paths']['safetensors'])), embed_dim=64)


def test_position_embedding_resampled_and_new_head(trained):
    m = create(pretrained_cfg_overlay=dict(file=str(trained['paths']['safetensors'])), img_size=24)
    assert m.pos_embed.shape == (1, 36, 32) and m(torch.randn(1, 3, 24, 24)).shape == (1, 32)
    m = create(pretrained_cfg_overlay=dict(file=str(trained['paths']['safetensors'])), num_classes=5)
    assert m(smooth_images(2)).shape == (2, 5)


def test_packaged_file_source(trained, monkeypatch, tmp_path):
    """A tag whose ``file`` is shipped inside the package: the same string on every machine (not an absolute path),
    resolved under the installed package's ldae_models/weights, sha256 checked."""
    from ldae_models.hub import sources as S
    monkeypatch.setattr(S, 'PACKAGE_WEIGHTS_DIR', tmp_path)
    name = S.packaged_file('tiny.safetensors')
    assert name == 'ldae_models/weights/tiny.safetensors' and S.resolve_file(name) == tmp_path / 'tiny.safetensors'
    path = S.resolve_file(name)
    path.write_bytes(trained['paths']['safetensors'].read_bytes())
    cfg = dict(file=name, notes=(sha256_note(sha256_of(path)),))
    assert weight_source(cfg) == WeightSource('file', name, None, sha256_of(path))
    assert weight_source(cfg).available_offline()
    assert same_weights(create(pretrained_cfg_overlay=cfg), trained['enc_sd'])


def test_no_weights_error():
    with pytest.raises(SourceError, match='no pretrained weights exist for ldae_vit_base_patch16_256'):
        timm.create_model('ldae_vit_base_patch16_256', pretrained=True, depth=1)


def test_unreachable_sources_say_so(tmp_path, monkeypatch):
    """Offline, a URL tag and a hub tag fail with one message naming the source (not a raw URLError)."""
    with pytest.raises(SourceError, match=r'cannot download https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256'):
        timm.create_model('dit_xl_patch2_256.fb_in1k', pretrained=True, depth=1, cache_dir=str(tmp_path))
    with pytest.raises(SourceError, match=r"cannot fetch .* from the Hugging Face repo 'facebook/DiT-XL-2-256'.*OFFLINE"):
        timm.create_model('dit_xl_patch2_256.fb_in1k_diffusers', pretrained=True, depth=1, cache_dir=str(tmp_path))


def test_without_network_hub_and_url_tags_fail_fast_or_use_the_cache(trained, tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE and no network: one look at the host (not a minute of retries), then the cache or one line."""
    import socket
    import time
    from ldae_models.hub import sources
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    asked = []

    def no_network(address, *a, **k):
        asked.append(address)
        raise OSError('Network is unreachable')
    monkeypatch.setattr(socket, 'create_connection', no_network)
    sources.reachable.cache_clear()
    t0 = time.time()
    with pytest.raises(SourceError, match=r"repo 'facebook/DiT-XL-2-256' \(no network access: huggingface.co cannot be "
                                          r"reached\) and it is not in the cache"):
        timm.create_model('dit_xl_patch2_256.fb_in1k_diffusers', pretrained=True, depth=1, cache_dir=str(tmp_path))
    with pytest.raises(SourceError, match=r'cannot download https://dl.fbaipublicfiles.com/.*no network access'):
        timm.create_model('dit_xl_patch2_256.fb_in1k', pretrained=True, depth=1, cache_dir=str(tmp_path))
    assert time.time() - t0 < 5 and asked == [('huggingface.co', 443), ('dl.fbaipublicfiles.com', 443)]
    fake_hf_cache(tmp_path, 'ldae/tiny-test', {'model.safetensors': trained['paths']['safetensors']})
    m = create(pretrained_cfg_overlay=dict(hf_hub_id='ldae/tiny-test'), cache_dir=str(tmp_path))
    assert same_weights(m, trained['enc_sd']) and len(asked) == 2  # the answer is remembered
    sources.reachable.cache_clear()


@pytest.mark.parametrize('content', [b'just some text, renamed .pth\n', b'PK\x03\x04 not really a zip', b''])
def test_files_that_are_not_checkpoints_are_named(tmp_path, content):
    bad = tmp_path / 'notes.pth'
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match='notes.pth is not a readable checkpoint'):
        create(pretrained_cfg_overlay=dict(file=str(bad)))
    with pytest.raises(CheckpointError, match='notes.pth is not a readable checkpoint'):
        ldae_models.create_dae(NAME, checkpoint=str(bad), **TINY)


def test_training_checkpoints_load_their_ema(trained, tmp_path):
    """A checkpoint with 'model' and 'ema' loads the EMA weights (our trainer's, timm's 'model_ema', DDAE's 'EMA')."""
    from ldae_models.hub import unwrap_state_dict
    live = {k: torch.zeros_like(v) for k, v in trained['enc_sd'].items()}
    for key in ('ema', 'model_ema', 'EMA'):
        path = tmp_path / f'{key}.pth'
        torch.save({'model': live, key: trained['enc_sd'], 'step': 3}, path)
        assert same_weights(create(pretrained_cfg_overlay=dict(file=str(path))), trained['enc_sd'])
    raw = unwrap_state_dict({'model': live, 'ema': trained['enc_sd']}, prefer_ema=False)
    assert all(torch.equal(raw[k], live[k]) for k in live)


def test_a_random_model_claims_no_checkpoint(tmp_path):
    """A model created without weights saves and exports without the tag's description or sha256 (defect g), and a
    saved file's description says what the file holds (defect 9 of the new-user report)."""
    for merged in (False, True):
        model = timm.create_model(NAME, merged=merged, **TINY)
        out = ldae_models.save_pretrained(model, tmp_path / f'random{merged}')
        cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
        assert 'CIFAR-10' not in cfg['description'] and 'float16' not in cfg['description']
        assert cfg_sha256(cfg) == sha256_of(out / 'model.safetensors')  # the note of the file written, only
        assert [n for n in cfg['notes'] if n.startswith('sha256:')] == [sha256_note(sha256_of(out / 'model.safetensors'))]
    shipped = timm.create_model('ldae_vit_tiny_patch4_32.cifar10', pretrained=True, merged=False)
    out = ldae_models.save_pretrained(shipped, tmp_path / 'shipped')
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert 'whole DAE' not in cfg['description'] and 'float32' in cfg['description']  # encoder-only, float32
    assert cfg['license'] == 'apache-2.0'


def test_every_listed_tag_has_real_bytes():
    for name in timm.list_pretrained('ldae*'):
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url')
        if cfg.get('file'):
            assert (resolve_file(cfg['file'])).is_file(), name
            assert cfg_sha256(cfg) == sha256_of(resolve_file(cfg['file'])), name


# -- publishing ---------------------------------------------------------------------------------------

def test_save_pretrained_local_dir_and_hf_hub_round_trip(trained, tmp_path):
    model = create(pretrained_cfg_overlay=dict(file=str(trained['paths']['safetensors'])))
    out = ldae_models.save_pretrained(model, tmp_path / 'tiny-ldae', model_card=dict(
        license='apache-2.0', training={'data': 'synthetic'}, results={'note': 'test'}))
    assert {p.name for p in out.iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == NAME and cfg['model_args']['merged'] is False
    assert cfg_sha256(cfg['pretrained_cfg']) == sha256_of(out / 'model.safetensors')  # the note of the file written
    card = (out / 'README.md').read_text()
    assert 'license: apache-2.0' in card and 'sha256' in card and 'synthetic' in card
    back = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert same_weights(back, trained['enc_sd'])
    fake_hf_cache(tmp_path / 'hf', 'ldae/tiny-ldae', {p.name: p for p in out.iterdir()})
    back = timm.create_model('hf-hub:ldae/tiny-ldae', pretrained=True, cache_dir=str(tmp_path / 'hf'))
    assert same_weights(back, trained['enc_sd'])


def test_push_to_hub_uploads_the_saved_folder(trained, monkeypatch):
    import huggingface_hub
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls['token'] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls['create'] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls['files'] = sorted(os.listdir(folder_path))
            calls['config'] = json.loads(Path(folder_path, 'config.json').read_text())
            return type('Info', (), {'commit_url': f'https://huggingface.co/{repo_id}/commit/1'})()

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    model = create(pretrained_cfg_overlay=dict(file=str(trained['paths']['safetensors'])))
    url = ldae_models.push_to_hub(model, 'ldae/tiny', token='tok')
    assert url.endswith('/commit/1') and calls['create'] == ('ldae/tiny', False, True)
    assert calls['files'] == ['README.md', 'config.json', 'model.safetensors']
    assert calls['config']['architecture'] == NAME


# -- export to plain timm -----------------------------------------------------------------------------

_PLAIN_TIMM = r'''
import sys, torch, timm
from safetensors.torch import load_file, save_file
model = timm.create_model(sys.argv[1], pretrained=True, **({'cache_dir': sys.argv[4]} if len(sys.argv) > 4 else {})).eval()
assert 'ldae_models' not in sys.modules, 'ldae_models was imported'
x = load_file(sys.argv[2])['x']
with torch.no_grad():
    save_file({'y': model(x), 'block0': model.forward_intermediates(x, indices=[0], intermediates_only=True)[0].contiguous()}, sys.argv[3])
print(type(model).__name__)
'''


def _run_plain_timm(tmp_path, name, x, env=None, cache_dir=None):
    save_file({'x': x}, str(tmp_path / 'x.safetensors'))
    script = tmp_path / 'plain.py'
    script.write_text(_PLAIN_TIMM)
    args = [sys.executable, str(script), name, str(tmp_path / 'x.safetensors'), str(tmp_path / 'y.safetensors')]
    r = subprocess.run(args + ([cache_dir] if cache_dir else []), capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, 'PYTHONPATH': '', **(env or {})})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'VisionTransformer'
    return load_file(str(tmp_path / 'y.safetensors'))


def test_export_plain_timm_matches_merged_without_ldae_models(trained, tmp_path):
    enc = create(pretrained_cfg_overlay=dict(file=str(trained['paths']['safetensors'])))
    vit = enc.merge(40).eval()
    out = ldae_models.export_timm(vit, tmp_path / 'export')
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'].startswith('vit_') and cfg['model_args']['class_token'] is False
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = vit(x)
        ref0 = vit.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
    got = _run_plain_timm(tmp_path, f'local-dir:{out}', x)
    assert rel_err(got['y'], ref) < 1e-6 and rel_err(got['block0'], ref0) < 1e-6
    fake_hf_cache(tmp_path / 'hf', 'ldae/tiny-merged', {p.name: p for p in out.iterdir()})
    got = _run_plain_timm(tmp_path, 'hf-hub:ldae/tiny-merged', x, env={'HF_HUB_OFFLINE': '1'},
                          cache_dir=str(tmp_path / 'hf'))
    assert rel_err(got['y'], ref) < 1e-6
