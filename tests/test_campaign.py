"""The GPU campaign's contract, at toy size on the CPU (``--smoke``): it runs from a plain copy of the tree with only
``PYTHONPATH`` (not the installed package), ends within its budget (slack: 20 s for the interpreter's start and exit),
leaves the long run's weights when the budget stops it (from its checkpoint), and its output folder obeys the rules of
what a GPU machine brings back: at most 8 files of at most 16 MiB, at most 2 folders deep, names in letters, digits,
'.', '_' and '-'."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

import ldae_models  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
BUDGET_MIN, SLACK_S = 1.2, 20


def tree_copy(dest: Path) -> Path:
    """The files a copy of the tree has (tracked and new, not ignored), as a plain folder."""
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return dest


def test_the_campaign_runs_from_a_plain_tree_within_its_budget_and_leaves_its_files(tmp_path):
    tree, out, work = tree_copy(tmp_path / 'tree'), tmp_path / 'out', tmp_path / 'work'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    t0 = time.time()
    r = subprocess.run([sys.executable, 'experiments/gpu_campaign.py', '--smoke', '--budget-min', str(BUDGET_MIN),
                        '--sweep', 'base', 'd4', '--trends', 'pixel_noise', '--long-epochs', '100000',
                        '--smoke-train', '256', '--smoke-test', '128', '--out', str(out), '--work', str(work)],
                       cwd=tree, env={**env, 'PYTHONPATH': '.'}, capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert wall <= BUDGET_MIN * 60 + SLACK_S, wall
    lines = r.stdout.splitlines()
    assert 'machine: python' in lines[1] and 'torch' in lines[1] and 'timm' in lines[1] and 'gpu' in lines[1]
    assert any(f'from {tree / "ldae_models"}' in line for line in lines)  # this copy, not the installed package

    files = [p for p in out.rglob('*') if p.is_file()]
    assert 1 <= len(files) <= 8 and all(p.stat().st_size <= 16 << 20 for p in files)
    assert all(len(p.relative_to(out).parts) <= 2 and all(re.fullmatch(r'[A-Za-z0-9._-]+', s)
                                                          for s in p.relative_to(out).parts) for p in files)
    res = json.loads((out / 'results.json').read_text())
    assert set(res['runs']) == {'base', 'd4', 'long', 'pixel_noise'} and res['best_recipe'] in ('base', 'd4')
    for name in ('base', 'd4'):
        assert res['runs'][name]['train']['returncode'] == 0 and 0 <= res['runs'][name]['probe']['top1'] <= 100
    assert {'random_same_shape', 'raw_pixels'} <= set(res['floors'])
    assert (out / 'results.md').is_file() and '| floor: raw_pixels |' in (out / 'results.md').read_text()

    # the long run, stopped by the budget, left its weights: from its checkpoint, in float16 shards
    long = res['runs']['long']
    assert long['train']['returncode'] == 75 and long['weights']['from_file'] == 'ckpt_last.pth'
    index = out / long['weights']['index']
    meta = json.loads(index.read_text())['metadata']
    args = json.loads(meta['model_args'])
    enc = timm.create_model('ldae_vit_tiny_patch4_32', pretrained=True, merged=False,
                            pretrained_cfg_overlay=dict(file=str(index)), **args)
    assert enc.tokenizer.fitted and enc(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, 64)
    ckpt = torch.load(work / 'runs' / 'long' / 'ckpt_last.pth', weights_only=True)
    assert int(meta['step']) == ckpt['step'] > 0
