"""The paper's 2D studies (§4.2, Tables 1-3, Figures 1-3): DDIM sampling and SDS / VSD / SDI / MSD
optimisation of a grid of points, on the fractal (class-conditional; ideal, learned, CFG,
autoguidance) and on pinwheel and spiral (ideal, learned). Readings of what the paper leaves open
follow the project's design notes on the toy experiments and are listed in `StudyConfig` and docs/results.md.
"""
import math
from dataclasses import asdict, dataclass

import torch

from diffsolve import metrics
from diffsolve.analytic import EmpiricalDenoiser
from diffsolve.distill import DISTILLERS, MSD, DenoisingTrainer, ideal_variational, linear_decay, make_distiller
from diffsolve.schedules import sigmas_karras
from diffsolve.solvers import sample_ddim
from diffsolve.transforms import FLOWS, autoguidance, cfg
from .datasets import fractal_tree, kde_mixture, pinwheel_points, spiral_points

COLUMNS = {"fractal": ("ideal", "learned", "cfg", "autoguidance"), "spiral": ("ideal", "learned"),
           "pinwheel": ("ideal", "learned")}
METHODS = ("ddim", "sds", "vsd", "sdi", "msd")
SDI_VARIANTS = {"official": "sdi_official", "paper": "sdi"}  # StudyConfig.sdi_variant -> distiller of the "sdi" row


@dataclass
class StudyConfig:
    grid: int = 64               # points per axis on [-1.5, 1.5]^2 (the paper: "densely"; 100 would be 10^4)
    data_points: int = 10_000    # reference samples = ideal denoiser's training set (paper: 10^4)
    n_mc: int = 2                # Monte Carlo estimates averaged per point and gradient (paper: 10^3)
    steps: int = 150             # Adam steps, learned columns (paper)
    lr: float = 0.08             # Adam learning rate (paper)
    ideal_steps: int = 10        # plain gradient descent steps, ideal column (paper: "a few")
    ideal_lr: float = 1.0        # (paper: "high"); lr 1 makes MSD the classical mean-shift iteration
    chain_steps: int = 32        # sampler steps (DDIM baseline and MSD chain), rho-grid sigma 5 -> 0.002
    sigma_min: float = 0.002
    sigma_max: float = 5.0
    lam0: float = 0.316          # MSD initial bandwidth, decayed linearly (paper)
    cfg_scale: float = 4.0       # Karras g (diffusers convention) = paper w + 1
    autoguidance_scale: float = 3.0
    weighting: str = "sds"       # w(sigma) of SDS / VSD (and of SDI "paper"): DreamFusion's and threestudio's 1 - abar
    sdi_variant: str = "official"  # "official": the official code's SDI (OfficialSDI); "paper": SDI on the rho-grid
    msd_flow: str = "literal"    # MSD's split-face flow, chosen on closed-form problems (docs/results.md)
    vsd_phi_steps: int = 1       # Adam steps on VSD's variational model per optimisation step (threestudio: 1)
    vsd_phi_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.sdi_variant not in SDI_VARIANTS:
            raise ValueError(f"sdi_variant must be one of {SDI_VARIANTS}, got {self.sdi_variant!r}")
        if self.msd_flow not in FLOWS:
            raise ValueError(f"msd_flow must be one of {FLOWS}, got {self.msd_flow!r}")
        if int(self.vsd_phi_steps) != self.vsd_phi_steps or self.vsd_phi_steps < 1:
            raise ValueError(f"vsd_phi_steps must be a positive integer, got {self.vsd_phi_steps!r}")


def dataset_density(name, data_points=10_000):
    """(analytic density for NLL, reference samples) of one data set."""
    g = torch.Generator().manual_seed(1)
    if name == "fractal":
        density = fractal_tree("A")
        data = density.sample(data_points, generator=g).float()
    elif name in ("pinwheel", "spiral"):
        points = (pinwheel_points if name == "pinwheel" else spiral_points)(10_000, seed=0)
        density = kde_mixture(points, 0.02)
        data = points[torch.randperm(len(points), generator=g)[:data_points]].float()
    else:
        raise ValueError(f"dataset must be one of {tuple(COLUMNS)}, got {name!r}")
    return density, data


def load_dataset(name, cache_dir=None, progress=True, iterations_scale=1.0, data_points=10_000):
    """Density (for NLL), reference samples, and the trained models of one data set."""
    from .train import toy_models
    density, data = dataset_density(name, data_points)
    models = toy_models(name, cache_dir=cache_dir, progress=progress, iterations_scale=iterations_scale)
    return {"name": name, "density": density, "data": data, "models": models}


