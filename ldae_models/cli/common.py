"""What the commands share: config dataclasses as flags (one flag per field, its help the field's reason), the model,
data and device flags, the parsers of flag values, and the one-line stage messages."""
import argparse
import dataclasses
import json
import sys
import time
import typing
from typing import Any, Dict, Optional

DEFAULT_MODEL = 'ldae_vit_tiny_patch4_32.cifar10'  # shipped inside the package: works offline


def say(message: str) -> None:
    """A line per stage of a long command (stderr, so that stdout stays the result)."""
    print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def json_object(text: Optional[str], flag: str = '--model-args') -> Dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'{flag} is not valid JSON: {e}') from None
    if not isinstance(value, dict):
        raise ValueError(f'{flag} must be a JSON object, e.g. \'{{"depth": 6}}\'')
    return value


def at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` that is >= ``low`` (the error names the bound and the value)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}') from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f'must be >= {low:g}, got {text}')
        return value
    return parse


def add_model_args(p: argparse.ArgumentParser, default: Optional[str] = DEFAULT_MODEL) -> None:
    p.add_argument('--model', default=default, required=default is None,
                   help='timm name, NAME.TAG, local-dir:PATH or hf-hub:ORG/NAME' +
                        (' (default: %(default)s, shipped inside the package)' if default else ''))
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help='load the weights the name names (default: when it carries a tag, or is hf-hub:/local-dir:)')
    p.add_argument('--checkpoint', help='your own weights file for the architecture (any layout it reads)')
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')


def add_data_args(p: argparse.ArgumentParser) -> None:
    from ..data import DATASETS
    p.add_argument('--dataset', choices=DATASETS, default='folder',
                   help="folder: an ImageFolder (ROOT/train, ROOT/test or val); cifar10: torchvision's CIFAR-10 "
                        "folder; npz: arrays (default: %(default)s)")
    p.add_argument('--data-root', '--data-dir', dest='data_root',
                   help='the data set: ImageFolder root, the folder torchvision.datasets.CIFAR10(root) uses, or .npz')
    p.add_argument('--download', action='store_true', help='download CIFAR-10 where the network allows')
    p.add_argument('--workers', type=at_least(-1), default=-1,
                   help='DataLoader workers streaming the images (-1: from the core count; 0: in this process)')
    p.add_argument('--skip-bad-images', action='store_true',
                   help='leave out images that cannot be read (named on stderr and in OUT/<split>/skipped_images.txt); '
                        'default: stop at the first, naming it')


def load_cli_model(args: argparse.Namespace, **kwargs: Any):
    """The model a command names: its encoder (timm's entrypoint), or with ``--full`` the whole model, in eval mode."""
    from ..models import full_model, load_model, names_weights
    checkpoint, model_args = getattr(args, 'checkpoint', None), json_object(getattr(args, 'model_args', None))
    pretrained = getattr(args, 'pretrained', None)
    if getattr(args, 'full', False):
        kwargs.pop('merged', None)
        pretrained = names_weights(args.model) if pretrained is None else pretrained
        return full_model(args.model, pretrained=pretrained and not checkpoint, checkpoint=checkpoint,
                          **model_args, **kwargs).eval()
    return load_model(args.model, pretrained=pretrained, checkpoint=checkpoint, **model_args, **kwargs).eval()


def add_config_args(p: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per field of a config dataclass, its help the field's reason; every flag defaults to None (a switch:
    off), so that the flags given are known and a recipe keeps the rest."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = '--' + f.name.replace('_', '-')
        meta = dict(f.metadata)
        if meta.get('cli') is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        base = typing.get_origin(kind) or kind
        helptext = meta.get('help', '') + (f' (default: {default})' if default not in (None, '', False, [], {})
                                           else '')
        if f.name == 'data_root':
            p.add_argument(flag, '--data-dir', dest=f.name, default=None, help=helptext)
        elif base is bool:
            p.add_argument(flag, action='store_true', help=meta.get('help', ''))
        elif base is dict:
            p.add_argument(flag, type=lambda s, n=flag: json_object(s, n), default=None, help=helptext)
        elif base in (list, tuple):
            p.add_argument(flag, type=typing.get_args(kind)[0], nargs='+', default=None, help=helptext)
        else:
            p.add_argument(flag, type=base, default=None, choices=meta.get('choices'), help=helptext)


def given_fields(config_cls: type, args: argparse.Namespace) -> Dict[str, Any]:
    """The fields of ``config_cls`` that the command line set (a switch: when on)."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config_cls)
             if f.metadata.get('cli') is not False}
    return {k: v for k, v in given.items() if v is not None and v is not False}  # not `in`: 0 == False


def config_from(config_cls: type, args: argparse.Namespace) -> Any:
    """The config dataclass the flags of ``add_config_args`` describe: the flags given, the fields' defaults."""
    return config_cls(**given_fields(config_cls, args))


def add_micro_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument('--micro-batch', type=at_least(1), default=0,
                   help='images per process per forward pass; the global batch is accumulated (default: planned by '
                        '--recipe, else --batch-size / processes)')


def with_micro_batch(cfg: Any, micro_batch: int) -> Any:
    """The config with ``accum_steps`` set from ``--micro-batch`` (the global batch kept), checked by the sampler."""
    if not micro_batch:
        return cfg
    import os
    from ..engine import accumulation_steps
    world = int(os.environ.get('WORLD_SIZE', '1'))
    return dataclasses.replace(cfg, accum_steps=accumulation_steps(cfg.batch_size, world, micro_batch))
