"""Probes: the fast linear probe reaches the optimum (against an L-BFGS reference), kNN, floors; MAE's protocol as a
run of the engine (``ldae-models linprobe``), resumed exactly."""
import pytest
import timm
import torch

import ldae_models
from ldae_models.data import ImageData
from ldae_models.probe import check_against_lbfgs, fit_linear_probe, knn_accuracy, pixel_features, random_counterpart
from conftest import TINY, Killed, count_step_syncs, kill_after_saves, randomize_, smooth_images


def ill_conditioned(n=3000, d=24, classes=4, seed=0, lo=-1.5, hi=1.5):
    """Gaussian classes seen through a linear map with singular values from 10^lo to 10^hi (condition number 1e6 on
    the covariance by default, like the shipped encoder's features: 7e6)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, d, generator=g)
    z = centers[y] + 2.5 * torch.randn(n, d, generator=g)  # overlapping classes, like CIFAR features
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    x = (z * torch.logspace(lo, hi, d)) @ q
    return x[:2000], y[:2000], x[2000:], y[2000:]


def test_fast_probe_reaches_the_optimum():
    xtr, ytr, xte, yte = ill_conditioned()
    check = check_against_lbfgs(xtr, ytr, xte, yte, max_iter=20000)
    # the reference converges here (thousands of iterations); the fast probe gets there in tens
    assert abs(check['top1_gap']) <= 1.0 and abs(check['fast_objective'] - check['lbfgs_objective']) < 2e-3
    assert check['lbfgs_iterations'] > 20 * fit_linear_probe(xtr, ytr, xte, yte)['iterations']
    # worse conditioned (1e10): the reference stops short of the optimum; the fast probe does not
    harsh = check_against_lbfgs(*ill_conditioned(lo=-3, hi=2), max_iter=20000)
    assert harsh['fast_objective'] < harsh['lbfgs_objective']
    adam = fit_linear_probe(xtr, ytr, xte, yte, solver='adam', epochs=200, lr=1e-2, batch_size=256)
    assert adam['objective'] < check['fast_objective'] + 5e-3 and abs(adam['top1'] - check['fast_top1']) <= 1.0
    plain = fit_linear_probe(xtr, ytr, xte, yte, whiten=False, max_iter=50)  # few iterations, no whitening: far off
    assert plain['objective'] > check['fast_objective'] + 1e-2


def test_probe_head_is_maes_and_reproduces_the_accuracy():
    xtr, ytr, xte, yte = ill_conditioned(seed=1)
    r = fit_linear_probe(xtr, ytr, xte, yte)
    head = r['head']
    assert isinstance(head.bn, torch.nn.BatchNorm1d) and not head.bn.affine
    with torch.no_grad():
        assert 100 * (head(xte).argmax(1) == yte).float().mean().item() == pytest.approx(r['top1'], abs=0.11)
    with pytest.raises(ValueError, match='solver'):
        fit_linear_probe(xtr, ytr, xte, yte, solver='sgd')


def test_knn():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 4
    y = torch.randint(0, 5, (600,), generator=g)
    x = centers[y] + torch.randn(600, 16, generator=g)
    assert knn_accuracy(x[:500], y[:500], x[500:], y[500:], k=20) > 95
    assert knn_accuracy(torch.randn(500, 16, generator=g), y[:500], x[500:], y[500:]) < 50


def test_floors():
    enc = timm.create_model('ldae_vit_tiny_patch4_32', merged=False, **TINY)
    floor = random_counterpart(enc)
    assert isinstance(floor, timm.models.VisionTransformer) and floor.embed_dim == 32 and len(floor.blocks) == 2
    assert floor.blocks[0].attn.proj.weight.abs().sum() > 0  # timm's init: the blocks are active, not the identity
    unet = timm.create_model('ddae_ddpm_cifar10_32', base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                             norm_groups=8, out_k=2)
    assert type(random_counterpart(unet)) is type(unet)
    images = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    data = ImageData(images, torch.zeros(3, dtype=torch.long), ('a',))
    assert pixel_features(data).shape == (3, 3 * 32 * 32)  # 64 x 64 pooled to fit 3072 values
    small = ImageData(images[:, :, :32, :32].contiguous(), torch.zeros(3, dtype=torch.long), ('a',))
    assert torch.allclose(pixel_features(small), (small.images.float() / 255 * 2 - 1).flatten(1))


def trained_encoder_folder(tmp_path):
    """A tiny l-DAE encoder with a fitted tokenizer and random weights, as a local-dir: folder."""
    from ldae_models.hub.publish import save_pretrained
    torch.manual_seed(0)
    dae = ldae_models.create_dae('ldae_vit_tiny_patch4_32', **TINY)
    dae.fit_tokenizer([smooth_images(8, seed=s) for s in range(3)])
    randomize_(dae, seed=2)
    enc = timm.create_model('ldae_vit_tiny_patch4_32', merged=False, **TINY)
    enc.load_state_dict(dae.encoder.state_dict())
    return save_pretrained(enc, tmp_path / 'enc')


def test_mae_protocol_is_maes_and_runs_on_the_engine(folder, tmp_path, monkeypatch):
    from ldae_models.jobs.linprobe import LinProbeConfig, linprobe
    cfg = LinProbeConfig()
    assert (cfg.epochs, cfg.warmup_epochs, cfg.batch_size, cfg.blr, cfg.opt, cfg.aug, cfg.rrc_scale,
            cfg.weight_decay) == (90, 10, 16384, 0.1, 'lars', 'rrc', [0.08, 1.0], 0.0)
    import ldae_models.engine.loop as L
    made = []
    real = L.build_optimizer
    monkeypatch.setattr(L, 'build_optimizer', lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    enc = f'local-dir:{trained_encoder_folder(tmp_path)}'
    for noisy in (False, True):
        r = linprobe(LinProbeConfig(model=enc, data_root=str(folder), out=str(tmp_path / f'lp{noisy}'), epochs=2,
                                    warmup_epochs=1, batch_size=16, accum_steps=2, noisy_input=noisy, workers=0,
                                    quiet=True))
        assert 0 <= r['top1'] <= 100 and r['steps'] == 4 and r['lr'] == pytest.approx(0.1 * 16 / 256)
        assert r['n_test'] == 16 and (tmp_path / f'lp{noisy}' / 'head.safetensors').is_file()
    opt = made[-1]
    assert type(opt).__name__ == 'Lars' and opt.defaults['trust_coeff'] == 0.001 and opt.defaults['momentum'] == 0.9
    # MAE's LARS adapts the weight matrix; the bias (1-D) is left alone (util/lars.py: p.ndim > 1)
    assert sorted((g['always_adapt'], g['weight_decay'], tuple(p.ndim for p in g['params']))
                  for g in opt.param_groups) == [(False, 0.0, (1,)), (True, 0.0, (2,))]


def test_lars_adapts_the_weight_matrix_only():
    """MAE's util/lars.py: the trust ratio on matrices; biases (1-D) take plain momentum steps."""
    from ldae_models.engine import build_optimizer
    from ldae_models.jobs.linprobe import LinProbeConfig
    from ldae_models.probe import LinearProbeHead
    torch.manual_seed(0)
    head = LinearProbeHead(8, 3)
    with torch.no_grad():
        head.fc.weight.normal_()
        head.fc.bias.normal_()
    w0, b0 = head.fc.weight.clone(), head.fc.bias.clone()
    opt = build_optimizer(head, LinProbeConfig(), 0.5, torch.device('cpu'))
    head(torch.randn(16, 8)).square().sum().backward()
    gw, gb = head.fc.weight.grad.clone(), head.fc.bias.grad.clone()
    opt.step()
    assert torch.allclose(head.fc.bias, b0 - 0.5 * gb, atol=1e-6)  # no trust ratio on the bias
    trust = 0.001 * w0.norm() / gw.norm()
    assert torch.allclose(head.fc.weight, w0 - 0.5 * trust * gw, rtol=1e-4, atol=1e-7)


