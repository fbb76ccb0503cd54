"""Contract checks: determinism, hands off torch's global RNG, batch-size and thread-count invariance with seeded
noise, NFE honesty, finiteness over every schedule family, inputs left untouched, and the declared noise. Each
`check_<name>(sampler, config=None, **meta)` returns a `CheckReport`; `assert_<name>` is its assertion form."""
import math

import torch

from ..schedules import SCHEDULES, get_sigmas, sigmas_from_alphas_cumprod
from .checks import _mixture, _setup
from .report import CheckReport, asserting, counted, karras, noise, rel_diff
from .samplers import Noise, NotApplicable

__all__ = ["assert_batch_invariance", "assert_batch_invariance_float32", "assert_declared_noise",
           "assert_determinism", "assert_finiteness", "assert_global_rng", "assert_nfe", "assert_purity",
           "assert_thread_invariance", "check_batch_invariance", "check_batch_invariance_float32",
           "check_declared_noise", "check_determinism", "check_finiteness", "check_global_rng", "check_nfe",
           "check_purity", "check_thread_invariance", "schedule_examples"]


def _grid(sampler, cfg, steps=None):
    """The contract checks' grid: Karras on [0.02, 80], with the final 0 unless the sampler runs endpoints only."""
    return karras(steps or cfg.contract_steps, cfg.order_sigma_min, cfg.order_sigma_max, cfg.rho,
                  zero=sampler.grid == "any")


def _start(cfg, rows, dtype=torch.float64, dim=2):
    return _mixture(dim).sample(rows, cfg.order_sigma_max, torch.Generator().manual_seed(cfg.seed + 1)).to(dtype)


# ------------------------------------------------------------------------------------------------- determinism
def _reruns(sampler, cfg):
    """Two runs from identical inputs and seeded noise, torch's global RNG reseeded differently before each:
    (outputs, whether a run changed the global RNG's state). The global RNG state is restored afterwards."""
    prob, sig = _mixture(2), _grid(sampler, cfg)
    x = _start(cfg, 4)
    saved = torch.random.get_rng_state()
    try:
        outs, touched = [], False
        for seed in (1234, 98765):
            torch.manual_seed(seed)
            before = torch.random.get_rng_state()
            outs.append(sampler.run(prob, x, sig, noise(cfg)).x)
            touched = touched or not torch.equal(before, torch.random.get_rng_state())
    finally:
        torch.random.set_rng_state(saved)
    return outs, touched


def check_determinism(sampler, config=None, **meta):
    """Two runs from identical inputs and seeded noise, with torch's global RNG reseeded differently before each,
    agree bit for bit (a step that draws from the global RNG, or any other hidden state, is flagged)."""
    sampler, cfg = _setup(sampler, config, meta)
    outs, _ = _reruns(sampler, cfg)
    diff = (outs[0].to(torch.float64) - outs[1].to(torch.float64)).abs().max().item()
    same = torch.equal(outs[0], outs[1])
    return CheckReport("determinism", same, diff, 0.0, "bit-identical reruns under different global seeds" if same
                       else f"reruns under different global seeds differ by {diff:.2e}")


def check_global_rng(sampler, config=None, **meta):
    """A run leaves torch's global RNG state as it found it: a sampler that draws from it (even draws it does not
    use) changes what the caller draws next."""
    sampler, cfg = _setup(sampler, config, meta)
    _, touched = _reruns(sampler, cfg)
    return CheckReport("global_rng", not touched, "drawn from" if touched else "untouched", "untouched",
                       "the run advanced torch's global RNG" if touched else "global RNG state unchanged by a run")


# ------------------------------------------------------------------------------------------------- invariance
def _batch(sampler, cfg, dtype, tol, name):
    prob, sig = _mixture(2), _grid(sampler, cfg)
    x = _start(cfg, cfg.batch_rows, dtype)
    k = cfg.batch_split
    full = sampler.run(prob, x, sig, noise(cfg, 0)).x
    parts = torch.cat([sampler.run(prob, x[:k], sig, noise(cfg, 0)).x,
                       sampler.run(prob, x[k:], sig, noise(cfg, k)).x])
    single = sampler.run(prob, x[k:k + 1], sig, noise(cfg, k)).x
    diff = max(rel_diff(full, parts), rel_diff(full[k:k + 1], single))
    ok = math.isfinite(diff) and diff <= tol
    return CheckReport(name, ok, diff, tol,
                       f"{dtype}: {cfg.batch_rows} rows at once vs rows [:{k}] + [{k}:] and row {k} alone, noise "
                       f"seeded per row (row i's noise depends on the seed and i only); largest relative difference")