def column_model(ds, column, cfg_):
    """(denoiser, transforms, inversion transforms for SDI) of one table column."""
    m = ds["models"]
    if column == "ideal":
        return EmpiricalDenoiser(ds["data"]), [], None
    if column == "learned":
        return m["main"], [], None
    if column == "cfg":
        w = cfg_.cfg_scale - 1
        return (m["main"], [cfg(cfg_.cfg_scale, uncond_model=m["cfg_uncond"])],
                [cfg(-w, uncond_model=m["cfg_uncond"], convention="paper")])
    if column == "autoguidance":
        w = cfg_.autoguidance_scale - 1
        return (m["main"], [autoguidance(m["autoguide"], cfg_.autoguidance_scale)],
                [autoguidance(m["autoguide"], -w + 1)])
    raise ValueError(f"column must be one of {COLUMNS[ds['name']]}, got {column!r}")


def grid_points(n, lim=1.5):
    t = torch.linspace(-lim, lim, n)
    gx, gy = torch.meshgrid(t, t, indexing="xy")
    return torch.stack([gx.flatten(), gy.flatten()], 1)


def distiller_options(method, model, transforms, inversion, column, cfg_, total_steps):
    """The study's options of one method (see StudyConfig); MSD's bandwidth decays linearly over the run."""
    common = dict(sigma_min=cfg_.sigma_min, sigma_max=cfg_.sigma_max, transforms=transforms)
    noisy = dict(common, weighting=cfg_.weighting)
    if method == "sdi_official":  # its own DDPM timesteps and no weighting (the official code)
        return dict(transforms=transforms, total_steps=total_steps, inversion_transforms=inversion)
    if method == "sdi":
        return dict(noisy, total_steps=total_steps, inversion_transforms=inversion)
    if method == "vsd":  # phi: the ideal denoiser of the particles, or an unguided copy of the model
        if column == "ideal":
            return dict(noisy, variational_update=ideal_variational)
        return dict(noisy, variational_update=DenoisingTrainer(model, lr=cfg_.vsd_phi_lr,
                                                               steps_per_update=cfg_.vsd_phi_steps))
    if method == "msd":
        return dict(common, bandwidth=cfg_.lam0, steps=cfg_.chain_steps, n_samples=cfg_.n_mc, flow=cfg_.msd_flow,
                    schedule=linear_decay(cfg_.lam0, total_steps))
    return noisy


def study_distiller(method, model, transforms, inversion, column, cfg_, total_steps):
    """The distiller of one method (any of diffsolve.distill.DISTILLERS) with the study's options; the study's
    "sdi" row is the variant `cfg_.sdi_variant` names."""
    if method not in DISTILLERS:
        raise ValueError(f"method must be one of {tuple(DISTILLERS)}, got {method!r}")
    if method == "sdi":
        method = SDI_VARIANTS[cfg_.sdi_variant]
    return make_distiller(method, model, **distiller_options(method, model, transforms, inversion, column, cfg_,
                                                             total_steps))


def mc_grad(distiller, x, n, generator):
    """Average of n independent single-sample estimates per point (MSD averages inside, eq. 10)."""
    if isinstance(distiller, MSD) or n == 1:
        return distiller.grad(x, generator)
    return distiller.grad(x.repeat_interleave(n, 0), generator).reshape(x.shape[0], n, -1).mean(1)


def optimise(method, model, transforms, inversion, column, x0, cfg_, generator, progress=None, distiller=None):
    """Run one distillation method from x0; returns (points, model calls per point and step, per-step log).
    `distiller`: one built by the caller (a variant the study's options do not make) instead of the study's."""
    ideal = column == "ideal"
    steps, lr = (cfg_.ideal_steps, cfg_.ideal_lr) if ideal else (cfg_.steps, cfg_.lr)
    if distiller is None:
        distiller = study_distiller(method, model, transforms, inversion, column, cfg_, steps)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr) if ideal else torch.optim.Adam([x], lr=lr)
    log = []
    for k in range(steps):
        distiller.on_step(k, x.detach(), generator)
        g = mc_grad(distiller, x.detach(), cfg_.n_mc, generator)
        opt.zero_grad(set_to_none=True)
        x.grad = g
        opt.step()
        log.append({"step": k, "grad_norm": g.norm(dim=1).mean().item()})
        if progress is not None:
            progress.update(1)
    per_point = 1 if isinstance(distiller, MSD) else cfg_.n_mc  # grad saw n_mc rows per point
    return x.detach(), distiller.nfe * per_point / steps, log


