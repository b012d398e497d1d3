"""The GPU campaign's plan at toy size on the CPU (a smaller smoke than ``gpu_campaign.py --smoke``): every stage
runs, every planned run has its recipe and probe in results.json, and the collected weights load through timm."""
import json
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import gpu_campaign as G  # noqa: E402


def test_campaign_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(G, 'SWEEP', {'base': [], 'd4': ['--latent-dim', '4']})
    monkeypatch.setattr(G, 'TRENDS', {'pixel_noise': ['--noise-space', 'pixel', '--residual-weight', '1']})
    monkeypatch.setattr(sys, 'argv', ['gpu_campaign.py', '--smoke', '--no-throughput', '--work', str(tmp_path / 'w'),
                                      '--out', str(tmp_path / 'out'), '--smoke-train', '128', '--smoke-test', '64'])
    G.main()
    r = json.loads((tmp_path / 'w/results.json').read_text())
    assert set(r['runs']) == {'base', 'd4', 'long', 'pixel_noise'}
    for name, run in r['runs'].items():
        assert run['train']['returncode'] == 0 and 0 <= run['probe']['top1'] <= 100, (name, run)
        assert 'flags' in run and run['epochs'] >= 1
    assert r['best_recipe'] in ('base', 'd4') and r['runs']['long']['recipe'] == r['best_recipe']
    assert {'random_same_shape', 'raw_pixels'} <= set(r['floors'])
    assert isinstance(r['grid_clean'], list) and len(r['grid_clean']) >= 4 and isinstance(r['grid_noisy'], list)
    assert all('knn_top1' in v for v in r['floors'].values())
    out = tmp_path / 'out'
    files = [p for p in out.rglob('*') if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size <= 16 << 20 for p in files)
    assert (out / 'results.md').is_file() and (out / 'runs.png').is_file()
    index = out / 'long_dae_fp16' / 'model.safetensors.index.json'
    args = json.loads((out / 'long_dae_fp16' / 'model_args.json').read_text())
    args.pop('merged', None)
    enc = timm.create_model('ldae_vit_tiny_patch4_32', pretrained=True, pretrained_cfg_overlay=dict(file=str(index)),
                            **args)
    assert enc(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, 64)
