"""The reference every speed and quality claim is measured against: the PyTorch DCGAN tutorial model at 64 px.

One definition for the whole project (bench.py and the race use this one). Architecture and optimiser exactly as
the tutorial: ngf = ndf = 64, BatchNorm, ReLU/LeakyReLU(0.2), N(0, 0.02) init, Adam(2e-4, betas=(0.5, 0.999)),
batch 128, BCE loss (here on logits, which is the same loss computed stably), D step then G step.
`precision="bf16"` runs the forward passes under bf16 autocast (weights and Adam stay fp32), as progan's Trainer
does, so that a race or benchmark at bf16 gives both contestants the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3):
        super().__init__()
        self.nz = nz
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )
        self.apply(_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class DCGANDiscriminator(nn.Module):
    def __init__(self, ndf: int = 64, nc: int = 3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
        )
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


class DCGANTrainer:
    """The tutorial's training step on a batch of real 64 px images in [-1, 1]."""

    batch = 128
    size = 64

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0, precision: str = "fp32"):
        if precision not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}")
        self.device = torch.device(device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.G = DCGANGenerator().to(self.device)
            self.D = DCGANDiscriminator().to(self.device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.rng = torch.Generator(device=self.device).manual_seed(seed)

    def step(self, real: torch.Tensor) -> None:
        b = real.shape[0]
        z = torch.randn(b, self.G.nz, generator=self.rng, device=self.device)
        with self.autocast:
            fake = self.G(z)
            d_real, d_fake = self.D(real), self.D(fake.detach())
        d_loss = (F.binary_cross_entropy_with_logits(d_real.float(), torch.ones_like(d_real, dtype=torch.float32))
                  + F.binary_cross_entropy_with_logits(d_fake.float(), torch.zeros_like(d_fake, dtype=torch.float32)))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        with self.autocast:
            out = self.D(fake)
        g_loss = F.binary_cross_entropy_with_logits(out.float(), torch.ones_like(out, dtype=torch.float32))
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        self.G.eval()
        try:
            return self.G(z.to(self.device))
        finally:
            self.G.train()
