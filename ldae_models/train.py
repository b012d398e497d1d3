"""The compact training script: l-DAE (and its ablations) and the DDPM objective of the DDAE UNets.

One process on a CPU or GPU, or any number of GPUs and machines under torchrun (DistributedDataParallel):

    ldae-models train --model ldae_vit_tiny_patch4_32 --data-dir DATA --out runs/tiny --epochs 400
    torchrun --nproc_per_node 8 -m ldae_models.train --model ldae_vit_base_patch16_256 --data-dir IMAGENET ...

``--data-dir`` is an ImageFolder (``DIR/train/<class>/*.png``, or ``DIR/<class>/*`` directly).

Reproducible by construction: every random draw of a sample (its crop, its t and its noise) comes from a seed
made of (``--seed``, epoch, sample index), and the order of the data from (``--seed``, epoch). So a run resumed
from a checkpoint ends in exactly the state of an uninterrupted run, and N processes give the same model as one
with the same global batch (up to the order of floating-point sums). Checkpoints (``ckpt_last.pth``) are written
atomically every ``--ckpt-every`` steps and at the end; they hold only tensors and plain containers, so they load
with ``torch.load(weights_only=True)``. A non-finite loss stops the run with a message and leaves the last good
checkpoint untouched. The final weights are written as ``model.safetensors`` (the EMA weights when ``--ema``)
and, for encoders, as a ``save_pretrained`` folder ``encoder/``.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['main', 'build_parser', 'train']

CKPT_NAME = 'ckpt_last.pth'
_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed from (run seed, epoch, sample index) (splitmix-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) & _MASK


# -- data -------------------------------------------------------------------------------------------

class SeededImageFolder(torch.utils.data.Dataset):
    """ImageFolder whose items are addressed by (epoch, index) and transformed under a per-sample seed."""

    def __init__(self, root: str, transform: Any, seed: int) -> None:
        from torchvision.datasets import ImageFolder
        root_p = Path(root)
        if (root_p / 'train').is_dir():
            root_p = root_p / 'train'
        if not root_p.is_dir():
            raise SystemExit(f'--data-dir not found: {root}')
        self.folder = ImageFolder(str(root_p))
        if len(self.folder) == 0:
            raise SystemExit(f'no images found under {root_p}')
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, int, int]:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        img, label = self.folder[index]
        with torch.random.fork_rng(devices=[]):  # the transform's randomness, without touching the caller's RNG
            torch.manual_seed(s)
            img = self.transform(img)
        return img, label, s


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of (epoch, index) keys, step after step, from ``start_step``.

    Step s of epoch e takes the slice [s G, (s + 1) G) of a permutation seeded by (seed, e), G the global
    batch; rank r takes the r-th of ``world`` equal parts and splits it into ``accum`` micro-batches.
    """

    def __init__(self, n: int, global_batch: int, world: int, rank: int, accum: int, seed: int,
                 start_step: int, total_steps: int) -> None:
        if global_batch % (world * accum):
            raise SystemExit(f'--batch-size {global_batch} must be divisible by processes x accumulation '
                             f'({world} x {accum})')
        self.n, self.g, self.world, self.rank, self.accum, self.seed = n, global_batch, world, rank, accum, seed
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise SystemExit(f'--batch-size {global_batch} is larger than the dataset ({n} images)')
        self.start_step, self.total_steps = start_step, total_steps

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        while step < self.total_steps:
            epoch, s = divmod(step, self.steps_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
            for s in range(s, self.steps_per_epoch):
                if step >= self.total_steps:
                    return
                batch = perm[s * self.g:(s + 1) * self.g]
                part = self.g // self.world
                mine = batch[self.rank * part:(self.rank + 1) * part]
                micro = part // self.accum
                for a in range(self.accum):
                    yield [(epoch, i) for i in mine[a * micro:(a + 1) * micro]]
                step += 1

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum


def build_transform(img_size: int, aug: str):
    from torchvision import transforms as T
    norm = [T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]  # images in [-1, 1]
    if aug == 'rrc':  # the paper's "random resized crop" variant (ours: MAE's scale range and flip)
        return T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size), *norm])


# -- model and objective ----------------------------------------------------------------------------

