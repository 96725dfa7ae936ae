"""PyTorch reference of the same training step, for a ratio measured in the same run.

Not part of the package (no PyTorch dependency): install torch yourself to use it, e.g. the CPU
build ``pip install torch==2.13.0``. The network mirrors ``timm_jax.model.UNet3D`` (Isensee et
al. 2017: residual context modules with spatial dropout, nearest upsampling, localisation
modules, three summed deep-supervision heads, instance norm + leaky ReLU), the loss is the
same soft Dice on sigmoid outputs, the optimiser Adam.

Usage: python benchmarks/torch_reference.py [--base 8] [--size 32] [--batch 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__(
            nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(1e-2),
        )


class IsenseeUNet(nn.Module):
    def __init__(self, cin=4, cout=3, base=16, depth=5, dropout=0.3, heads=3):
        super().__init__()
        f = [base * 2**l for l in range(depth)]
        self.enc_in, self.ctx = nn.ModuleList(), nn.ModuleList()
        for l in range(depth):
            self.enc_in.append(ConvBlock(cin if l == 0 else f[l - 1], f[l], stride=1 if l == 0 else 2))
            self.ctx.append(
                nn.Sequential(ConvBlock(f[l], f[l]), nn.Dropout3d(dropout), ConvBlock(f[l], f[l]))
            )
        self.up, self.loc = nn.ModuleList(), nn.ModuleList()
        for l in range(depth - 2, -1, -1):
            self.up.append(ConvBlock(f[l + 1], f[l]))
            self.loc.append(nn.Sequential(ConvBlock(2 * f[l], f[l]), ConvBlock(f[l], f[l], k=1)))
        self.heads = nn.ModuleList(nn.Conv3d(f[l], cout, 1) for l in range(heads))
        self.depth, self.n_heads = depth, heads

    def forward(self, x):
        skips = []
        for conv, ctx in zip(self.enc_in, self.ctx):
            x = conv(x)
            x = x + ctx(x)
            skips.append(x)
        loc = {}
        for i, l in enumerate(range(self.depth - 2, -1, -1)):
            x = self.up[i](F.interpolate(x, scale_factor=2, mode="nearest"))
            x = self.loc[i](torch.cat([skips[l], x], 1))
            loc[l] = x
        seg = None
        for l in range(self.n_heads - 1, -1, -1):
            s = self.heads[l](loc[l])
            seg = s if seg is None else s + F.interpolate(seg, scale_factor=2, mode="nearest")
        return seg


def soft_dice_loss(logits, target, smooth=1e-5):
    p = torch.sigmoid(logits)
    inter = (p * target).sum((2, 3, 4))
    denom = p.sum((2, 3, 4)) + target.sum((2, 3, 4))
    return 1 - ((2 * inter + smooth) / (denom + smooth)).mean()


def make_step(base: int, size: int, batch: int):
    """One Adam step (forward, backward, update) on fixed random data, as a callable."""
    torch.manual_seed(0)
    net = IsenseeUNet(base=base)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    x = torch.randn(batch, 4, size, size, size)
    y = (x[:, :3] > 0.8).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = soft_dice_loss(net(x), y)
        loss.backward()
        opt.step()

    step()
    return step


def step_time(base: int, size: int, batch: int, repeats: int = 5) -> float:
    """Median seconds of one Adam step on random data."""
    step = make_step(base, size, batch)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    n = sum(p.numel() for p in IsenseeUNet(base=args.base).parameters())
    t = step_time(args.base, args.size, args.batch)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads: {args.batch}x{args.size}^3 base "
        f"{args.base} ({n:,} params): {t * 1e3:.1f} ms/step"
    )


if __name__ == "__main__":
    main()