def check_batch_invariance(sampler, config=None, **meta):
    """float64: a batch run equals the same rows run in two uneven parts and alone (seeded per-row noise), within
    tol64 relative."""
    sampler, cfg = _setup(sampler, config, meta)
    return _batch(sampler, cfg, torch.float64, cfg.tol64, "batch_invariance")


def check_batch_invariance_float32(sampler, config=None, **meta):
    """The same in float32, within tol32 relative."""
    sampler, cfg = _setup(sampler, config, meta)
    return _batch(sampler, cfg, torch.float32, cfg.tol32, "batch_invariance_float32")


def check_thread_invariance(sampler, config=None, **meta):
    """The same run (rows of `thread_elements` elements, so that torch's kernels do split work over threads) with
    each of `thread_counts` intra-op threads agrees within tol64 relative. The thread count is restored afterwards."""
    sampler, cfg = _setup(sampler, config, meta)
    from .checks import ORDER_MODEL
    from .problems import SingleGaussian
    model = SingleGaussian(float(ORDER_MODEL.mu[0]), 0.3)
    x = model.start(4, cfg.thread_elements, cfg.order_sigma_max)
    sig = _grid(sampler, cfg, 8)
    saved = torch.get_num_threads()
    try:
        outs = []
        for n in cfg.thread_counts:
            torch.set_num_threads(n)
            outs.append(sampler.run(model, x, sig, noise(cfg)).x)
    finally:
        torch.set_num_threads(saved)
    diff = max(rel_diff(outs[0], o) for o in outs[1:])
    return CheckReport("thread_invariance", math.isfinite(diff) and diff <= cfg.tol64, diff, cfg.tol64,
                       f"threads {list(cfg.thread_counts)}, 4 rows x {cfg.thread_elements}; "
                       "largest relative difference")


# -------------------------------------------------------------------------------------------------------- NFE
def check_nfe(sampler, config=None, **meta):
    """NFE honesty: the kit wraps the model in its own counter (rows / batch per call, diffsolve's unit) and compares
    with what the sampler reports (`return_info`'s nfe, an adaptive sampler's info, or the count a k-diffusion
    function stands for, `Sampler.nfe`). measured / expected are per step; n/a when nothing is reported."""
    sampler, cfg = _setup(sampler, config, meta)
    prob, sig = _mixture(2), _grid(sampler, cfg)
    x = _start(cfg, 4)
    model, box = counted(prob, x.shape[0])
    res = sampler.run(model, x, sig, noise(cfg))
    reported = res.nfe if res.nfe is not None else (sampler.nfe(sig) if sampler.nfe is not None else None)
    steps = 1 if sampler.adaptive else len(sig) - 1  # an adaptive sampler's count is its total
    per_step = box["nfe"] / steps
    if reported is None:
        return CheckReport("nfe", None, per_step, None, f"counted {box['nfe']:g} over {steps} steps; "
                                                        f"the sampler reports no count")
    ok = abs(reported - box["nfe"]) < 1e-9
    return CheckReport("nfe", ok, per_step, reported / steps,
                       f"counted {box['nfe']:g} evaluations ({box['calls']} calls) over {len(sig) - 1} grid steps, "
                       f"reported "
                       f"{reported:g}" + ("" if ok else f": {box['nfe'] - reported:+g} uncounted"))


# ------------------------------------------------------------------------------------------------- finiteness
_SD_TABLE = None


def _model_sigmas():
    """Stable Diffusion's training sigmas (scaled_linear betas 0.00085..0.012, 1000 steps), for table schedules."""
    global _SD_TABLE
    if _SD_TABLE is None:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        _SD_TABLE = sigmas_from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    return _SD_TABLE


