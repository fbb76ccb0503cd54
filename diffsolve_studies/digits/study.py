"""The digits comparison: DDIM samples as the reference, and SDS, VSD, SDI and MSD optimising the pixels
or a coordinate MLP per image, at equal NFE (the same number of model evaluations per image, CFG counted
as 2), with and without the paper's §4.3 heuristics, and MSD under several bandwidth schedules.

A run is one `Run` (method, parametrisation, guidance scale, heuristics, schedule). Every schedule
(MSD's bandwidth, SDI's t annealing) is a function of the fraction of the budget spent, so methods with
different costs per step see the same schedule over the same number of model calls.
"""
import math
from dataclasses import asdict, dataclass, replace

import torch

from diffsolve.distill import DISTILLERS, MSD, AdaptiveBandwidth, DenoisingTrainer, make_distiller, should_stop
from diffsolve.schedules import sigmas_karras
from diffsolve.solvers import sample_ddim
from diffsolve.transforms import autoguidance, cfg, limited_interval
from .data import CLASSES, PIXELS
from .evaluate import class_metrics, nll_bpp
from .images import CoordinateImages, PixelImages

METHODS = ("sds", "vsd", "sdi", "msd")
PARAMETRISATIONS = ("pixels", "mlp")
HEURISTICS = ("none", "interval", "interval+noised", "interval+inverted")  # the last three: §4.3
SCHEDULES = ("loglinear", "linear", "constant", "adaptive")
GUIDANCE = ("cfg", "autoguidance")
SDI_GRID = 1000  # SDI's t is annealed on this grid of budget fractions


@dataclass(frozen=True)
class DigitsConfig:
    particles_per_class: int = 16
    budget: int = 3200            # model evaluations per image per run (a CFG evaluation counts 2)
    scales: tuple = (1.0, 3.0, 7.5)   # guidance w, paper / threestudio convention c + w (c - u)
    main_scale: float = 3.0       # the scale of the ablations (heuristics, schedules, autoguidance)
    lr_pixels: float = 0.05       # Adam
    lr_mlp: float = 0.01          # Adam, the paper's text-to-2D learning rate
    sigma_min: float = 0.002      # sampling range: DDIM and MSD's chain (EDM's)
    sigma_max: float = 80.0
    # SDS / VSD / SDI draw sigma in Stable Diffusion's t in [20, 980] (threestudio's min/max_step_percent
    # 0.02 / 0.98) mapped to VE sigma through SD's scaled-linear schedule
    noisy_sigma: tuple = (0.138, 13.04)
    interval: tuple = (0.3, 5.0)  # (sigma_lo, sigma_hi]: guidance (and MSD's kernel) in a limited interval
    msd_steps: int = 16           # MSD chain: DDIM eta = 1 on the rho-grid, exact (split) kernel flow
    lam_start: float = 1e3        # the paper's lambda_3
    lam_stop: float = 1e-2        # the paper's lambda_1: the termination threshold (§4.5)
    lam_min: float = 1e-3         # where the schedules end: runs go on past the threshold, to test it
    lam_constant: float = 1.0
    lam_linear: float = 10.0
    ddim_steps: int = 32
    evals: int = 16               # metric evaluations along a run (plus the start)
    nll_steps: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Run:
    method: str                   # "ddim" or one of METHODS
    param: str = "pixels"
    scale: float = 3.0
    heuristics: str = "none"
    schedule: str = "loglinear"   # MSD only
    guidance: str = "cfg"
    label: str = ""               # names a variant built outside the study (`optimise(..., distiller=)`)

    def __post_init__(self):
        for name, value, allowed in (("method", self.method, ("ddim",) + tuple(DISTILLERS)),
                                     ("param", self.param, PARAMETRISATIONS), ("heuristics", self.heuristics, HEURISTICS),
                                     ("schedule", self.schedule, SCHEDULES), ("guidance", self.guidance, GUIDANCE)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"scale must be a finite w >= 0, got {self.scale}")

    @property
    def key(self):
        if self.method == "ddim":
            return f"ddim/{self.guidance}/w{self.scale:g}"
        extra = f"/{self.schedule}" if self.method == "msd" else ""
        label = f"/{self.label}" if self.label else ""
        return f"{self.method}/{self.param}/{self.guidance}/w{self.scale:g}/{self.heuristics}{extra}{label}"


