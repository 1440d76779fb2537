"""The seed's progressive generator and discriminator.

Both are built once for the final resolution and run as forward(x, level, alpha): `level` picks how many
resolutions are active (0 = base size) and `alpha` fades the newest one in (0 = previous level's output upsampled,
1 = the new level alone).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from progan.config import TrainConfig


class EqConv2d(nn.Conv2d):
    """Convolution with ProGAN's equalised learning rate: weights stored as N(0, 1) and scaled by the He constant
    sqrt(2 / fan_in) at run time, so Adam's step is the same relative size in every layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.scale = (2.0 / self.weight[0].numel()) ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.scale, self.bias)


class EqLinear(nn.Linear):
    """Linear layer with equalised learning rate (see EqConv2d)."""

    def __init__(self, *args, gain: float = 2.0 ** 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.scale = gain / self.in_features ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def conv(eq: bool, *args, **kwargs) -> nn.Conv2d:
    return EqConv2d(*args, **kwargs) if eq else nn.Conv2d(*args, **kwargs)


def linear(eq: bool, *args, **kwargs) -> nn.Linear:
    if eq:
        return EqLinear(*args, **kwargs)
    kwargs.pop("gain", None)
    return nn.Linear(*args, **kwargs)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear doubling, as in the seed's UpConv."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class PixelNorm(nn.Module):
    """Normalise each pixel's feature vector to unit RMS (ProGAN); keeps unbiased generator activations in range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class LabelEmbedding(nn.Module):
    """Labels (N x K floats aligned with cfg.condition) -> N x dim: age through a linear map of its Fourier
    features (smooth in age), each categorical label through a learned table; summed, scaled to unit variance."""

    def __init__(self, cfg: TrainConfig, dim: int, eq_lr: bool = True):
        super().__init__()
        from progan import labels

        self.condition = cfg.condition
        self.parts = nn.ModuleDict()
        for name in cfg.condition:
            if name == "age":
                self.parts[name] = linear(eq_lr, labels.AGE_FEATURES, dim, bias=False, gain=1.0)
            else:
                n = labels.num_classes(cfg, name)
                if n < 1:
                    raise ValueError(f"condition {name!r} needs its class names in the config")
                self.parts[name] = nn.Embedding(n, dim)
                nn.init.normal_(self.parts[name].weight)
        self.dim = dim

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        from progan.labels import age_features

        if y is None or y.ndim != 2 or y.shape[1] != len(self.condition):
            shape = None if y is None else tuple(y.shape)
            raise ValueError(f"labels must be N x {len(self.condition)} ({', '.join(self.condition)}), got {shape}")
        out = 0
        for j, name in enumerate(self.condition):
            part = self.parts[name]
            out = out + (part(age_features(y[:, j])) if name == "age" else part(y[:, j].long()))
        return out * len(self.condition) ** -0.5


class Inject(nn.Module):
    """The seed's injected block: latent features repeated at every pixel, plus x and y coordinate channels.

    It gives every UpConv a shortcut to the latent and to absolute position. In a conditional run the label
    embedding joins the latent features, so the labels reach every level the same way.
    """

    def __init__(self, latent_dim: int, channels: int, eq_lr: bool = True, cfg: TrainConfig | None = None):
        super().__init__()
        self.features = linear(eq_lr, latent_dim, channels, bias=False, gain=1.0)
        # Created after `features`, and only when conditional: the unconditional parameters and init are unchanged.
        self.labels = LabelEmbedding(cfg, cfg.label_dim, eq_lr) if cfg is not None and cfg.condition else None
        self.channels = channels + 2 + (cfg.label_dim if self.labels is not None else 0)

    def vector(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.labels is None:
            if labels is not None:
                raise ValueError("labels given to an unconditional generator")
            return self.features(z)
        return torch.cat([self.features(z), self.labels(labels).to(z.dtype)], dim=1)

    def expand(self, v: torch.Tensor, res: int) -> torch.Tensor:
        """B x C vector -> B x (C + 2) x res x res map with the coordinate channels appended."""
        b = v.shape[0]
        coords = torch.linspace(-1.0, 1.0, res, device=v.device, dtype=v.dtype)
        yy = coords.view(1, 1, res, 1).expand(b, 1, res, res)
        xx = coords.view(1, 1, 1, res).expand(b, 1, res, res)
        return torch.cat([v[:, :, None, None].expand(-1, -1, res, res), xx, yy], dim=1)


class UpConv(nn.Module):
    """Bilinear x2 (skipped for the base block), concatenate the injected block, two size-preserving convolutions."""

    def __init__(self, in_ch: int, inject_ch: int, out_ch: int, upsample: bool, pixel_norm: bool,
                 eq_lr: bool = True):
        super().__init__()
        self.upsample = upsample
        norm = PixelNorm() if pixel_norm else nn.Identity()
        self.convs = nn.Sequential(
            conv(eq_lr, in_ch + inject_ch, out_ch, 3, padding=1, bias=False), nn.LeakyReLU(0.2), norm,
            conv(eq_lr, out_ch, out_ch, 3, padding=1, bias=False), nn.LeakyReLU(0.2), norm,
        )

    def forward(self, x: torch.Tensor, injected: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = upsample2(x)
        return self.convs(torch.cat([x, injected], dim=1))


class ToRGB(nn.Module):
    """Per-resolution biased 1x1 conversion to a tanh-valued image (the only biased generator layer)."""

    def __init__(self, in_ch: int, eq_lr: bool = True):
        super().__init__()
        self.conv = conv(eq_lr, in_ch, 3, 1, bias=True)
        if eq_lr:
            self.conv.scale = (1.0 / in_ch) ** 0.5  # linear layer: gain 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


class Generator(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.latent_dim, self.base, ch = cfg.latent_dim, cfg.base, cfg.g_channels
        # The "latent image": spatial structure at base size, without which the net only makes flat tiles.
        eq = cfg.eq_lr
        self.latent_image = linear(eq, cfg.latent_dim, ch[0] * cfg.base ** 2, bias=False, gain=1.0)
        self.inject = Inject(cfg.latent_dim, cfg.inject_channels, eq, cfg)
        self.blocks = nn.ModuleList(
            UpConv(ch[max(k - 1, 0)], self.inject.channels, ch[k], upsample=k > 0, pixel_norm=cfg.pixel_norm,
                   eq_lr=eq)
            for k in range(len(ch))
        )
        self.to_rgb = nn.ModuleList(ToRGB(c, eq) for c in ch)
        self.norm = PixelNorm() if cfg.pixel_norm else nn.Identity()

    @property
    def levels(self) -> int:
        return len(self.blocks)

    def forward(self, z: torch.Tensor, level: int | None = None, alpha: float = 1.0,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images for latents z; a conditional generator also needs labels (N x K, see progan/labels.py)."""
        level = self.levels - 1 if level is None else level
        inj = self.inject.vector(z, labels)
        x = self.norm(self.latent_image(z).view(z.shape[0], -1, self.base, self.base))
        prev = None
        for k in range(level + 1):
            if k == level and k > 0 and alpha < 1.0:
                prev = self.to_rgb[k - 1](x)
            x = self.blocks[k](x, self.inject.expand(inj, self.base * 2 ** k))
        out = self.to_rgb[level](x)
        if prev is not None:
            out = torch.lerp(upsample2(prev).to(out.dtype), out, alpha)  # autocast runs upsampling in fp32
        return out


class MinibatchStd(nn.Module):
    """Append the mean per-feature standard deviation over groups of samples as one extra channel (ProGAN).

    It lets D see a batch's variety, so a collapsed generator is easy to spot.
    """

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # D's batch is images then their mirrors: groups must divide each half so no group spans both.
        half = b // 2 if b % 2 == 0 else b
        g = max(d for d in range(1, min(self.group, half) + 1) if half % d == 0)
        # Groups of consecutive samples, so that an image and its mirror (the second half of D's batch) never share one.
        y = x.view(-1, g, c, h, w)
        std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))   # one value per group
        std = std.view(-1, 1, 1, 1, 1).expand(-1, g, 1, h, w).reshape(b, 1, h, w)
        return torch.cat([x, std], dim=1)


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, eq_lr: bool = True):
        super().__init__()
        self.convs = nn.Sequential(
            conv(eq_lr, in_ch, in_ch, 3, padding=1, bias=False), nn.LeakyReLU(0.2),
            conv(eq_lr, in_ch, out_ch, 3, padding=1, bias=False), nn.LeakyReLU(0.2),
            nn.AvgPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class FromRGB(nn.Module):
    """Per-resolution biased 1x1 conversion from RGB to the discriminator's channels."""

    def __init__(self, out_ch: int, eq_lr: bool = True):
        super().__init__()
        self.conv = conv(eq_lr, 3, out_ch, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.2)


class Discriminator(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        ch = cfg.d_channels
        eq = cfg.eq_lr
        self.from_rgb = nn.ModuleList(FromRGB(c, eq) for c in ch)
        self.blocks = nn.ModuleList([nn.Identity()] + [DownBlock(ch[k], ch[k - 1], eq) for k in range(1, len(ch))])
        extra = 1 if cfg.mbstd else 0
        self.head = nn.Sequential(
            MinibatchStd() if cfg.mbstd else nn.Identity(),
            conv(eq, ch[0] + extra, ch[0], 3, padding=1, bias=False), nn.LeakyReLU(0.2),
            nn.Flatten(),
            linear(eq, ch[0] * cfg.base ** 2, ch[0], bias=False), nn.LeakyReLU(0.2),
            linear(eq, ch[0], 1, gain=1.0),
        )
        # Projection discriminator (Miyato & Koyama 2018): score += <embed(y), features> / sqrt(dim); created last,
        # and only when conditional, so the unconditional parameters and init are unchanged.
        self.project = LabelEmbedding(cfg, ch[0], eq) if cfg.condition else None

    @property
    def levels(self) -> int:
        return len(self.from_rgb)

    def features(self, img: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        x = self.from_rgb[level](img)
        if level > 0:
            x = self.blocks[level](x)
            if alpha < 1.0:
                x = torch.lerp(self.from_rgb[level - 1](F.avg_pool2d(img, 2)), x, alpha)
        for k in range(level - 1, 0, -1):
            x = self.blocks[k](x)
        return x

    def forward(self, img: torch.Tensor, level: int | None = None, alpha: float = 1.0,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logit per image: the mean of the scores of the image and its mirror (faces are left-right symmetric).

        A conditional discriminator scores (image, labels) pairs through its projection head."""
        level = self.levels - 1 if level is None else level
        b = img.shape[0]
        both = torch.cat([img, img.flip(3)])
        if self.project is None:
            if labels is not None:
                raise ValueError("labels given to an unconditional discriminator")
            logits = self.head(self.features(both, level, alpha)).view(2, b)
            return logits.mean(0)
        h = self.head[:-1](self.features(both, level, alpha))
        e = self.project(torch.cat([labels, labels]) if labels is not None else None).to(h.dtype)
        logits = self.head[-1](h).view(2 * b) + (e * h).sum(1) * self.project.dim ** -0.5
        return logits.view(2, b).mean(0)
