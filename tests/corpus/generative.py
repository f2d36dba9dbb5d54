"""Generative models: a DDPM-style diffusion U-Net and a convolutional VAE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, inputs

B = 2


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal timestep embedding (the DDPM / guided-diffusion formula)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb, groups=4):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (the DDPM U-Net's), written out with bmm + softmax."""

    def __init__(self, ch, groups=4):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w).permute(0, 2, 1)
        k = self.k(hn).reshape(b, c, h * w)
        w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2)
        v = self.v(hn).reshape(b, c, h * w)
        out = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class DiffusionUNet(nn.Module):
    """Two resolutions; down with a strided conv, up with nearest interpolate (first level)
    and ConvTranspose2d (second); skip concatenation; attention at the lowest resolution.
    forward returns the epsilon-prediction MSE of a noised batch."""

    def __init__(self, ch=8, temb=32):
        super().__init__()
        self.ch = ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down1 = ResBlock(ch, ch, temb)
        self.downsample1 = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down2 = ResBlock(ch, 2 * ch, temb)
        self.downsample2 = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * ch, 2 * ch, temb)
        self.mid_attn = AttnBlock(2 * ch)
        self.mid2 = ResBlock(2 * ch, 2 * ch, temb)
        self.upsample2 = nn.ConvTranspose2d(2 * ch, 2 * ch, 4, stride=2, padding=1)
        self.up2 = ResBlock(4 * ch, ch, temb)
        self.up1 = ResBlock(2 * ch, ch, temb)
        self.norm_out = nn.GroupNorm(4, ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x0, noise, t):
        alpha_bar = torch.cos(t * math.pi / 2) ** 2
        a = alpha_bar[:, None, None, None]
        x = a.sqrt() * x0 + (1 - a).sqrt() * noise
        temb = self.temb(timestep_embedding(t * 1000, self.ch))
        h = self.conv_in(x)
        h1 = self.down1(h, temb)
        h2 = self.down2(self.downsample1(h1), temb)
        h = self.downsample2(h2)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        h = self.up2(torch.cat([self.upsample2(h), h2], dim=1), temb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), temb)
        eps = self.conv_out(F.silu(self.norm_out(h)))
        return F.mse_loss(eps, noise)


def diffusion_inputs(device, dtype):
    return (torch.randn(B, 3, 16, 16, device=device, dtype=dtype),
            torch.randn(B, 3, 16, 16, device=device, dtype=dtype),
            torch.rand(B, device=device, dtype=dtype))


class ConvVAE(nn.Module):
    """The PyTorch-examples VAE, convolutional: reparameterisation with randn_like, the
    Bernoulli reconstruction loss plus the KL term."""

    def __init__(self, latent=8):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(8, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.LeakyReLU(0.2),
                                 nn.Flatten())
        self.fc_mu = nn.Linear(16 * 4 * 4, latent)
        self.fc_logvar = nn.Linear(16 * 4 * 4, latent)
        self.fc_dec = nn.Linear(latent, 16 * 4 * 4)
        self.dec = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 1, 4, 2, 1))

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def forward(self, x):
        h = self.enc(x)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = self.reparameterize(mu, logvar)
        logits = self.dec(self.fc_dec(z).view(-1, 16, 4, 4))
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (bce + kld) / x.size(0)


def images01(device, dtype):
    return torch.rand(B, 1, 16, 16, device=device, dtype=dtype)


ENTRIES = [
    Entry("diffusion_unet", "generative", DiffusionUNet, diffusion_inputs,
          "timestep sinusoids, GroupNorm+SiLU ResBlocks, strided-conv down, ConvTranspose2d and "
          "nearest interpolate up, skip concat, bmm self-attention"),
    Entry("conv_vae", "generative", ConvVAE, inputs(images01),
          "reparameterisation with randn_like, BCE-with-logits + KL, ConvTranspose2d decoder"),
]
