"""`diffsolve-guidance`: diffsolve's distillers (SDS, VSD, SDI, MSD, ISM, CSD, NFSD, SJC) as a threestudio
guidance, through `diffsolve.integrations.threestudio.DistillationGuidance(parity="threestudio")`.

It is a `BaseModule` (as threestudio's VSD guidance is), so the system's optimiser finds VSD's LoRA
parameters under `system.optimizer.params.guidance`, and `loss_lora` trains them. Returned keys follow
threestudio (SDS / SJC `loss_sds`, VSD `loss_vsd` + `loss_lora`, SDI `loss_sdi`, MSD `loss_msd`, ISM
`loss_ism`, CSD `loss_csd`, NFSD `loss_nfsd`); the system weights each by `system.loss.lambda_<suffix>`.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import threestudio
import torch
from threestudio.utils.base import BaseModule

from diffsolve.integrations.diffusers import load_stable_diffusion
from diffsolve.integrations.threestudio import DistillationGuidance


@threestudio.register("diffsolve-guidance")
class DiffsolveGuidance(BaseModule):
    @dataclass
    class Config(BaseModule.Config):
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
        local_files_only: bool = True          # False allows a Hugging Face download
        half_precision_weights: bool = True
        method: str = "msd"                    # sds | vsd | sdi | msd | ism | csd | nfsd | sjc
        guidance_scale: float = 7.5            # in each method's own convention (see docs/threestudio.md)
        min_step_percent: Any = 0.02           # C() schedules accepted
        max_step_percent: Any = 0.98
        grad_clip: Optional[Any] = None
        weighting_strategy: str = "sds"        # sds | uniform | fantasia3d
        timestep_sampling: str = "timesteps"   # threestudio's integer t; or karras | log_uniform
        image_size: int = 512                  # rgb resized before the VAE
        latent_size: int = 64                  # latents resized (rgb_as_latents)
        view_dependent_prompting: bool = True
        trainer_max_steps: int = 10000
        t_anneal: bool = True                  # SDI: t from max to min step over trainer_max_steps
        bandwidth_start: float = 1e3           # MSD
        bandwidth_end: float = 1e-2
        guidance_interval: Optional[Any] = None
        guidance_scale_lora: float = 1.0       # VSD
        lora_n_timestamp_samples: int = 1
        lora_rank: int = 4
        nonfinite: str = "nan_to_num"          # threestudio's behaviour; "raise" to stop on NaN
        seed: int = 0
        distiller_kwargs: Dict[str, Any] = field(default_factory=dict)

    cfg: Config

    def configure(self) -> None:
        c = self.cfg
        dtype = torch.float16 if c.half_precision_weights else torch.float32
        components = load_stable_diffusion(c.pretrained_model_name_or_path, dtype=dtype, device=self.device,
                                           local_files_only=c.local_files_only)
        self.guidance = DistillationGuidance(
            components, method=c.method, parity="threestudio", guidance_scale=c.guidance_scale,
            min_step_percent=c.min_step_percent, max_step_percent=c.max_step_percent, grad_clip=c.grad_clip,
            weighting=c.weighting_strategy, timestep_sampling=c.timestep_sampling, image_size=c.image_size,
            latent_size=c.latent_size, view_dependent_prompting=c.view_dependent_prompting,
            trainer_max_steps=c.trainer_max_steps, t_anneal=c.t_anneal, bandwidth_start=c.bandwidth_start,
            bandwidth_end=c.bandwidth_end,
            guidance_interval=None if c.guidance_interval is None else tuple(c.guidance_interval),
            guidance_scale_lora=c.guidance_scale_lora, lora_n_timestamp_samples=c.lora_n_timestamp_samples,
            lora_rank=c.lora_rank, nonfinite=c.nonfinite, seed=c.seed, **dict(c.distiller_kwargs))

    def forward(self, rgb, prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents=False,
                guidance_eval=False, **kwargs):
        return self.guidance(rgb, prompt_utils, elevation, azimuth, camera_distances,
                             rgb_as_latents=rgb_as_latents, guidance_eval=guidance_eval, **kwargs)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False):
        self.guidance.update_step(epoch, global_step, on_load_weights)