def ddim_samples(model, transforms, n, cfg_, generator, return_start=False):
    """n DDIM samples and the model calls per sample (and the starting noise with return_start)."""
    sigmas = sigmas_karras(cfg_.chain_steps, cfg_.sigma_min, cfg_.sigma_max)
    x0 = cfg_.sigma_max * torch.randn(n, 2, generator=generator)
    x, info = sample_ddim(model, x0, sigmas, transforms=transforms, disable=True, return_info=True)
    return (x, info.nfe, x0) if return_start else (x, info.nfe)


def mode_distance(points, ds, chunk=2048):
    """Mean distance of the points to the nearest mode (mixture component mean) of the data density."""
    means = ds["density"].means.to(torch.float64)
    pts = points.to(torch.float64)
    pts = pts[torch.isfinite(pts).all(1)]
    if not len(pts):
        return float("inf")
    return float(torch.cat([torch.cdist(pts[i:i + chunk], means).min(1).values
                            for i in range(0, len(pts), chunk)]).mean())


def evaluate(points, ds):
    """NLL under the analytic density, precision / recall (k = 3) and MMD x 1e4 against the data."""
    pr = metrics.precision_recall(ds["data"], points, k=3)
    mmd = metrics.mmd_both(ds["data"], points, bandwidth=0.5)
    finite = torch.isfinite(points).all(1)
    return {"nll": metrics.nll(points[finite].double(), ds["density"].log_prob), "precision": pr["precision"],
            "recall": pr["recall"], "mmd_biased_e4": mmd["biased"] * 1e4,
            "mmd_unbiased_e4": None if mmd["unbiased"] is None else mmd["unbiased"] * 1e4,
            "nonfinite_points": int((~finite).sum())}


def config_dict(cfg_):
    return asdict(cfg_)


def landscape(method, model, transforms, inversion, column, cfg_, n=32, k=16, seed=0):
    """Reconstructed loss landscape: the method's mean gradient field on an n x n grid (k estimates per
    point, MSD at the initial bandwidth, SDI at mid-run), integrated by least squares (metrics)."""
    g = torch.Generator().manual_seed(seed)
    pts = grid_points(n)
    distiller = study_distiller(method, model, transforms, inversion, column, cfg_, 3)  # SDI: step 1 of 3 = mid-run
    distiller.on_step(1, pts, g)
    if isinstance(distiller, MSD):
        distiller.bandwidth = cfg_.lam0  # the landscape at the initial bandwidth
    field = mc_grad(distiller, pts, k, g)
    t = torch.linspace(-1.5, 1.5, n)
    return metrics.integrate_gradient_field(field.reshape(n, n, 2).double(), t.double(), t.double())


def efficiency_points(method, model, transforms, inversion, column, cfg_, oracle, points, k=64, seed=0):
    """Table 3: k independent single estimates at each point; eq. 17 against the estimator's own mean
    and against the oracle (the exact mean-shift gradient at lambda_0 of the true density)."""
    g = torch.Generator().manual_seed(seed)
    distiller = study_distiller(method, model, transforms, inversion, column, cfg_, 3)  # SDI: step 1 of 3 = mid-run
    distiller.on_step(1, points, g)
    if isinstance(distiller, MSD):
        distiller.n_samples, distiller.bandwidth = 1, cfg_.lam0  # single draws at the initial bandwidth
    draws = distiller.grad(points.repeat_interleave(k, 0), g).reshape(points.shape[0], k, -1).transpose(0, 1)
    cost = distiller.last_nfe  # model calls per row of the batch = per single estimate
    own = metrics.estimator_efficiency(draws.double(), cost)
    ref = metrics.estimator_efficiency(draws.double(), cost, reference=oracle.double())
    keep = ("log_mean_efficiency", "mean_log_efficiency", "deterministic_points", "deterministic")
    return {"cost": cost, "own_mean": {k_: own[k_] for k_ in keep}, "oracle": {k_: ref[k_] for k_ in keep}}


def oracle_gradient(ds, points, cfg_):
    """The exact mean-shift gradient x - D(x; lambda_0 / sqrt(2)) of the true density."""
    return points.double() - ds["density"].denoise(points.double(), cfg_.lam0 / math.sqrt(2))