def build_model(args: argparse.Namespace) -> nn.Module:
    import ldae_models
    from ldae_models.models.ddae_unet import UNET_CONFIGS, DDAEUNet
    overrides = json.loads(args.model_args) if args.model_args else {}
    if args.model in UNET_CONFIGS:
        cfg = {k: v for k, v in UNET_CONFIGS[args.model].items() if k not in ('out_k', 't')}
        return DDAEUNet(**{**cfg, 'out_k': 1, **overrides})  # the feature tap plays no part in training
    for key in ('target', 'noise_space', 'noise_levels', 'latent_dim', 'latent_scale', 'residual_weight'):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return ldae_models.create_dae(args.model, **overrides)


def draw_t_and_noise(seeds: Sequence[int], shape: Tuple[int, ...], num_timesteps: int, single_t: Optional[float]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each sample's t and noise from its own seed (so they do not depend on how the batch is split)."""
    ts, eps = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) ^ 0x5DEECE66D)
        t = torch.randint(0, num_timesteps, (1,), generator=g)
        ts.append(t.float() if single_t is None else torch.tensor([float(single_t)]))
        eps.append(torch.randn(shape, generator=g))
    return torch.cat(ts), torch.stack(eps)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel, torch.compile and the UNet's forward adapter."""
    while True:
        for attr in ('module', '_orig_mod', 'unet'):
            if isinstance(getattr(model, attr, None), nn.Module):
                model = getattr(model, attr)
                break
        else:
            return model


