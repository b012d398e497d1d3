"""The command line: ``ldae-models COMMAND`` (also ``python -m ldae_models``), the one argparse front end.

    ldae-models demo                          # the shipped CIFAR-10 model: features + denoising figure
    ldae-models features --layers 5 11 --ts 0 10 80 --noisy-input --out feats.safetensors
    ldae-models train --dataset cifar10 --data-root ~/data --out runs/tiny --epochs 400
    ldae-models extract --model NAME.TAG --dataset cifar10 --data-root ~/data --out feats/   # shards, any (layers, t)
    ldae-models probe --model NAME.TAG --dataset cifar10 --data-root ~/data --floors         # linear + kNN
    ldae-models list | info NAME | convert SRC DST | export NAME DST

A mistake (a missing file, an unknown model, a bad argument) is answered with one line naming it and exit status 2;
``--debug`` (or ``LDAE_MODELS_DEBUG=1``) shows the traceback instead.
"""
import argparse
import os
import sys
import typing
from typing import List, Optional

from .args import DEFAULT_MODEL, _add_config_args, _at_least, _config, _given, _json_object  # noqa: F401
from .commands import (cmd_convert, cmd_demo, cmd_denoise, cmd_distill, cmd_export, cmd_extract, cmd_features,
                       cmd_info, cmd_list, cmd_probe, cmd_train)

__all__ = ['main', 'build_parser', 'DEFAULT_MODEL']

_USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)  # ImportError: those that say what to install


def _add_model_args(p: argparse.ArgumentParser, default: Optional[str] = DEFAULT_MODEL) -> None:
    p.add_argument('--model', default=default, required=default is None,
                   help='timm name, NAME.TAG, local-dir:PATH or hf-hub:ORG/NAME' +
                        (' (default: %(default)s, shipped inside the package)' if default else ''))
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help='load the weights the name names (default: when it carries a tag, or is hf-hub:/local-dir:)')
    p.add_argument('--checkpoint', help='your own weights file for the architecture (any layout it reads)')
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from ..data import DATASETS
    p.add_argument('--dataset', choices=DATASETS, default='folder',
                   help="folder: an ImageFolder (ROOT/train, ROOT/test or val); cifar10: torchvision's CIFAR-10 "
                        "folder; npz: arrays (default: %(default)s)")
    p.add_argument('--data-root', '--data-dir', dest='data_root', required=required,
                   help='the data set: ImageFolder root, the folder torchvision.datasets.CIFAR10(root) uses, or .npz')
    p.add_argument('--download', action='store_true', help='download CIFAR-10 where the network allows')
    p.add_argument('--workers', type=_at_least(-1), default=-1,
                   help='DataLoader workers streaming the images (-1: from the core count; 0: in this process)')



