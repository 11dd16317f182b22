"""CAL-GAN in a plain PyTorch loop: the lines a traiNNer-redux or neosr user wires into their trainer.

    python examples/minimal_loop.py --steps 200 [--device cuda] [--vgg path/to/vgg19-dcbb9e9d.pth]

Swap TinySR for your generator and `batch` for your data loader; the two CAL-GAN steps stay as below.
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import calgan_fast as cf

D_WEIGHTS = {"lambda_b": 0.05, "lambda_o": 10.0, "lambda_d": 10.0, "lambda_dis": 1.0}  # the paper's λ values
L1_W, GAN_W = 0.01, 0.005  # λ_r, λ_g (λ_p = 1 when --vgg is given)
LOGGED = ("total", "adv", "balance", "ortho", "dist", "acc_d_real", "acc_d_fake")  # losses as l_d_<name>


class TinySR(nn.Module):
    """A small x4 generator standing in for RRDBNet & co: (B, 3, h, w) -> (B, 3, 4h, 4w)."""

    def __init__(self, nf: int = 32):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.head = nn.Conv2d(3, nf, 3, 1, 1)
        self.body = nn.Sequential(nn.Conv2d(nf, nf, 3, 1, 1), act, nn.Conv2d(nf, nf, 3, 1, 1), act)
        up = [nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2), act]
        self.tail = nn.Sequential(*up, *up, nn.Conv2d(nf, 3, 3, 1, 1))

    def forward(self, lr):
        h = self.head(lr)
        return self.tail(h + self.body(h)) + F.interpolate(lr, scale_factor=4, mode="bicubic")


def batch(n: int, size: int, gen: torch.Generator, device: str):
    """Stand-in data: textured HR patches in [0, 1] and their x4 bicubic-downscaled LR copies."""
    xy = torch.arange(size) + 0.5 * torch.arange(size)[:, None]  # x + y / 2
    f, ph = torch.rand(2, n, 3, 1, 1, generator=gen) * torch.tensor([0.8, 2 * torch.pi]).view(2, 1, 1, 1, 1)
    hr = (0.5 + 0.3 * torch.sin(f * xy + ph) + 0.1 * torch.randn(n, 3, size, size, generator=gen)).clamp(0, 1)
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    return lr.to(device), hr.to(device)


def main(steps=100, batch_size=4, size=64, experts=12, device="cpu", vgg=None, seed=0, log_every=10):
    """Train for ``steps`` iterations; returns ``(G, D, history)``, history a list of per-step loss dicts."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G, D = TinySR().to(device), cf.CALGANDiscriminator(num_feat=32, num_experts=experts).to(device)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.99)) for m in (G, D))
    percep, history = cf.losses.PerceptualLoss(vgg).to(device) if vgg else None, []
    for step in range(1, steps + 1):
        lr, hr = batch(batch_size, size, gen, device)
        # G step: D scores sr with the experts of hr (HR routing reused); D gets no gradient.
        sr = G(lr)
        l_g = L1_W * F.l1_loss(sr, hr) + GAN_W * cf.losses.generator_adversarial_loss(D, hr, sr)
        l_g = l_g + (percep(sr, hr) if percep is not None else 0.0)
        opt_g.zero_grad(set_to_none=True)
        l_g.backward()
        opt_g.step()
        # D step: real pass first, its routing (detached) routes sr; extra losses from the real pass.
        d = cf.losses.discriminator_loss(D, hr, sr.detach(), weights=D_WEIGHTS)
        opt_d.zero_grad(set_to_none=True)
        d["total"].backward()
        opt_d.step()
        logged = {(k if k[:3] == "acc" else f"l_d_{k}"): d[k].item() for k in LOGGED}
        history.append({"l_g_total": l_g.item(), **logged})
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in history[-1].items()), flush=True)
    return G, D, history


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, d in (("steps", 100), ("batch-size", 4), ("size", 64), ("experts", 12), ("log-every", 10)):
        p.add_argument(f"--{name}", type=int, default=d)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vgg", default=None, help="ImageNet VGG19 weights file for the perceptual loss")
    main(**vars(p.parse_args()))
