"""A LoRA variational denoiser for VSD (ProlificDreamer) over a diffusers UNet, through PEFT as current
diffusers does it (`unet.add_adapter(LoraConfig(...))`).

    lora = LoRAVariational(unet, scheduler, encoder_hidden_states=emb)
    vsd = VSD(denoiser_from_unet(unet, scheduler), variational=lora.denoiser, variational_update=lora,
              extra_args={"encoder_hidden_states": emb})

The LoRA UNet is a deep copy of `unet` (the given UNet is never modified); LoRA's B matrices start at
zero, so at construction the variational denoiser equals the pretrained one exactly. Each call
`lora(particles, generator)` takes one Adam step on the LoRA parameters of threestudio's VSD LoRA loss
(timestep t ~ U{0, ..., T-1}, noise n, z_t = sqrt(abar_t) x + sqrt(1 - abar_t) n, MSE of the UNet output
against n, or against v for v-prediction) and returns `denoiser`.
"""
import copy

import torch

from .diffusers import denoiser_from_unet

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


class _BoundCondition(torch.nn.Module):
    """A denoiser with default condition keyword arguments bound (VSD calls its variational as D(z, sigma));
    tensors with batch 1 are expanded to x's batch."""

    def __init__(self, denoiser, cond):
        super().__init__()
        self.inner = denoiser
        self.cond = dict(cond)

    def forward(self, x, sigma, **cond):
        bound = {}
        for key, value in self.cond.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 1 and x.shape[0] > 1:
                value = value.expand(x.shape[0], *value.shape[1:])
            bound[key] = value
        return self.inner(x, sigma, **{**bound, **cond})


class LoRAVariational:
    """The variational model of VSD: a LoRA-adapted copy of a diffusers UNet, refitted by one Adam step per
    call. `denoiser` is the diffsolve denoiser D(x, sigma) over the LoRA UNet with `encoder_hidden_states`
    bound; `lora_parameters()` are the only trainable parameters."""

    def __init__(self, unet, scheduler, rank=4, lr=1e-3, target_modules=DEFAULT_TARGET_MODULES, seed=0,
                 encoder_hidden_states=None, betas=(0.9, 0.999), steps_per_update=1):
        from peft import LoraConfig

        if int(rank) < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"LoRAVariational trains epsilon or v_prediction UNets, got {prediction_type!r}")
        self.scheduler, self.prediction_type = scheduler, prediction_type
        self.steps = int(steps_per_update)
        self.encoder_hidden_states = encoder_hidden_states

        self.unet = copy.deepcopy(unet).eval()
        for p in self.unet.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA A's random init; B is zero (init_lora_weights=True)
            self.unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights=True,
                                             target_modules=list(target_modules)))
        params = []
        for name, p in self.unet.named_parameters():
            is_lora = "lora_" in name
            p.requires_grad_(is_lora)
            if is_lora:
                params.append(p)
        if not params:
            raise ValueError(f"no LoRA parameters were added: target_modules {list(target_modules)} match no "
                             f"module of the UNet")
        self._params = params
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=betas)

        cond = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        self.denoiser = _BoundCondition(denoiser_from_unet(self.unet, scheduler), cond)
        acp = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        self._alphas_cumprod = acp
        self.num_train_timesteps = len(acp)

    def lora_parameters(self):
        return list(self._params)

    def loss(self, particles, generator=None):
        """threestudio's LoRA loss on the (detached) particles: t ~ U{0..T-1}, MSE of the UNet output."""
        x = particles.detach()
        b = x.shape[0]
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        abar = self._alphas_cumprod.to(x.device)[t]
        a = abar.sqrt().to(x.dtype).view(b, *([1] * (x.ndim - 1)))
        s = (1 - abar).sqrt().to(x.dtype).view(b, *([1] * (x.ndim - 1)))
        z = a * x + s * noise
        target = noise if self.prediction_type == "epsilon" else a * noise - s * x
        ehs = self.encoder_hidden_states
        if isinstance(ehs, torch.Tensor) and ehs.shape[0] == 1 and b > 1:
            ehs = ehs.expand(b, *ehs.shape[1:])
        out = self.unet(z, t, encoder_hidden_states=ehs).sample
        return torch.nn.functional.mse_loss(out.float(), target.float(), reduction="mean")

    def __call__(self, particles, generator=None):
        """One Adam step (per `steps_per_update`) on the LoRA parameters; returns `denoiser`."""
        for _ in range(self.steps):
            with torch.enable_grad():
                loss = self.loss(particles, generator)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
            self.last_loss = loss.item()
        return self.denoiser