def plan(cfg_, methods=METHODS, params=PARAMETRISATIONS, ablations=True):
    """Every run of the study, in order: DDIM references, the main grid (every method, parametrisation and
    scale; baselines without heuristics, MSD with the paper's), then (`ablations`) the ablations at the
    main scale."""
    w0 = cfg_.main_scale
    runs = [Run("ddim", scale=w) for w in cfg_.scales]
    for p in params:
        for w in cfg_.scales:
            runs += [Run(m, p, w, "interval+inverted" if m == "msd" else "none") for m in methods]
    if not ablations:
        return runs
    runs.insert(len(cfg_.scales), Run("ddim", scale=w0, guidance="autoguidance"))
    for p in params:
        runs += [Run(m, p, w0, "interval") for m in methods if m != "msd"]
        if "msd" in methods:
            runs += [Run("msd", p, w0, h) for h in HEURISTICS if h != "interval+inverted"]
            runs += [Run("msd", p, w0, "interval+inverted", s) for s in SCHEDULES if s != "loglinear"]
        runs += [Run(m, p, w0, "interval+inverted" if m == "msd" else "none", guidance="autoguidance")
                 for m in methods if m in ("sds", "msd")]
    return list(dict.fromkeys(runs))


class _Unconditional(torch.nn.Module):
    """The model with its class labels dropped: the CFG's unconditional branch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, sigma, **cond):
        return self.model(x, sigma)


class _Labelled(torch.nn.Module):
    """A network called with fixed class labels: VSD's class-conditional variational denoiser."""

    def __init__(self, net, labels):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x, sigma):
        return self.net(x, sigma, class_labels=self.labels)


def guidance_transforms(run, models, cfg_):
    """[] at w = 0, else CFG (or autoguidance with the weak model), limited to cfg_.interval when asked."""
    if run.scale == 0:
        return []
    if run.guidance == "cfg":
        g = cfg(run.scale, uncond_model=_Unconditional(models["main"]), convention="paper")
    else:
        g = autoguidance(models["weak"], 1 + run.scale)
    return [limited_interval(g, *cfg_.interval)] if run.heuristics != "none" else [g]


def inversion_transforms(run, models, cfg_):
    """SDI inverts with the negated guidance (as in the 2D study and SDI's official code)."""
    if run.scale == 0:
        return []
    if run.guidance == "cfg":
        return [cfg(-run.scale, uncond_model=_Unconditional(models["main"]), convention="paper")]
    return [autoguidance(models["weak"], 1 - run.scale)]


def distiller_options(run, models, labels, cfg_):
    """The study's options of one run's distiller (see DigitsConfig)."""
    model, transforms = models["main"], guidance_transforms(run, models, cfg_)
    extra = {"class_labels": labels}
    noisy = dict(sigma_min=cfg_.noisy_sigma[0], sigma_max=cfg_.noisy_sigma[1], weighting="sds", transforms=transforms,
                 extra_args=extra)
    if run.method == "vsd":
        trainer = DenoisingTrainer(_Labelled(model, labels), lr=1e-3, p_mean=-1.2, p_std=1.2)
        return dict(noisy, variational=trainer.net, variational_update=trainer)
    if run.method == "sdi":
        return dict(noisy, total_steps=SDI_GRID, inversion_transforms=inversion_transforms(run, models, cfg_))
    if run.method != "msd":  # SDS and the other noisy-sample distillers
        return noisy
    center = {"none": "iterate", "interval": "iterate", "interval+noised": "noised",
              "interval+inverted": "inverted"}[run.heuristics]
    return dict(bandwidth=cfg_.lam_start, sampler="kernel", steps=cfg_.msd_steps, sigma_min=cfg_.sigma_min,
                sigma_max=cfg_.sigma_max, solver="ddim", eta=1.0, center=center,
                kernel_interval=None if run.heuristics == "none" else cfg_.interval, transforms=transforms,
                extra_args=extra)


def study_distiller(run, models, labels, cfg_):
    """The run's distiller. Its schedules follow the fraction of the budget spent, f = nfe / budget: the
    loop's step position is f on SDI's grid (SDI anneals t over SDI_GRID positions), and MSD's bandwidth is
    lambda(f, mean |m|), read from the distiller's own model-call count."""
    d = make_distiller(run.method, models["main"], **distiller_options(run, models, labels, cfg_))
    if run.method == "msd":
        lam_of = bandwidth_schedule(run, cfg_)
        d.schedule = lambda step, m_norm: lam_of(d.nfe / cfg_.budget, m_norm)
    return d


def schedule_position(used, cfg_):
    """The step position the loop reports to `on_step`: the budget fraction on SDI's grid."""
    return int(used / cfg_.budget * (SDI_GRID - 1))


