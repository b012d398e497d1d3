"""Recipes as data: each resolves to the values its table states, flags override it, the micro-batch is planned from
the measured activation memory, and bad input is named."""
import json

import pytest

from ldae_models.jobs import memory as M, recipes as R
from ldae_models.cli import main


@pytest.mark.parametrize('name', R.RECIPES)
def test_each_recipe_resolves_to_its_table(name):
    cfg = R.train_config(name)
    sources = cfg.provenance
    for field, setting in R.RECIPES[name].items():
        assert getattr(cfg, field) == setting.value and sources[field] == setting.source
    assert sources['adamw_betas'].startswith('ours')
    assert all(s.source.startswith(('App.', 'Sec.', 'ours', 'ImageNet')) for s in R.RECIPES[name].values())


def test_the_paper_recipes_are_app_a():
    cfg = R.train_config('ldae_vit_b_in1k')
    assert (cfg.batch_size, cfg.blr, cfg.weight_decay, cfg.epochs, cfg.warmup_epochs, cfg.aug) == (
        2048, 1e-4, 0.0, 400, 100, 'center')
    assert R.train_config('ldae_vit_large_in1k').model == 'ldae_vit_large_patch16_256'


def test_flags_override_and_the_micro_batch_is_planned():
    cfg = R.train_config('ldae_vit_b_in1k', world=8, epochs=800)
    sources = cfg.provenance
    assert cfg.epochs == 800 and sources['epochs'] == 'flag'
    # ViT-B on 80 GB: 409 MiB an image, so 128 of the 256 per GPU fit without checkpointing: 2 micro-batches
    assert (cfg.accum_steps, cfg.grad_checkpointing) == (2, False) and 'micro-batch 128 of 256' in sources['accum_steps']
    plan = M.plan_memory('ldae_vit_large_patch16_256', 2048, 8, 40)  # ViT-L on 40 GB: 17 fit plain, so checkpoint
    assert (plan['micro_batch'], plan['accum_steps'], plan['grad_checkpointing']) == (256, 1, True)
    assert plan['planned_gb'] <= 40 * M.GPU_MEM_MARGIN
    plan = M.plan_memory('ldae_vit_base_patch16_256', 2048, 1, 80, micro_batch=64)  # fixed: 32 accumulated
    assert (plan['micro_batch'], plan['accum_steps'], plan['grad_checkpointing']) == (64, 32, False)
    cfg = R.train_config('ldae_vit_b_in1k', accum_steps=4)  # an explicit accumulation is kept as it is
    assert cfg.accum_steps == 4 and not cfg.grad_checkpointing


@pytest.mark.parametrize('kwargs, message', [
    (dict(name='ldae_vit_xl_in1k'), "unknown recipe 'ldae_vit_xl_in1k'; the recipes are: ldae_vit_b_in1k"),
    (dict(name='ldae_vit_b_in1k', micro_batch=48), '--micro-batch 48 does not divide the per-process batch of --batch-size 2048'),
    (dict(name='ldae_vit_large_in1k', gpu_mem_gb=10), '--gpu-mem-gb 10 is too small for ldae_vit_large_patch16_256'),
    (dict(name='ldae_vit_b_in1k', world=3), '--batch-size 2048 is not divisible by the 3 processes'),
])
def test_bad_input_is_named(kwargs, message):
    name = kwargs.pop('name')
    with pytest.raises(ValueError, match=message):
        R.train_config(name, **kwargs)


def test_the_command_line_prints_and_saves_the_resolved_config(folder, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['train', '--recipe', 'ldae_vit_tiny_cifar10', '--dataset', 'folder', '--data-root', str(folder),
                 '--out', str(out), '--model-args', json.dumps(dict(img_size=16, depth=2, latent_dim=6)),
                 '--batch-size', '8', '--max-steps', '2', '--pca-images', '40', '--workers', '0', '--quiet']) == 0
    saved = json.loads((out / 'config.json').read_text())
    assert saved['blr'] == 1.2e-3 and saved['batch_size'] == 8 and saved['max_steps'] == 2
    assert saved['provenance']['blr'].startswith("ours: the shipped checkpoint's run")
    assert saved['provenance']['batch_size'] == 'flag' and saved['provenance']['dataset'] == 'flag'
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first['event'] == 'config' and first['provenance']['weight_decay'] == 'App. A'


def test_recipe_table_lists_every_recipe_and_source():
    table = R.recipe_table()
    assert all(f'`{n}`' in table for n in R.RECIPES) and 'App. A' in table and table.count('\n') > 8


def test_a_zero_on_the_command_line_is_kept():
    """Flags default to None so that the given ones are known; a given 0 is a value, not "not given"."""
    from ldae_models.cli import build_parser
    from ldae_models.cli.common import config_from
    from ldae_models.jobs.pretrain import TrainConfig
    cfg = config_from(TrainConfig, build_parser().parse_args(['train', '--epochs', '0', '--max-steps', '3',
                                                          '--weight-decay', '0', '--workers', '0']))
    assert (cfg.epochs, cfg.max_steps, cfg.weight_decay, cfg.workers) == (0, 3, 0.0, 0)
