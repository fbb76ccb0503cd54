"""threestudio's scheduled scalars, weighting names and integer timestep sampling, for the guidance in
integrations/threestudio.py. Read from threestudio's source (threestudio-project/threestudio, stored
versions: threestudio/utils/misc.py `C` with `interpolation`, threestudio/models/guidance/
stable_diffusion_guidance.py `compute_grad_sds` / `__call__`); nothing here imports threestudio.
"""
import math

import torch

__all__ = ["C", "TIMESTEP_SAMPLINGS", "WEIGHTINGS", "IntegerTimesteps", "integer_timestep_class", "weighting"]

WEIGHTINGS = ("sds", "uniform", "fantasia3d")
TIMESTEP_SAMPLINGS = ("timesteps", "karras", "log_uniform")


def _primitive(value):
    """OmegaConf ListConfig -> list without importing omegaconf (threestudio's config_to_primitive)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict)):
        return list(value)
    raise TypeError(f"a scheduled value is a number or a list, got {type(value).__name__}")


def C(value, epoch, global_step, interpolation="linear"):
    """threestudio's scheduled scalar (threestudio/utils/misc.py `C`).

    - a number: itself;
    - [start_value, end_value, end_step]: [0, start_value, end_value, end_step];
    - [start_step, start_value, end_value, end_step]: from start_value at start_step to end_value at
      end_step, clamped outside; an integer end_step counts global steps, a float end_step counts epochs;
    - [start_step, v0, v1, step1, v2, step2, ...] (6 or more entries): segments v0 -> v1 until step1,
      v1 -> v2 until step2, ...; the segment is chosen by global_step (also when the steps are epochs);
    - interpolation "linear", or "exp" (log-linear: exp((1 - f) log start + f log end))."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        value = _primitive(value)
        if len(value) == 3:
            value = [0] + value
        if len(value) >= 6:
            select = 3
            for i in range(3, len(value) - 2, 2):
                if global_step >= value[i]:
                    select = i + 2
            if select != 3:
                start_value, start_step = value[select - 3], value[select - 2]
            else:
                start_step, start_value = value[:2]
            value = [start_step, start_value, value[select - 1], value[select]]
        if len(value) != 4:
            raise ValueError(f"a scheduled value has 3, 4 or >= 6 entries, got {value!r}")
        start_step, start_value, end_value, end_step = value
        if isinstance(end_step, bool) or not isinstance(end_step, (int, float)):
            raise ValueError(f"end_step must be an int (steps) or a float (epochs), got {end_step!r}")
        current = global_step if isinstance(end_step, int) else epoch
        f = max(min(1.0, (current - start_step) / (end_step - start_step)), 0.0)
        if interpolation == "linear":
            value = start_value + (end_value - start_value) * f
        elif interpolation == "exp":
            value = math.exp(math.log(start_value) * (1 - f) + math.log(end_value) * f)
        else:
            raise ValueError(f"interpolation must be 'linear' or 'exp', got {interpolation!r}")
    return value


def weighting(name):
    """threestudio's `weighting_strategy` as w(sigma) in VE terms (abar = 1 / (1 + sigma^2)):
    "sds" 1 - abar, "uniform" 1, "fantasia3d" sqrt(abar) (1 - abar)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting_strategy must be one of {WEIGHTINGS}, got {name!r}")
    if name == "uniform":
        return lambda sigma: torch.ones_like(sigma)
    if name == "sds":
        return lambda sigma: sigma ** 2 / (1 + sigma ** 2)
    return lambda sigma: (1 + sigma ** 2).rsqrt() * sigma ** 2 / (1 + sigma ** 2)


class IntegerTimesteps:
    """Mixin over a noisy distiller: sigma of an integer t ~ U{min_step, ..., max_step} per row
    (`torch.randint(min_step, max_step + 1)` in threestudio), on `grid` (a `diffsolve.distill.sjc.TimestepGrid`
    of the scheduler's sigmas, set by the guidance); `last_t` keeps the drawn timesteps. SDI's annealed t is the grid's t_min."""

    grid = None
    last_t = None

    def draw_sigma(self, x, call):
        t, sigma = self.grid.draw(call.draws, x.shape[0], x.device)
        self.last_t = t
        return sigma.to(x.dtype)

    def sigma_t(self, step=None):  # SDI: t annealed by the guidance's update_step (min_step = max_step)
        self.last_t = torch.tensor([self.grid.t_min])
        return float(self.grid.sigma(self.grid.t_min))


def integer_timestep_class(base):
    """`base` (a noisy distiller class) with threestudio's integer timesteps (IntegerTimesteps first in the MRO)."""
    return type(f"Threestudio{base.__name__}", (IntegerTimesteps, base), {})