def bandwidth_schedule(run, cfg_):
    """lambda as a function of (budget fraction f, mean |m| of the last step). The decaying schedules end
    at lam_min < lam_stop, so a run goes on after the §4.5 criterion fires and shows what it would lose."""
    lo, hi = math.log(cfg_.lam_min), math.log(cfg_.lam_start)
    if run.schedule == "loglinear":
        return lambda f, m=None: math.exp(hi + f * (lo - hi))
    if run.schedule == "linear":
        return lambda f, m=None: max(cfg_.lam_linear * (1 - f), cfg_.lam_min)
    if run.schedule == "constant":
        return lambda f, m=None: cfg_.lam_constant
    adaptive = AdaptiveBandwidth(cfg_.lam_start, factor=0.7, ratio=0.05, floor=cfg_.lam_min)
    return lambda f, m=None: adaptive(0, m)


def labels_for(cfg_):
    return torch.arange(CLASSES).repeat_interleave(cfg_.particles_per_class)


def initial_images(run, n, cfg_):
    """The same initial images for every method of a parametrisation (seeded by cfg_.seed)."""
    g = torch.Generator().manual_seed(cfg_.seed + 1)
    if run.param == "pixels":
        return PixelImages(0.5 * torch.randn(n, PIXELS, generator=g))
    return CoordinateImages(n, generator=g)


def ddim_reference(run, models, cfg_, generator):
    labels = labels_for(cfg_)
    sigmas = sigmas_karras(cfg_.ddim_steps, cfg_.sigma_min, cfg_.sigma_max)
    x0 = cfg_.sigma_max * torch.randn(len(labels), PIXELS, generator=generator)
    x, info = sample_ddim(models["main"], x0, sigmas, {"class_labels": labels}, disable=True, return_info=True,
                          transforms=guidance_transforms(run, models, cfg_))
    return x, info.nfe


def optimise(run, models, ref, cfg_, progress=None, distiller=None):
    """One distillation run at the budget; returns (final images, record) with the metric curve.

    `distiller`: one built by the caller (a variant the study's options do not make; give the run a
    `label`), used in place of `study_distiller(run, ...)`."""
    labels = labels_for(cfg_)
    gen = torch.Generator().manual_seed(cfg_.seed)
    images = initial_images(run, len(labels), cfg_)
    opt = torch.optim.Adam(images.parameters(), lr=cfg_.lr_pixels if run.param == "pixels" else cfg_.lr_mlp)
    distiller = study_distiller(run, models, labels, cfg_) if distiller is None else distiller
    is_msd = isinstance(distiller, MSD)
    marks = [round(cfg_.budget * i / cfg_.evals) for i in range(cfg_.evals + 1)]
    curve, steps, stop = [], [], None
    step = 0
    while True:
        used = distiller.nfe
        while marks and used >= marks[0]:
            with torch.no_grad():
                curve.append({"nfe": used, "step": step, **measure(images(), labels, ref)})
            marks.pop(0)
        if used >= cfg_.budget:
            break
        x = images()
        distiller.on_step(schedule_position(used, cfg_), x.detach(), gen)
        if is_msd and stop is None and should_stop(distiller.bandwidth, lam_floor=cfg_.lam_stop):
            with torch.no_grad():
                stop = {"step": step, "nfe": used, **measure(images(), labels, ref)}
        g = distiller.grad(x.detach(), gen)
        opt.zero_grad(set_to_none=True)
        x.backward(g)
        opt.step()
        if is_msd:
            steps.append({"step": step, "nfe": used, "lam": distiller.bandwidth,
                          "mean_shift_norm": float(distiller.mean_shift_norm.mean())})
        step += 1
        if progress is not None:
            progress.update(distiller.nfe - used)
    final = images().detach()
    record = {"run": asdict(run), "steps": step, "nfe": distiller.nfe, "nfe_per_step": distiller.nfe / max(step, 1),
              "curve": curve, "final": curve[-1], "msd_steps": steps[:: max(1, len(steps) // 64)]}
    if is_msd:
        record["termination"] = stop
        record["clipped_at_sigma_max"] = cfg_.lam_start / math.sqrt(2) > cfg_.sigma_max
    return final, record


def measure(x, labels, ref):
    """class_metrics of images x against the reference data (held-out features, training pixels)."""
    return class_metrics(ref["classifier"], x, labels, ref["heldout_x"], ref["heldout_labels"], ref["train_x"])


def likelihood(x, labels, models, cfg_):
    """NLL (bits per pixel) of images under the unguided class-conditional model."""
    g = torch.Generator().manual_seed(cfg_.seed + 2)
    return nll_bpp(models["main"], x, labels, generator=g, steps=cfg_.nll_steps, sigma_max=cfg_.sigma_max, probes=2)


def quick_config():
    """A tiny setting for the test suite: every method and parametrisation runs, in seconds."""
    return replace(DigitsConfig(), particles_per_class=2, budget=96, scales=(3.0,), evals=2, msd_steps=4,
                   ddim_steps=4, nll_steps=4)
