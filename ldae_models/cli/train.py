"""``ldae-models train``: pre-train an l-DAE (or a DDAE UNet), from the flags or a recipe (``jobs/pretrain.py``)."""
import argparse
import os

from .common import add_config_args, add_micro_batch, at_least, given_fields, say, with_micro_batch


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..jobs.pretrain import TrainConfig
    from ..jobs.recipes import RECIPES
    p = sub.add_parser('train', help='train an l-DAE (or a DDAE UNet)', description='Train with a TrainConfig (each '
                       'flag is a field; torchrun or srun runs it on many GPUs). See ldae_models/jobs/pretrain.py.')
    p.add_argument('--recipe', choices=list(RECIPES), help="a recipe of ldae_models/jobs/recipes.py (the paper's "
                   'runs, every value with its source); the other flags override it')
    p.add_argument('--gpu-mem-gb', type=at_least(1, float), default=80.0,
                   help="with --recipe: each GPU's memory, for the micro-batch (default: %(default)s)")
    add_micro_batch(p)
    add_config_args(p, TrainConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..jobs.pretrain import TrainConfig, train
    given = given_fields(TrainConfig, args)
    if args.recipe:
        from ..jobs.recipes import train_config
        cfg = train_config(args.recipe, gpu_mem_gb=args.gpu_mem_gb, world=int(os.environ.get('WORLD_SIZE', '1')),
                           micro_batch=args.micro_batch, **given)
    else:
        cfg = with_micro_batch(TrainConfig(**given), args.micro_batch)
    result = train(cfg)
    if result.weights:
        say(f'done: {result.step} steps; weights {result.weights}')
    return 0
