"""Per-class optimisation of a voxel field through `diffsolve.integrations.threestudio.DistillationGuidance`, as a
text-to-3D system drives a guidance: each step renders a batch of views from random cameras, calls the
guidance with the views' elevation / azimuth / distance, and descends along its loss.

The guidance runs in threestudio parity (integer timesteps, threestudio's per-method keys, loss forms and
CFG conventions) on the pixel path (`pixels=True`: the prior is a pixel-space EDM denoiser, so no VAE, no
resizing; the class is the "prompt", the null class CFG's unconditional, the camera passed per view).

Equal calls (the rule): a field's budget is `budget` model evaluations per rendered view, counted by the
distiller's `nfe` (a CFG evaluation counts 2, every inversion / chain step counts); a method takes its next
step while its count plus the cost of its last step stays within the budget (the first step always), so no
method exceeds the budget, each ends within one step's cost of it, and cheap methods take more steps. Every schedule (MSD's bandwidth,
SDI's annealed t, the guidance's `update_step`) follows the fraction of the budget spent: the guidance is
told global step f * SCHEDULE_STEPS, f = nfe / budget. Equal steps (`equal="steps"`, the paper's protocol):
the budget counts optimisation steps instead, every method takes exactly that many, f = step / budget. The guidance scale is w in the paper's convention
c + w (c - u) for every method (s = 1 + w for the methods that threestudio writes as u + s (c - u)).
"""
import math
from dataclasses import dataclass

import torch

from diffsolve.distill import DISTILLERS, DenoisingTrainer
from diffsolve.integrations.threestudio import CONVENTIONS, LOSS_KEYS, DistillationGuidance, PixelConditions, pixel_schedule
from .model import NULL_CLASS
from .render import VoxelField, random_cameras
from .world import CLASSES

__all__ = ["EQUAL", "GUIDES", "HEURISTICS", "METHODS", "SCHEDULE_STEPS", "FieldRun", "guidance_for", "optimise_field"]

METHODS = tuple(DISTILLERS)  # sds, msd, vsd, sdi, sdi_official, ism, csd, nfsd, sjc
HEURISTICS = ("none", "paper")  # "paper": §4.3, CFG (and MSD's kernel) only in `interval`, MSD centred on inversion
GUIDES = ("cfg", "autoguidance")  # the unconditional: the null class, or the weak prior with the class (Karras 2024)
SCHEDULE_STEPS = 1000  # the guidance's trainer_max_steps: its schedules run over this many budget positions
EQUAL = ("calls", "steps")  # what a field's budget counts: model calls per view, or optimisation steps


