"""What the digits testbed measures: Fréchet distance in the evaluation classifier's feature space,
target-class accuracy, nearest-neighbour distance to the training images (memorisation), a diversity
ratio (over-guided prototypes), and NLL in bits per pixel under a denoiser via the probability-flow ODE."""
import math

import torch

from diffsolve.schedules import sigmas_karras
from .data import PIXELS, SCALE, bits_per_pixel

# Two dequantisations of one integer image lie sqrt(64 / 6) * 2 / 17 = 0.38 apart on average: a generated
# image closer than this to a training image is counted as a copy.
COPY_DISTANCE = math.sqrt(PIXELS / 6) * SCALE


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) between two feature sets [N, d],
    in float64 (the FID formula; the symmetric form avoids a non-symmetric matrix square root)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [N, d] feature sets with N >= 2 and one d, got {tuple(a.shape)}, {tuple(b.shape)}")
    ca, cb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(ca)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root_a @ cb @ root_a
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + ca.trace() + cb.trace() - 2 * cross)


@torch.no_grad()
def class_metrics(classifier, x, labels, heldout_x, heldout_labels, train_x):
    """The testbed's numbers for generated images x [B, 64] meant to show class `labels`:
    fd (all classes pooled, against the held-out set), fd_class (mean over classes of the per-class
    distance), accuracy, nn_train (mean distance to the nearest training image, pixel space) and
    copy_rate (fraction within COPY_DISTANCE of a training image) and diversity (mean within-class
    pairwise distance relative to the held-out images')."""
    x = x.reshape(x.shape[0], -1).float()
    f, fh = classifier.features(x), classifier.features(heldout_x)
    acc = float((classifier(x).argmax(1) == labels).float().mean())
    per_class, div = [], []
    for c in labels.unique().tolist():
        g, h = f[labels == c], fh[heldout_labels == c]
        if len(g) >= 2:
            per_class.append(frechet_distance(g, h))
            div.append(float(torch.pdist(x[labels == c]).mean() / torch.pdist(heldout_x[heldout_labels == c]).mean()))
    nn = torch.cdist(x, train_x).min(1).values
    return {"fd": frechet_distance(f, fh), "fd_class": sum(per_class) / max(len(per_class), 1), "accuracy": acc,
            "nn_train": float(nn.mean()), "copy_rate": float((nn < COPY_DISTANCE).float().mean()),
            "diversity": sum(div) / max(len(div), 1), "finite": bool(torch.isfinite(x).all())}


def _divergence_hutchinson(den, x, sigma, probes, generator, **cond):
    """(D(x), tr dD/dx) with a Rademacher estimate of the trace (`probes` vectors per row)."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        d = den(xr, sigma, **cond)
        tr = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in range(probes):
            v = torch.randint(0, 2, x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
            (g,) = torch.autograd.grad(d, xr, v, retain_graph=k + 1 < probes)
            tr += (g * v).flatten(1).sum(1) / probes
    return d.detach(), tr


def log_likelihood(den, x, steps=64, sigma_min=0.002, sigma_max=80.0, probes=4, generator=None, **cond):
    """log p(x) [B] under the model by the probability-flow ODE dx/dsigma = (x - D) / sigma, integrated
    with Heun from sigma_min to sigma_max on the Karras grid (instantaneous change of variables, with a
    Hutchinson trace: the estimate is unbiased per step, the mean over a batch is what to report), plus
    log N(x_T; 0, sigma_max^2 I). x: [B, ...] flattened to its dimension d."""
    x = x.detach()
    dim = x[0].numel()
    sigmas = sigmas_karras(steps, sigma_min, sigma_max).flip(0)[1:].to(x.dtype)  # ascending, no 0
    delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def f(z, s):
        d, tr = _divergence_hutchinson(den, z, s * z.new_ones(z.shape[0]), probes, generator, **cond)
        return (z - d) / s, (dim - tr) / s

    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        h = s1 - s0
        v0, div0 = f(x, s0)
        x1 = x + h * v0
        v1, div1 = f(x1, s1)
        x = x + h * (v0 + v1) / 2
        delta = delta + h * (div0 + div1) / 2
    s_t = float(sigmas[-1])
    prior = -0.5 * (x.flatten(1) ** 2).sum(1) / s_t ** 2 - dim * (math.log(s_t) + 0.5 * math.log(2 * math.pi))
    return prior + delta


def nll_bpp(den, x, labels=None, generator=None, **kw):
    """Mean NLL in bits per pixel of 64-pixel digits images (see data.bits_per_pixel), under the
    class-conditional model when labels are given, else the unconditional one."""
    if x.reshape(x.shape[0], -1).shape[1] != PIXELS:
        raise ValueError(f"expected {PIXELS}-pixel images, got shape {tuple(x.shape)}")
    cond = {} if labels is None else {"class_labels": labels}
    return float(bits_per_pixel(log_likelihood(den, x.reshape(x.shape[0], -1), generator=generator, **kw, **cond)).mean())
