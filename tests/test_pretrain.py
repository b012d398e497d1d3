"""The pre-training job (``jobs/pretrain.py``): the l-DAE's tokenizer and loss in float32 under autocast, the DDPM
objective of a UNet, the single-level ablation's encoder, the recipes' memory plan on a GPU, the denoising figure of a
trained run."""
import json

import timm
import torch
from safetensors.torch import load_file

import ldae_models
from ldae_models.cli import main
from ldae_models.jobs import pretrain as T
from conftest import TINY, randomize_, rel_err, smooth_images, tiny_config

TINY_ARGS = json.dumps(dict(img_size=16, embed_dim=32, depth=2, num_heads=2, latent_dim=6))


def test_tokenizer_and_loss_stay_float32_under_autocast():
    """Under bf16 autocast the PCA tokenizer and the loss compute in float32: the noisy input at t = 5 (noise smaller
    than bf16's rounding of a pixel) and the loss are exactly those of float32."""
    torch.manual_seed(0)
    dae = ldae_models.LatentDAE(**TINY)
    dae.fit_tokenizer([smooth_images(8, seed=s) for s in range(3)])
    randomize_(dae, seed=3)
    x, t = smooth_images(4, seed=9), torch.full((4,), 5.0)
    noise = torch.randn(4, 16, 6)
    ref_noisy = dae.noise_input(x, t, noise=noise)[0]
    pred = dae._denoise(ref_noisy, t)
    ref_loss = dae.compute_loss(pred, x, noise, t)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        noisy = dae.noise_input(x, t, noise=noise)[0]
        loss = dae.compute_loss(pred.bfloat16(), x, noise, t)
    assert noisy.dtype == torch.float32 and torch.equal(noisy, ref_noisy)
    assert loss.dtype == torch.float32 and rel_err(loss, ref_loss) < 1e-2  # only pred's bf16 rounding remains
    assert (ref_noisy - x).abs().max() < 2.0


def test_ddpm_objective_for_a_unet(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path / 'unet', model='ddae_ddpm_cifar10_32', max_steps=3, warmup_epochs=0, lr=1e-3,
                      ema=0, model_args=dict(img_size=16, base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                             norm_groups=4, attn_resolutions=[8], out_k=1))
    res = T.train(cfg)
    assert res.step == 3 and res.last['loss'] > 0
    assert 'up.0.blocks.0.res.conv1.weight' in load_file(str(res.weights))


def test_single_level_encoder_carries_its_t(folder, tmp_path):
    """The single-level ablation trains at t = 408; its exported encoder defaults to that t, not 10."""
    T.train(tiny_config(folder, tmp_path / 'single', schedule='single', max_steps=2))
    enc = timm.create_model(f'local-dir:{tmp_path / "single/encoder"}', pretrained=True)
    assert enc.t == 408 and enc.schedule.name == 'single'
    cfg = json.loads((tmp_path / 'single/encoder/config.json').read_text())
    assert cfg['model_args']['t'] == 408 and cfg['model_args']['schedule'] == 'single'


def test_the_denoising_figure_of_a_trained_run(folder, tmp_path):
    T.train(tiny_config(folder, tmp_path / 'run', max_steps=2))
    img = next((folder / 'test' / 'class0').iterdir())
    assert main(['denoise', '--checkpoint', str(tmp_path / 'run/model.safetensors'), '--model-args', TINY_ARGS,
                 '--images', str(img), str(img), '--out', str(tmp_path / 'fig.png')]) == 0
    assert (tmp_path / 'fig.png').stat().st_size > 5000


def test_the_planned_memory_is_logged_beside_the_measured_peak_on_a_gpu():
    """What the first steps of a GPU run log (here without a GPU: the plan itself): DDP's gradient buckets and the
    bf16 weight copies are in the plan."""
    from ldae_models.jobs import memory as M
    params = M.param_count('ldae_vit_large_patch16_256')
    one, eight = M.static_bytes(params, ema=False, world=1), M.static_bytes(params, ema=False, world=8)
    assert one == params * 18 and eight == params * 22  # 16 (fp32 weights, grads, 2 moments) + 2 (bf16) + 4 (DDP)
    obj = T.DenoisingObjective(T.build_model(T.TrainConfig(model='ldae_vit_tiny_patch4_32')),
                               T.TrainConfig(model='ldae_vit_tiny_patch4_32'))
    assert obj.planned_memory_gb(64, 8, False) == M.planned_gb('ldae_vit_tiny_patch4_32', 64, 8, False, False) > 0