def schedule_examples(n):
    """{family: sigmas} for every family of `diffsolve.SCHEDULES` at n steps, with typical parameters (range
    schedules on [0.0292, 14.6], Stable Diffusion's span; table schedules on its training sigmas)."""
    table = _model_sigmas()
    lo, hi = float(table[0]), float(table[-1])
    params = {"karras": dict(sigma_min=lo, sigma_max=hi), "exponential": dict(sigma_min=lo, sigma_max=hi),
              "polyexponential": dict(sigma_min=lo, sigma_max=hi), "vp": {},
              "linear_quadratic": dict(sigma_max=hi), "kl_optimal": dict(sigma_min=lo, sigma_max=hi),
              "align_your_steps": {}, "beta": dict(model_sigmas=table)}
    out = {}
    for name in SCHEDULES:
        kw = params.get(name, dict(model_sigmas=table))
        try:
            out[name] = get_sigmas(name, n, **kw).to(torch.float64)
        except ValueError:
            continue
    return out


def check_finiteness(sampler, config=None, **meta):
    """Finite output on every schedule family at `finite_steps` steps, float32 and float64, on the 2-D mixture from
    sigma_max's marginal; a run that raises counts as a failure (NotApplicable grids are skipped)."""
    sampler, cfg = _setup(sampler, config, meta)
    prob, bad, runs, skipped = _mixture(2), [], 0, 0
    for n in cfg.finite_steps:
        for family, sig in schedule_examples(n).items():
            if sampler.grid != "any" and sig[-1] == 0:
                sig = sig[:-1]
            if len(sig) < 2:
                skipped += 1
                continue
            for dtype in (torch.float32, torch.float64):
                x = prob.sample(4, float(sig[0]), torch.Generator().manual_seed(cfg.seed + 2)).to(dtype)
                try:
                    y = sampler.run(prob, x, sig, noise(cfg)).x
                except NotApplicable:
                    skipped += 1
                    continue
                except Exception as e:  # noqa: BLE001 - any error on a valid grid is a finding
                    bad.append(f"{family} n={n} {dtype}: {type(e).__name__}: {str(e)[:120]}")
                    runs += 1
                    continue
                runs += 1
                if not torch.isfinite(y).all():
                    bad.append(f"{family} n={n} {dtype}: non-finite output")
    return CheckReport("finiteness", not bad, len(bad), 0,
                       f"{runs} runs over {len(SCHEDULES)} schedule families ({skipped} skipped)"
                       + ("; " + "; ".join(bad[:6]) if bad else ""))


# ------------------------------------------------------------------------------------------------------ purity
def check_purity(sampler, config=None, **meta):
    """The caller's x and sigmas are bitwise unchanged by a run (a step that updates its input in place is
    flagged)."""
    sampler, cfg = _setup(sampler, config, meta)
    prob, sig = _mixture(2), _grid(sampler, cfg)
    x = _start(cfg, 4)
    x_copy, sig_copy = x.clone(), sig.clone()
    sampler.run(prob, x, sig, noise(cfg))
    changed = [name for name, a, b in (("x", x, x_copy), ("sigmas", sig, sig_copy)) if not torch.equal(a, b)]
    return CheckReport("purity", not changed, ", ".join(changed) or "none", "none",
                       "inputs changed in place: " + ", ".join(changed) if changed else "inputs left untouched")


def check_declared_noise(sampler, config=None, **meta):
    """A sampler declared deterministic gives the same output whatever the noise seed; one declared stochastic
    changes with it. n/a when nothing is declared (the kit then detects it)."""
    sampler, cfg = _setup(sampler, config, meta)
    prob, sig = _mixture(2), _grid(sampler, cfg)
    x = _start(cfg, 4)
    a = sampler.run(prob, x, sig, Noise(cfg.seed + 21)).x
    b = sampler.run(prob, x, sig, Noise(cfg.seed + 22)).x
    uses = not torch.equal(a, b)
    if sampler.stochastic is None:
        sampler.detected_stochastic = uses
        return CheckReport("declared_noise", None, "stochastic" if uses else "deterministic", None,
                           "nothing declared; detected from two noise seeds")
    declared = "stochastic" if sampler.stochastic else "deterministic"
    return CheckReport("declared_noise", uses == bool(sampler.stochastic), "stochastic" if uses else "deterministic",
                       declared, "output under two noise seeds " + ("differs" if uses else "is identical"))


assert_determinism = asserting(check_determinism)
assert_global_rng = asserting(check_global_rng)
assert_batch_invariance = asserting(check_batch_invariance)
assert_batch_invariance_float32 = asserting(check_batch_invariance_float32)
assert_thread_invariance = asserting(check_thread_invariance)
assert_nfe = asserting(check_nfe)
assert_finiteness = asserting(check_finiteness)
assert_purity = asserting(check_purity)
assert_declared_noise = asserting(check_declared_noise)