def test_mae_probe_resumes_exactly(folder, tmp_path, monkeypatch):
    """MAE's probe is a run of the engine: a death after a checkpoint resumes to the uninterrupted head."""
    from safetensors.torch import load_file
    from ldae_models.jobs.linprobe import LinProbeConfig, linprobe
    enc = f'local-dir:{trained_encoder_folder(tmp_path)}'
    cfg = lambda out, **k: LinProbeConfig(model=enc, data_root=str(folder), out=str(out), epochs=3,  # noqa: E731
                                          warmup_epochs=1, batch_size=8, workers=0, ckpt_every=2, quiet=True, **k)
    full = linprobe(cfg(tmp_path / 'full'))
    with monkeypatch.context() as m:
        kill_after_saves(m, 2)
        with pytest.raises(Killed):
            linprobe(cfg(tmp_path / 'cut'))
    cut = linprobe(cfg(tmp_path / 'cut', resume=True))
    a, b = load_file(str(tmp_path / 'full/head.safetensors')), load_file(str(tmp_path / 'cut/head.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a) and full['top1'] == cut['top1']


def test_the_grid_plot_wraps_a_long_title(tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    import matplotlib.axes
    from ldae_models.plots import plot_grid
    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, 'set_title', lambda self, t, *a, **k: titles.append(t) or real(self, t, *a, **k))
    long = 'ldae_vit_tiny_patch4_32.cifar10: linear probe top-1 (%) on CIFAR-10, clean input'
    plot_grid({(b, t): 50.0 + b for b in (3, 11) for t in (0, 10)}, str(tmp_path / 'g.png'), title=long)
    assert (tmp_path / 'g.png').is_file() and '\n' in titles[-1] and titles[-1].replace('\n', ' ') == long


def test_a_mae_probe_step_never_waits_for_the_host(folder, tmp_path, monkeypatch):
    from ldae_models.jobs.linprobe import LinProbeConfig, linprobe
    enc = f'local-dir:{trained_encoder_folder(tmp_path)}'
    counts = count_step_syncs(monkeypatch, lambda: linprobe(LinProbeConfig(
        model=enc, data_root=str(folder), out=str(tmp_path / 'lp'), epochs=3, warmup_epochs=1, batch_size=8,
        accum_steps=2, workers=0, quiet=True, log_every=100, ckpt_every=100, nan_check_every=100)))
    assert {s: counts.get(s, []) for s in range(1, 14)} == {s: [] for s in range(1, 14)}
