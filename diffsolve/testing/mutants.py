"""Planted bugs: a correct Heun solver and k-diffusion wrappers with one defect each, and the check that must flag
it (the kit's negative controls; tests/test_testing_kit.py runs them, docs/stability.md lists what caught each).

`solver_mutants()`: `ReferenceHeun` (Karras et al. 2022, Algorithm 2: Heun with optional churn; it applies split
flows itself, Lie after the step) and one mutant per defect. `kdiffusion_mutants(sample_heun, sample_euler_ancestral)`:
the same defects planted around k-diffusion's own functions (passed in: the core does not import k-diffusion).
Each entry is name -> (sampler for `check_sampler`, {meta}, the check that must fail).
"""
import torch

from ..sampling import Solver, sample
from .samplers import RunResult, Sampler

__all__ = ["ReferenceHeun", "kdiffusion_mutants", "solver_mutants"]


class ReferenceHeun(Solver):
    """Heun's method on dx/dsigma = (x - D) / sigma with Karras's churn (gamma = min(churn / N, sqrt 2 - 1));
    Euler on the last step to 0; split flows applied after the step (absorbs_flows). `bug` plants one defect."""

    name, order, absorbs_flows = "reference_heun", 2, True

    def __init__(self, churn=0.0, bug=None, model=None):
        self.churn, self.bug, self.model = float(churn), bug, model
        self.stochastic = self.churn > 0

    def drift(self, sigmas, i):
        hat = self._hat(sigmas, i)
        return (hat ** 2 - sigmas[i + 1] ** 2) / (sigmas[i] ** 2 - sigmas[i + 1] ** 2)

    def _hat(self, sigmas, i):
        gamma = min(self.churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if self.churn > 0 else 0.0
        return sigmas[i] * (1 + gamma)

    def _noise(self, s, sigma_hat):
        if self.bug == "batch_noise":  # seeded by the batch size: each row's noise depends on the batch
            g = torch.Generator().manual_seed(s.x.shape[0])
            return torch.randn(s.x.shape, generator=g, dtype=s.x.dtype)
        if self.bug == "global_rng":
            return torch.randn_like(s.x)
        return s.noise(s.sigma, sigma_hat)

    def step(self, s):
        sigma_hat = self._hat(s.sigmas, s.i)
        x = s.x
        if sigma_hat > s.sigma:
            x = x + self._noise(s, sigma_hat) * (sigma_hat ** 2 - s.sigma ** 2) ** 0.5
        elif self.bug == "global_rng":
            x = x + 1e-9 * s.sigma * torch.randn_like(x)
        d = (x - s.denoise(x, sigma_hat)) / sigma_hat
        h = s.sigma_next - sigma_hat
        # the Euler point; "in_place" computes it in x's own buffer (the caller's tensor on the first step)
        out = x.add_(d, alpha=h) if self.bug == "in_place" else x + h * d
        if s.sigma_next > 0:
            start = out - h * d if self.bug == "in_place" else x
            den = self.model if self.bug == "uncounted" else s.denoise  # "uncounted": the raw model, not s.denoise
            d2 = (out - den(out, s.sigma_next * out.new_ones(out.shape[0]))) / s.sigma_next
            w = 0.25 if self.bug == "coefficient" else 0.5  # Heun averages the two slopes
            out = start + h * ((1 - w) * d + w * d2)
        ends = (s.sigma_next, s.sigma) if self.bug == "flow_sign" else (s.sigma, s.sigma_next)
        for f in s.flows:  # Lie: the exact flows after the step ("flow_sign" integrates them backwards)
            out = f.apply(out, ends[0], ends[1], s.drift)
        return out


def _heun_sampler(name, bug=None, churn=0.0):
    """A Sampler on diffsolve's loop; the "uncounted" mutant is built per run around the run's model."""
    def run(model, x, sigmas, noise, transforms):
        solver = ReferenceHeun(churn, bug, model if bug == "uncounted" else None)
        y, info = sample(solver, model, x, sigmas, disable=True, noise_sampler=noise.sampler(x),
                         transforms=transforms, return_info=True)
        return RunResult(y, info.nfe)
    return Sampler(name, run, kind="diffsolve", order=2, stochastic=churn > 0, flows=True)


def solver_mutants():
    """name -> (sampler, meta, the check that must fail); "original" and "original_churn" must pass every check."""
    return {
        "original": (_heun_sampler("reference_heun"), {}, None),
        "original_churn": (_heun_sampler("reference_heun_churn", churn=10.0), {}, None),
        "coefficient": (_heun_sampler("heun_first_order_weight", "coefficient"), {}, "order"),
        "batch_noise": (_heun_sampler("heun_batch_seeded_noise", "batch_noise", churn=10.0), {}, "batch_invariance"),
        "uncounted": (_heun_sampler("heun_uncounted_call", "uncounted"), {}, "nfe"),
        "global_rng": (_heun_sampler("heun_global_rng", "global_rng"), {}, "determinism"),
        "flow_sign": (_heun_sampler("heun_flow_sign", "flow_sign"), {}, "stiff_flow"),
        "in_place": (_heun_sampler("heun_in_place", "in_place"), {}, "purity"),
    }


def kdiffusion_mutants(sample_heun, sample_euler_ancestral):
    """The defects planted around k-diffusion's `sample_heun` (and `sample_euler_ancestral` for the noise one).
    The original wraps `sample_heun` in `torch.random.fork_rng()`: k-diffusion draws `torch.randn_like(x)` at every
    step even with s_churn = 0 (unused), which the global_rng check reports for the bare function."""

    def heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
        with torch.random.fork_rng():
            return sample_heun(model, x, sigmas, extra_args, callback, disable)

    def heun_coefficient(model, x, sigmas, extra_args=None, callback=None, disable=None):
        """Step by step, the Heun average (1/2, 1/2) moved to (5/8, 3/8) with the Euler step of the same call."""
        for i in range(len(sigmas) - 1):
            seen = {}
            grid = sigmas[i:i + 2]
            y = heun(model, x, grid, extra_args, lambda d: seen.update(d), disable)
            if grid[1] > 0:
                euler = seen["denoised"] + (grid[1] / grid[0]) * (x - seen["denoised"])
                y = y + 0.25 * (euler - y)
            x = y
        return x

    def heun_uncounted(model, x, sigmas, extra_args=None, callback=None, disable=None):
        """A preview of every step's denoised image: one model call per step more than Heun's count."""
        ones = x.new_ones(x.shape[0])
        return heun(model, x, sigmas, extra_args, lambda d: model(d["x"], d["sigma"] * ones), disable)

    def heun_global_rng(model, x, sigmas, extra_args=None, callback=None, disable=None):
        """k-diffusion's own churn, whose noise is torch.randn_like: the global RNG."""
        return sample_heun(model, x, sigmas, extra_args, callback, disable, s_churn=1.0)

    def heun_flow_sign(model, x, sigmas, extra_args=None, callback=None, disable=None):
        """The probability-flow drift (x - D) / sigma with its sign flipped (D' = 2x - D)."""
        return heun(lambda z, s, **c: 2 * z - model(z, s, **c), x, sigmas, extra_args, callback, disable)

    def heun_in_place(model, x, sigmas, extra_args=None, callback=None, disable=None):
        """The result written back into the caller's x (a buffer reused to save memory)."""
        return x.copy_(heun(model, x, sigmas, extra_args, callback, disable))

    def ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
        return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler)

    def ancestral_batch_noise(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
        """Noise from a generator seeded by the batch size."""
        g = torch.Generator().manual_seed(x.shape[0])
        ns = lambda a, b: torch.randn(x.shape, generator=g, dtype=x.dtype)  # noqa: E731
        return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, noise_sampler=ns)

    h, a = {"name": "sample_heun"}, {"name": "sample_euler_ancestral"}
    return {"original": (heun, h, None), "original_ancestral": (ancestral, a, None),
            "coefficient": (heun_coefficient, h, "order"),
            "batch_noise": (ancestral_batch_noise, a, "batch_invariance"),
            "uncounted": (heun_uncounted, h, "nfe"), "global_rng": (heun_global_rng, h, "determinism"),
            "flow_sign": (heun_flow_sign, h, "order"), "in_place": (heun_in_place, h, "purity")}