def compute_loss(net: nn.Module, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """The objective: l-DAE's loss for a ``LatentDAE``, DDPM's noise MSE for a UNet (``net`` may be wrapped)."""
    from ldae_models.layers.diffusion import q_sample
    from ldae_models.models.ldae_vit import LatentDAE
    inner = _unwrap(net)
    if isinstance(inner, LatentDAE):
        single = inner.encoder.t if inner.noise_levels == 'single' else None
        t, eps = draw_t_and_noise(seeds, inner.noise_shape(images), inner.num_timesteps, single)
        return net(images, t=t.to(images.device), noise=eps.to(images.device))['loss']
    t, eps = draw_t_and_noise(seeds, tuple(images.shape[1:]), inner.num_timesteps, None)
    t, eps = t.to(images.device), eps.to(images.device)
    x_t, _ = q_sample(images, t.long(), inner.abar, noise=eps)
    return F.mse_loss(net(x_t, t), eps)


class _DenoiseForward(nn.Module):
    """Makes ``denoise`` the forward of a UNet, so DDP wraps it."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet.denoise(x_t, t)


# -- schedule, checkpoints, distributed -------------------------------------------------------------

def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float = 0.0) -> float:
    """Linear warmup, then half-cycle cosine (the paper's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(path.name + '.tmp')
    torch.save(state, tmp)
    os.replace(tmp, path)


def setup_distributed() -> Tuple[int, int, torch.device]:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1:
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        dist.init_process_group(backend)
        rank = dist.get_rank()
        local = int(os.environ.get('LOCAL_RANK', '0'))
    else:
        rank, local = 0, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device('cuda', local)
    else:
        device = torch.device('cpu')
    return rank, world, device


# -- the run ----------------------------------------------------------------------------------------

def train(args: argparse.Namespace) -> Dict[str, Any]:
    from ldae_models.models.ldae_vit import LatentDAE
    rank, world, device = setup_distributed()
    is_main = rank == 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    model = build_model(args).to(device)
    is_dae = isinstance(model, LatentDAE)
    img_size = model.encoder.patch_embed.img_size[0] if is_dae else model.img_size
    dataset = SeededImageFolder(args.data_dir, build_transform(img_size, args.aug), args.seed)
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f'--batch-size {args.batch_size} is larger than the dataset ({len(dataset)} images)')
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr if args.lr else args.blr * args.batch_size / 256
    ema = None
    if args.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.ema)

    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=args.weight_decay, betas=(0.9, 0.95),
                            fused=device.type == 'cuda')
    start_step = 0
    ckpt_path = out / CKPT_NAME
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        model.load_state_dict(state['model'])
        opt.load_state_dict(state['optimizer'])
        if ema is not None and 'ema' in state:
            ema.module.load_state_dict(state['ema'])
        start_step = int(state['step'])
        if is_main:
            print(json.dumps(dict(event='resumed', step=start_step, checkpoint=str(ckpt_path))), flush=True)
    elif is_dae:  # the PCA fit is a step of the run (or loaded from a file of a fitted model)
        if args.pca_from:
            from ldae_models.pretrained import read_checkpoint, unwrap_state_dict
            sd = unwrap_state_dict(read_checkpoint(args.pca_from))
            tok = {k.split('tokenizer.', 1)[1]: v for k, v in sd.items() if 'tokenizer.' in k}
            model.tokenizer.load_state_dict(tok)
        else:
            fit_pca(model, dataset, args, rank, world, device)
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())

    if args.grad_checkpointing:
        if not is_dae:
            raise SystemExit('--grad-checkpointing is available for the l-DAE models')
        model.encoder.set_grad_checkpointing(True)  # the DAE runs all its blocks through the encoder's runner
    net: nn.Module = model if is_dae else _DenoiseForward(model)
    if args.compile:
        net = torch.compile(net)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(len(dataset), args.batch_size, world, rank, args.accum_steps, args.seed,
                                                start_step, total_steps),
        num_workers=args.workers, pin_memory=device.type == 'cuda', persistent_workers=False)

    amp_mode = 'off' if args.no_amp else args.amp
    use_amp = amp_mode == 'bf16' or (amp_mode == 'auto' and device.type == 'cuda')
    amp = dict(device_type=device.type, dtype=torch.bfloat16) if use_amp else None
    progress = _progress(total_steps, start_step, is_main and not args.quiet)
    step, micro, t0, seen, last = start_step, 0, time.time(), 0, {}
    log_file = open(out / 'log.jsonl', 'a') if is_main else None
    for images, _, seeds in loader:
        images = images.to(device, non_blocking=True)
        lr = lr_at(step, total_steps, warmup, peak_lr)
        for group in opt.param_groups:
            group['lr'] = lr
        sync = micro == args.accum_steps - 1
        ctx = net.no_sync() if (world > 1 and not sync) else _null()
        with ctx:
            with (torch.autocast(**amp) if amp else _null()):
                loss = compute_loss(net, images, seeds.tolist())
            flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=device)
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() < 1:
                raise FloatingPointError(
                    f'non-finite loss ({loss.item()}) at step {step} (epoch {step // steps_per_epoch}); the run stopped '
                    f'and the last good checkpoint is kept: {ckpt_path if ckpt_path.exists() else "none written yet"}. '
                    f'Lower --lr / --blr, or check the data.')
            (loss / args.accum_steps).backward()
        micro += 1
        seen += images.shape[0] * world
        if not sync:
            continue
        micro = 0
        if args.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=step)
        step += 1
        progress(step)
        if is_main and (step % args.log_every == 0 or step == total_steps):
            dt = time.time() - t0
            last = dict(step=step, epoch=round(step / steps_per_epoch, 3), loss=round(loss.item(), 6), lr=lr,
                        img_per_s=round(seen / max(dt, 1e-9), 2), elapsed_s=round(dt, 1))
            print(json.dumps(last), flush=True)
            log_file.write(json.dumps(last) + '\n')
            log_file.flush()
        if step % args.ckpt_every == 0 or step == total_steps:
            if is_main:
                state = dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, args=vars(args))
                if ema is not None:
                    state['ema'] = ema.module.state_dict()
                save_checkpoint(ckpt_path, state)
            if world > 1:
                dist.barrier()
    if log_file:
        log_file.close()
    result = dict(step=step, total_steps=total_steps, last=last)
    if is_main and step >= total_steps:
        result['weights'] = str(export_final(model if ema is None else ema.module, args, out, is_dae))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def fit_pca(model: nn.Module, dataset: SeededImageFolder, args: argparse.Namespace, rank: int, world: int,
            device: torch.device) -> None:
    """Stream ``--pca-images`` images (epoch-0 order, this rank's share) into float64 sums; all-reduce; fit."""
    n = min(args.pca_images, len(dataset))
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 100_003)).tolist()[:n]
    mine = perm[rank::world]
    stats = model.tokenizer.new_stats()
    g = torch.Generator().manual_seed(args.seed + 17 * rank)
    for i in range(0, len(mine), 256):
        batch = torch.stack([dataset[(0, j)][0] for j in mine[i:i + 256]])
        model.tokenizer.accumulate(stats, batch, patches_per_image=args.pca_patches_per_image, generator=g)
    stats.all_reduce(device=device if device.type == 'cuda' else None)
    model.tokenizer.set_from_stats(stats)