class _Parser(argparse.ArgumentParser):
    """argparse, whose refusal of a flag is one line (and where to look), not the whole usage."""

    def error(self, message: str) -> 'typing.NoReturn':
        self.exit(2, f'{self.prog}: error: {message}\n({self.prog} --help lists the flags)\n')


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog='ldae-models', description='Denoising-based self-supervised encoders for timm.')
    ap.add_argument('--debug', action='store_true', help='show the traceback of an error')
    sub = ap.add_subparsers(dest='command', required=True)

    p = sub.add_parser('features', help='extract pooled features of images',
                       description='Extract pooled encoder features of images (default: sample photos shipped with '
                                   'matplotlib) at chosen layers and timesteps, print and save them.')
    _add_model_args(p)
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, help="the encoder's fixed t (default: the one it was trained for)")
    p.add_argument('--layers', type=int, nargs='+', help='0-based block indices (default: the last)')
    p.add_argument('--ts', type=float, nargs='+', help='timesteps to tap (default: the fixed t)')
    p.add_argument('--noisy-input', action='store_true', help="add the model's training noise at each t first")
    p.add_argument('--seed', type=int, default=0, help='seed of the noise')
    p.add_argument('--out', help='save the features to this .safetensors file')
    p.set_defaults(func=cmd_features)

    p = sub.add_parser('denoise', help='denoising figure of a trained l-DAE', description="Write the paper's Fig. 8 "
                       'for a trained DAE: clean / latent-noised / denoised, one row per image, with MSEs.')
    p.add_argument('--model', default=DEFAULT_MODEL, help='l-DAE size or NAME.TAG (default: %(default)s)')
    p.add_argument('--checkpoint', help='full-DAE weights (OUT/model.safetensors of ldae-models train)')
    p.add_argument('--model-args', help='JSON object of model keyword arguments')
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, default=500, help='noise level as a timestep (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='denoising.png', help='output PNG (default: %(default)s)')
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser('demo', help='the shipped model at work: features and a denoising figure',
                       description='Load the l-DAE shipped inside the package (offline), extract pooled features of '
                                   "sample photos (matplotlib's, or --images) at blocks 5 and 11 and t = 0, 10, 80, "
                                   'save them, and write the denoising figure (clean / noised / denoised).')
    p.add_argument('--model', default=DEFAULT_MODEL, help='l-DAE NAME.TAG with full-DAE weights (default: %(default)s)')
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, default=500, help='noise level of the figure (default: %(default)s)')
    p.add_argument('--out-dir', default='.', help='where features.safetensors and denoising.png go (default: .)')
    p.set_defaults(func=cmd_demo)

    from ..train import TrainConfig
    p = sub.add_parser('train', help='train an l-DAE (or a DDAE UNet)', description='Train with a TrainConfig (each '
                       'flag is a field; torchrun runs it on many GPUs). See ldae_models/train.py.')
    from ..recipes import RECIPES
    p.add_argument('--recipe', choices=list(RECIPES), help='a recipe of ldae_models/recipes.py (the paper\'s runs, '
                   'every value with its source); the other flags override it')
    p.add_argument('--gpu-mem-gb', type=_at_least(1, float), default=80.0,
                   help="with --recipe: each GPU's memory, for the micro-batch (default: %(default)s)")
    p.add_argument('--micro-batch', type=_at_least(1), default=0,
                   help='images per GPU per forward pass; the global batch is accumulated (default: planned by '
                        '--recipe, else --batch-size / processes)')
    _add_config_args(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    from ..distill import DistillConfig
    p = sub.add_parser('distill', help="RepFusion: distil a diffusion teacher's features into a timm student",
                       description='Distil a teacher of the zoo at (layer, t) into any timm student, t chosen by a '
                                   'fixed, random or learned (REINFORCE) policy, then fine-tune the student on the '
                                   'labels. Each flag is a field of DistillConfig (ldae_models/distill.py).')
    from ..recipes import DISTILL_RECIPES
    p.add_argument('--recipe', choices=list(DISTILL_RECIPES), help="a recipe of ldae_models/recipes.py "
                   "(repfusion_cifar10: the official CIFAR-10 run); flags override its values")
    _add_config_args(p, DistillConfig)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser('extract', help="write a data set's features to safetensors shards",
                       description='Extract pooled features of every image of a data set at chosen (layers, t) and '
                                   'write them as safetensors shards with an index (probe --features reads them).')
    _add_model_args(p, default=None)
    _add_data_args(p)
    p.add_argument('--splits', nargs='+', default=['train', 'test'], choices=['train', 'test'])
    p.add_argument('--full', action='store_true', help='the whole model (an l-DAE\'s decoder blocks too)')
    p.add_argument('--layers', type=int, nargs='+', help='0-based layers (default: the last)')
    p.add_argument('--ts', type=float, nargs='+', help='timesteps (default: the model\'s t)')
    p.add_argument('--noisy-input', action='store_true', help="noise the input at each t (default: the model's)")
    p.add_argument('--max-train', type=_at_least(0), default=0, help='a seeded subset of the train split (0: all)')
    p.add_argument('--max-test', type=_at_least(0), default=0)
    p.add_argument('--batch-size-features', type=_at_least(1), default=512, help='images per forward pass')
    p.add_argument('--shard-size', type=_at_least(1), default=50_000, help='rows per shard file')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--seed', type=int, default=0, help='seed of the subsets and the noise')
    p.add_argument('--out', required=True, help='output folder (OUT/train, OUT/test)')
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser('probe', help='linear-probe an encoder', description='Linear probe (and kNN) of an encoder on '
                       'a data set. fast (default): features once, the convex problem solved by L-BFGS; grid: every '
                       "(layer, t); mae: MAE's protocol (augmented, LARS, 90 epochs). --floors adds a random network of "
                       'the same shape and the raw pixels, measured in the same run.')
    _add_model_args(p, default=None)
    _add_data_args(p, required=False)
    p.add_argument('--mode', choices=('fast', 'grid', 'mae'), default='fast')
    p.add_argument('--full', action='store_true', help='probe the whole model (an l-DAE\'s decoder blocks too: layer '
                   'E + k is decoder block k); --checkpoint is then a whole-model file')
    p.add_argument('--features', help='feature folder (ldae-models extract): read when it holds these features, '
                                      'written otherwise')
    p.add_argument('--t', type=float, help="the encoder's t (default: the one it was trained for)")
    p.add_argument('--layers', type=int, nargs='+', help='layers (default: fast/mae the last, grid all)')
    p.add_argument('--ts', type=float, nargs='+', help='timesteps (default: the model\'s t)')
    p.add_argument('--noisy-input', action='store_true', help="noise the input at t (the paper's \"noisy input\")")
    from ..probe import SOLVERS
    p.add_argument('--solver', choices=SOLVERS, default='lbfgs', help='fast/grid (default: %(default)s)')
    p.add_argument('--weight-decay', type=_at_least(0, float), default=0.0,
                   help="L2 penalty of the probe (default: none, as MAE's probe and probe.linear_probe; a small penalty "
                        'such as 1e-4 makes the optimum unique where the train features are separable)')
    p.add_argument('--check-lbfgs', action='store_true', help='with --solver adam: also solve by L-BFGS and print both')
    p.add_argument('--knn', action=argparse.BooleanOptionalAction, default=True, help='kNN (k=20, cosine) too')
    p.add_argument('--floors', action='store_true', help='also probe a random network of the same shape and raw pixels')
    p.add_argument('--epochs', type=_at_least(1), default=90, help='adam: epochs; mae: epochs (MAE: 90) (default: %(default)s)')
    p.add_argument('--lr', type=_at_least(0, float), default=1e-3, help='adam: lr (default: %(default)s)')
    p.add_argument('--warmup-epochs', type=_at_least(0), default=10, help='mae: warmup epochs (MAE: 10)')
    p.add_argument('--batch-size', type=_at_least(1), default=16384, help='mae: batch (MAE: 16384), accumulated')
    p.add_argument('--micro-batch', type=_at_least(1), default=1024, help='mae: images per forward pass')
    p.add_argument('--blr', type=_at_least(0, float), default=0.1, help='mae: base lr, lr = blr * batch / 256 (MAE: 0.1)')
    p.add_argument('--batch-size-features', type=_at_least(1), default=512, help='images per forward pass of extraction')
    p.add_argument('--max-train', type=_at_least(0), default=0, help='a seeded subset of the train split (0: all)')
    p.add_argument('--max-test', type=_at_least(0), default=0)
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='write the result as JSON here')
    p.add_argument('--plot', help='grid: write the heat map here (PNG)')
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser('list', help='list models and pretrained tags', description='List the zoo\'s models and their '
                       'pretrained tags, marking the tags whose weights are on this machine.')
    p.add_argument('pattern', nargs='?', default='*', help='wildcard (default: all)')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('info', help='describe a model', description="Print a model's configuration, sizes and weight "
                       'source.')
    p.add_argument('name', help='model name, alias or NAME.TAG')
    p.set_defaults(func=cmd_info)

    p = sub.add_parser('convert', help='convert a checkpoint to safetensors', description='Read a checkpoint safely '
                       '(safetensors, or torch.load with weights_only) in any supported layout and write safetensors.')
    p.add_argument('src', help='input checkpoint (.safetensors, .pt, .pth, .bin, training checkpoint)')
    p.add_argument('dst', help='output .safetensors file')
    p.add_argument('--model', help="convert through this model's filter and check that every key fits it")
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')
    p.add_argument('--no-ema', action='store_true', help="take a training checkpoint's model weights, not its EMA")
    p.add_argument('--full', '--dae', action='store_true', help='the file holds the whole model (an l-DAE: decoder and '
                   'PCA tokenizer too): keep it all, checked by a strict load into the whole --model')
    p.add_argument('--dtype', choices=['float32', 'float16', 'bfloat16'],
                   help="store floating-point tensors in this type (loading casts back to the model's)")
    p.add_argument('--keep', nargs='*', metavar='GLOB', help='keys that keep their dtype under --dtype (default: '
                   '*tokenizer.* *pos_embed, the PCA statistics and the fixed sin-cos positions)')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('export', help='export a merged encoder as a plain timm checkpoint',
                       description='Merge an encoder at a fixed t and save it as a folder (model.safetensors, '
                                   'config.json, README.md) that timm loads without ldae_models.')
    p.add_argument('name', help='NAME.TAG, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('dst', help='output folder')
    p.add_argument('--t', type=float, help='timestep folded into the weights (default: the encoder\'s own)')
    p.add_argument('--checkpoint', help='weights file to load into NAME first')
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')
    p.add_argument('--allow-random', action='store_true', help='export even when no weights are named')
    p.set_defaults(func=cmd_export)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv  # accepted anywhere on the line
    args = build_parser().parse_args([a for a in argv if a != '--debug'])
    debug = debug or os.environ.get('LDAE_MODELS_DEBUG', '') not in ('', '0')
    from ..engine import PREEMPTED_EXIT_CODE, Preempted
    try:
        return args.func(args)
    except Preempted as e:  # SIGTERM / SIGUSR1: the checkpoint is written; a requeue resumes with --resume
        print(f'ldae-models {args.command}: {e}', file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except BrokenPipeError:  # the reader went away (`ldae-models list | head`): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, 'w')
        return 0
    except _USER_ERRORS as e:
        if debug or (isinstance(e, ImportError) and 'pip install' not in str(e)):
            raise
        print(f'ldae-models {args.command}: error: {e}\n(--debug shows the traceback)', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