@dataclass(frozen=True)
class FieldRun:
    """One field: a method on one class from one seed, at guidance w, with or without the heuristics, guided
    by CFG or by autoguidance."""
    method: str
    cls: str
    seed: int = 0
    scale: float = 3.0
    heuristics: str = "none"
    guide: str = "cfg"

    def __post_init__(self):
        for name, value, allowed in (("method", self.method, METHODS), ("cls", self.cls, CLASSES),
                                     ("heuristics", self.heuristics, HEURISTICS), ("guide", self.guide, GUIDES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"scale must be a finite w >= 0, got {self.scale}")

    @property
    def key(self):
        tail = "" if self.guide == "cfg" else f"/{self.guide}"
        return f"{self.method}/{self.cls}/w{self.scale:g}/{self.heuristics}/seed{self.seed}{tail}"


class ViewConditioned(torch.nn.Module):
    """VSD's variational model: a trainable copy of the prior, called with the current views' class and
    cameras (`cond`, set before each guidance call), as threestudio's camera-conditioned LoRA is."""

    def __init__(self, net):
        super().__init__()
        self.net, self.cond = net, {}

    def forward(self, x, sigma):
        return self.net(x, sigma, **self.cond)


def guidance_for(run, prior, cfg, weak=None):
    """The run's DistillationGuidance on the pixel prior (see the module docstring for the options); `weak`
    is autoguidance's guide (needed when run.guide == "autoguidance")."""
    if (run.guide == "autoguidance") != (weak is not None):
        raise ValueError(f"{run.key}: autoguidance needs the weak prior, and only it takes one")
    convention = CONVENTIONS[run.method]
    scale = run.scale if convention == "paper" else 1 + run.scale
    extra = {}
    if run.method == "msd":
        extra = dict(steps=cfg.msd_steps, sampler="kernel")
        if run.heuristics == "paper":
            extra.update(kernel_interval=tuple(cfg.interval), center="inverted")
    elif run.method in ("sdi", "sdi_official"):
        extra = dict(n_inversion=cfg.sdi_inversion)
    trainer = None
    if run.method == "vsd":
        trainer = DenoisingTrainer(ViewConditioned(prior), lr=cfg.vsd_lr, p_mean=-1.2, p_std=1.2)
        extra = dict(variational=trainer.net, variational_update=trainer)
    g = DistillationGuidance(
        method=run.method, guidance_scale=scale, parity="threestudio", pixels=True, denoiser=prior,
        scheduler=pixel_schedule(*cfg.schedule_sigma), min_step_percent=cfg.step_percent[0],
        max_step_percent=cfg.step_percent[1], trainer_max_steps=SCHEDULE_STEPS, seed=run.seed,
        guidance_interval=tuple(cfg.interval) if run.heuristics == "paper" else None,
        bandwidth_start=cfg.lam_start, bandwidth_end=cfg.lam_end, nonfinite="nan_to_num", guide=weak, **extra)
    return g, trainer


def optimise_field(run, prior, cfg, progress=None, weak=None):
    """Optimise a VoxelField for `run` to the budget (`weak`: autoguidance's guide); returns (field, record)
    with the step count, the model calls per view (nfe) and the guidance's non-finite count."""
    for net in [n for n in (prior, weak) if n is not None]:
        net.requires_grad_(False)
    torch.manual_seed(run.seed)  # nothing should draw from the global generator; pinned regardless
    guidance, trainer = guidance_for(run, prior, cfg, weak)
    field = VoxelField(cfg.resolution, init_density=cfg.init_density)
    opt = torch.optim.Adam(field.parameters(), lr=cfg.lr)
    cams_gen = torch.Generator().manual_seed(10_000 + run.seed)
    prompt = PixelConditions(CLASSES.index(run.cls), NULL_CLASS)
    d, key, step, cost = guidance.distiller, LOSS_KEYS[run.method], 0, 0.0
    by_steps = cfg.equal == "steps"
    while (step < cfg.budget) if by_steps else (d.nfe == 0 or d.nfe + cost <= cfg.budget):
        used = d.nfe
        spent = step if by_steps else used
        guidance.update_step(0, min(int(spent / cfg.budget * SCHEDULE_STEPS), SCHEDULE_STEPS - 1))
        cams = random_cameras(cfg.views, generator=cams_gen, elevation=tuple(cfg.elevation))
        if trainer is not None:
            trainer.net.cond = {"class_labels": prompt.class_labels.expand(cfg.views),
                                "elevation": cams["elevation"], "azimuth": cams["azimuth"]}
        rgb = field(cams["elevation"], cams["azimuth"], cams["camera_distances"], samples=cfg.render_samples)
        out = guidance(rgb.permute(0, 2, 3, 1), prompt, cams["elevation"], cams["azimuth"], cams["camera_distances"])
        opt.zero_grad(set_to_none=True)
        out[key].backward()
        opt.step()
        step, cost = step + 1, d.nfe - used
        if progress is not None:
            progress.update(d.nfe - used)
    record = {"steps": step, "nfe": d.nfe, "nfe_per_step": d.nfe / max(step, 1), "last_step_nfe": cost,
              "nonfinite_calls": guidance.nonfinite_calls}
    return field, record