def export_final(model: nn.Module, args: argparse.Namespace, out: Path, is_dae: bool) -> Path:
    """``model.safetensors`` (the whole model) and, for l-DAE, a loadable ``encoder/`` folder."""
    import timm
    from safetensors.torch import save_file
    import ldae_models
    path = out / 'model.safetensors'
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={'format': 'pt', 'architecture': args.model})
    overrides = json.loads(args.model_args) if args.model_args else {}
    if is_dae:
        enc_args = {k: v for k, v in overrides.items() if k not in ('decoder_depth', 'target', 'noise_levels',
                                                                    'single_sigma', 'residual_weight', 'loss_weight')}
        if args.latent_dim:
            enc_args['latent_dim'] = args.latent_dim
        if args.noise_space:
            enc_args['noise_space'] = args.noise_space
        enc = timm.create_model(args.model, pretrained=True, merged=False, pretrained_cfg_overlay=dict(file=str(path)),
                                **enc_args)
        ldae_models.save_pretrained(enc, out / 'encoder', model_card=dict(
            description=f'l-DAE encoder trained with ldae_models.train ({args.model}).',
            training={k: v for k, v in vars(args).items() if k not in ('data_dir', 'out')}))
    return path


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _progress(total: int, start: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return lambda step: None
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda step: None
    bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

    def update(step: int) -> None:
        bar.n = step
        bar.refresh()
    return update


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='ldae-models train', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='ldae_vit_tiny_patch4_32', help='an l-DAE name or a ddae_* UNet name')
    ap.add_argument('--model-args', help='JSON object of model keyword arguments (e.g. a smaller depth)')
    ap.add_argument('--data-dir', required=True, help='ImageFolder root (uses DIR/train when it exists)')
    ap.add_argument('--out', required=True, help='output folder: checkpoints, log.jsonl, final weights')
    ap.add_argument('--epochs', type=int, default=400, help='the paper: 400 (default), 800, 1600')
    ap.add_argument('--max-steps', type=int, default=0, help='stop after this many steps instead (0: epochs)')
    ap.add_argument('--batch-size', type=int, default=2048, help='global batch (the paper: 2048)')
    ap.add_argument('--accum-steps', type=int, default=1, help='gradient accumulation micro-steps per step')
    ap.add_argument('--blr', type=float, default=1e-4, help='base lr; lr = blr * batch / 256 (the paper)')
    ap.add_argument('--lr', type=float, default=0.0, help='absolute lr (overrides --blr)')
    ap.add_argument('--warmup-epochs', type=float, default=100, help='linear warmup (the paper: 100 of 400)')
    ap.add_argument('--weight-decay', type=float, default=0.0, help='AdamW weight decay (the paper: none)')
    ap.add_argument('--clip-grad', type=float, default=0.0, help='gradient norm clip (0: off)')
    ap.add_argument('--ema', type=float, default=0.0, help='EMA decay, e.g. 0.9999 (0: off)')
    ap.add_argument('--aug', choices=('center', 'rrc'), default='center', help='center crop (the paper) or random resized crop')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--workers', type=int, default=4)
    ap.add_argument('--resume', action='store_true', help='continue from OUT/ckpt_last.pth when it exists')
    ap.add_argument('--ckpt-every', type=int, default=1000, help='steps between checkpoints')
    ap.add_argument('--log-every', type=int, default=50, help='steps between JSON log lines')
    ap.add_argument('--compile', action='store_true', help='torch.compile the model')
    ap.add_argument('--grad-checkpointing', action='store_true')
    ap.add_argument('--amp', choices=['auto', 'bf16', 'off'], default='auto',
                    help='bf16 autocast: auto = on GPU only; bf16 = also on CPU (about 1.25x faster on CPUs with '
                         'AVX512-BF16/AMX); off = float32')
    ap.add_argument('--no-amp', action='store_true', help='same as --amp off')
    ap.add_argument('--quiet', action='store_true', help='no progress bar')
    g = ap.add_argument_group('l-DAE (ablations of the paper; default: the final l-DAE)')
    g.add_argument('--target', choices=('image', 'latent', 'noise'))
    g.add_argument('--noise-space', choices=('latent', 'pixel'))
    g.add_argument('--noise-levels', choices=('multi', 'single'))
    g.add_argument('--latent-dim', type=int, help='d, kept PCA components')
    g.add_argument('--latent-scale', choices=('global', 'whiten', 'none'))
    g.add_argument('--residual-weight', type=float, help='loss weight of the discarded PCA components (0.1)')
    g.add_argument('--pca-images', type=int, default=50_000, help='images streamed into the PCA fit')
    g.add_argument('--pca-patches-per-image', type=int, default=None, help='random patches per image (default: all)')
    g.add_argument('--pca-from', help='take the fitted tokenizer from this checkpoint instead of fitting')
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    train(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
