"""VSD's camera-conditioned LoRA as threestudio builds it (threestudio/models/guidance/stable_diffusion_vsd_guidance.py,
stored version): a LoRA copy of the UNet whose class embedding is a `TimestepEmbedding(16, time_embed_dim)` fed the
flattened 4x4 camera matrix (`camera_condition_type`: "extrinsics" = c2w, or "mvp" = mvp_mtx);

- the variational prediction (`compute_grad_vsd`) is CFG over the camera, in the diffusers form
  est_uncond + guidance_scale_lora (est_camera - est_uncond), where both use the text condition and the
  unconditional branch gets a zero camera;
- its loss (`train_lora`) is the denoising MSE (mean) at t ~ U{0..T-1} on `lora_n_timestamp_samples` noisy copies of
  the detached latents, the camera zeroed with probability 0.1 when `lora_cfg_training`.
The LoRA layers come from integrations/lora.py (PEFT); the camera embedding is trained with them.
"""
import torch

from .lora import LoRAVariational

__all__ = ["CAMERA_CONDITIONS", "CameraLoRA"]

CAMERA_CONDITIONS = ("extrinsics", "mvp")


class CameraLoRA(LoRAVariational):
    def __init__(self, unet, scheduler, *, camera_condition_type="extrinsics", lora_cfg_training=True, seed=0, **kw):
        from diffusers.models.embeddings import TimestepEmbedding

        if camera_condition_type not in CAMERA_CONDITIONS:
            raise ValueError(f"camera_condition_type must be one of {CAMERA_CONDITIONS}, got {camera_condition_type!r}")
        super().__init__(unet, scheduler, seed=seed, **kw)
        self.camera_condition_type, self.lora_cfg_training = camera_condition_type, bool(lora_cfg_training)
        time_dim = self.unet.time_embedding.linear_2.out_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.camera_embedding = TimestepEmbedding(16, time_dim).to(next(self.unet.parameters()).device)
        self.unet.class_embedding = self.camera_embedding
        self._params = self._params + list(self.camera_embedding.parameters())

    def camera(self, kwargs, batch):
        """The [B, 16] camera condition from the guidance call's keyword arguments (threestudio's batch)."""
        key = "c2w" if self.camera_condition_type == "extrinsics" else "mvp_mtx"
        if key not in kwargs:
            raise ValueError(f"VSD's camera-conditioned LoRA needs `{key}` (camera_condition_type="
                             f"{self.camera_condition_type!r}) among the guidance call's arguments")
        cam = kwargs[key].reshape(batch, -1).float()
        if cam.shape[1] != 16:
            raise ValueError(f"{key} must hold a 4x4 matrix per row, got shape {tuple(kwargs[key].shape)}")
        return cam

    def guided(self, z, sigma, text, camera, scale):
        """est_uncond + scale (est_camera - est_uncond), both with the text condition (VE denoiser output)."""
        den = self.denoiser.inner
        d_c = den(z, sigma, encoder_hidden_states=text, class_labels=camera.to(z.dtype))
        if scale == 1.0:
            return d_c
        d_u = den(z, sigma, encoder_hidden_states=text, class_labels=torch.zeros_like(camera, dtype=z.dtype))
        return d_u + scale * (d_c - d_u)

    def camera_loss(self, latents, text, camera, n_samples=1, generator=None):
        """threestudio's `train_lora`, differentiable in the LoRA and camera-embedding parameters."""
        x = latents.detach().repeat(n_samples, *([1] * (latents.ndim - 1)))
        b = x.shape[0]
        cam = camera
        if self.lora_cfg_training and float(torch.rand(1, generator=generator)) < 0.1:
            cam = torch.zeros_like(camera)
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        abar = self._alphas_cumprod.to(x.device)[t]
        a = abar.sqrt().to(x.dtype).view(b, *([1] * (x.ndim - 1)))
        s = (1 - abar).sqrt().to(x.dtype).view(b, *([1] * (x.ndim - 1)))
        target = noise if self.prediction_type == "epsilon" else a * noise - s * x
        text = text.expand(latents.shape[0], *text.shape[1:]) if text.shape[0] == 1 else text
        out = self.unet(a * x + s * noise, t, encoder_hidden_states=text.repeat(n_samples, 1, 1),
                        class_labels=cam.repeat(n_samples, 1)).sample
        return torch.nn.functional.mse_loss(out.float(), target.float(), reduction="mean")
