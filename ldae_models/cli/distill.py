"""``ldae-models distill``: RepFusion, a diffusion teacher distilled into a timm student (``jobs/repfusion/``)."""
import argparse

from .common import add_config_args, config_from, given_fields, say


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..jobs.recipes import DISTILL_RECIPES
    from ..jobs.repfusion import DistillConfig
    p = sub.add_parser('distill', help="RepFusion: distil a diffusion teacher's features into a timm student",
                       description='Distil a teacher of the zoo at (layer, t) into any timm student, t chosen by a '
                                   'fixed, random or learned (REINFORCE) policy, then fine-tune the student on the '
                                   "labels and report its top-1 on the test split. Each flag is a field of "
                                   'DistillConfig (ldae_models/jobs/repfusion/run.py).')
    p.add_argument('--recipe', choices=list(DISTILL_RECIPES), help="a recipe of ldae_models/jobs/recipes.py "
                   "(repfusion_cifar10: the official CIFAR-10 run); flags override its values")
    add_config_args(p, DistillConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..jobs.repfusion import DistillConfig, distill
    if args.recipe:
        from ..jobs.recipes import distill_config
        cfg = distill_config(args.recipe, **given_fields(DistillConfig, args))
    else:
        cfg = config_from(DistillConfig, args)
    result = distill(cfg)
    line = f"done: the student is {result['student']} (timm.create_model('local-dir:{result['student']}', " \
           f"pretrained=True))"
    if result.get('student_top1') is not None:
        line += f"; test top-1 {result['student_top1']:.2f}%"
        if result.get('scratch_top1') is not None:
            line += f" (the same student from scratch: {result['scratch_top1']:.2f}%)"
    say(line)
    return 0
