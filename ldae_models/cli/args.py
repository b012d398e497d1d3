"""The command line's arguments: the config dataclasses as flags (one flag per field, its help the field's reason) and
the parsers of flag values."""
import argparse
import dataclasses
import json
import typing
from typing import Any, Dict, Optional

DEFAULT_MODEL = 'ldae_vit_tiny_patch4_32.cifar10'  # shipped inside the package: works offline


def _json_object(text: Optional[str], flag: str = '--model-args') -> Dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'{flag} is not valid JSON: {e}') from None
    if not isinstance(value, dict):
        raise ValueError(f'{flag} must be a JSON object, e.g. \'{{"depth": 6}}\'')
    return value


def _at_least(low: float, kind: type = int):
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


def _add_config_args(p: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per field of a config dataclass, its help the field's reason."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = '--' + f.name.replace('_', '-')
        meta = dict(f.metadata)
        if meta.get('cli') is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        base = typing.get_origin(kind) or kind
        helptext = meta.get('help', '') + (f' (default: {default})' if default not in (None, '', False) else '')
        # every flag defaults to None (a switch to False): the flags given are known, and a recipe keeps the rest
        if f.name == 'data_root':
            p.add_argument(flag, '--data-dir', dest=f.name, default=None, help=helptext)
        elif base is bool:
            p.add_argument(flag, action='store_true', help=meta.get('help', ''))
        elif base is dict:
            p.add_argument(flag, type=lambda s, n=flag: _json_object(s, n), default=None, help=helptext)
        elif base in (list, tuple):
            p.add_argument(flag, type=typing.get_args(kind)[0], nargs='+', default=None, help=helptext)
        else:
            p.add_argument(flag, type=base, default=None, choices=meta.get('choices'), help=helptext)


def _given(config_cls: type, args: argparse.Namespace) -> Dict[str, Any]:
    """The fields of ``config_cls`` that the command line set (a switch: when on)."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config_cls)
             if f.metadata.get('cli') is not False}
    return {k: v for k, v in given.items() if v is not None and v is not False}  # not `in`: 0 == False


def _config(config_cls: type, args: argparse.Namespace) -> Any:
    """The config dataclass the flags of ``_add_config_args`` describe: the flags given, the fields' defaults."""
    return config_cls(**_given(config_cls, args))
