"""No silent wrong number in the core (issue: reliability): a model's NaN, a wrong output shape, an empty batch,
the explicit kernel face where it grows, half precision, and gradients that do not depend on the batch split."""
import math
import warnings

import pytest
import torch

from diffsolve.analytic import EmpiricalDenoiser
from diffsolve.distill import MSD, SDI, SDS, VSD, ideal_variational
from diffsolve.distill.msd import ExplicitKernelWarning
from diffsolve_studies.toy.datasets import three_component_mixture

torch.set_num_threads(1)


def nan_below(model, sigma_bad):
    """model, but NaN wherever sigma < sigma_bad."""
    def broken(x, sigma, **cond):
        out = model(x, sigma, **cond)
        s = torch.as_tensor(sigma, dtype=out.dtype).reshape(-1, *([1] * (out.ndim - 1)))
        return torch.where(s < sigma_bad, torch.full_like(out, math.nan), out)
    return broken


def distillers(model):
    return {"SDS": SDS(model, sigma_min=0.01, sigma_max=5.0),
            "SDI": SDI(model, sigma_min=0.01, sigma_max=5.0, total_steps=4, n_inversion=3),
            "VSD": VSD(model, None, variational_update=ideal_variational, sigma_min=0.01, sigma_max=5.0),
            "MSD": MSD(model, 0.5, steps=8),
            "MSD posterior": MSD(model, 0.5, sampler="posterior", steps=8),
            "MSD one call": MSD(model, 0.5, sampler="one_call")}


@pytest.mark.parametrize("name", list(distillers(None)))
def test_non_finite_model_output_is_an_error_naming_distiller_sigma_and_step(name):
    model = nan_below(three_component_mixture(), 10.0)  # NaN everywhere the distillers look
    d = distillers(model)[name]
    x = torch.randn(6, 2, dtype=torch.float64)
    d.on_step(7, x, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"^{name.split()[0]}: the model returned NaN or inf at sigma [0-9.e+-]+ "
                                         r"\(optimisation step 7"):
        d.grad(x, torch.Generator().manual_seed(0))


def test_non_finite_variational_output_is_an_error_too():
    gmm = three_component_mixture()
    d = VSD(gmm, nan_below(gmm, 10.0), sigma_min=0.01, sigma_max=5.0)
    with pytest.raises(ValueError, match="VSD: the model returned NaN"):
        d.grad(torch.randn(3, 2, dtype=torch.float64), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(distillers(None)))
def test_model_output_of_the_wrong_shape_is_an_error(name):
    gmm = three_component_mixture()
    d = distillers(lambda x, sigma, **c: gmm(x, sigma)[:, :1])[name]
    x = torch.randn(4, 2, dtype=torch.float64)
    d.on_step(0, x)
    with pytest.raises(ValueError, match=r"returned shape \(\d+, 1\) for x of shape \(\d+, 2\)"):
        d.grad(x, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(distillers(None)))
def test_empty_batch_is_an_error_before_work(name):
    calls = []
    d = distillers(lambda x, sigma, **c: calls.append(1) or x)[name]
    with pytest.raises(ValueError, match="non-empty batch"):
        d.grad(torch.zeros(0, 2, dtype=torch.float64))
    assert not calls


def test_explicit_score_face_warns_before_work_and_refuses_its_own_growth():
    """The paper's lambda 0.316 with 32 steps: explicit Euler grows (max gradient was 3.5e7 where the exact one
    is about 1); the split face is fine there, and the score face at a bandwidth where Euler is stable runs."""
    gmm = three_component_mixture()
    x = torch.zeros(4, 2, dtype=torch.float64)
    calls = []

    def counting(z, sigma, **c):
        calls.append(1)
        return gmm(z, sigma)
    with pytest.warns(ExplicitKernelWarning, match=r"sigma \|dsigma\| / lambda\^2 = [0-9.]+ > 1"):
        with pytest.raises(ValueError, match="explicit kernel term grew the chain"):
            MSD(counting, 0.316, face="score", steps=32, eta=0.0).grad(x, torch.Generator().manual_seed(0))
    assert MSD(gmm, 0.316, face="split", steps=32).grad(x, torch.Generator().manual_seed(0)).abs().max() < 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MSD(gmm, 3.0, face="score", steps=32).grad(x, torch.Generator().manual_seed(0)).abs().max() < 3


def test_empirical_denoiser_in_half_precision_at_small_sigma():
    pts = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)).half()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1)).half()
    for sigma in (1.0, 0.002, 1e-4):
        out = EmpiricalDenoiser(pts)(x, torch.full((8,), sigma, dtype=torch.float16))
        ref = EmpiricalDenoiser(pts.double())(x.double(), sigma)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert (out.double() - ref).abs().max() < 2e-3


@pytest.mark.parametrize("make", [lambda m: SDS(m), lambda m: MSD(m, 0.5, steps=8, n_samples=3),
                                  lambda m: MSD(m, 0.7, sampler="posterior", steps=8, n_samples=2),
                                  lambda m: SDI(m, total_steps=4, n_inversion=3)],
                         ids=["sds", "msd-kernel", "msd-posterior", "sdi"])
def test_seeded_gradients_do_not_depend_on_the_batch_split(make):
    gmm = three_component_mixture()
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = make(gmm).grad(x, seed=123)
    parts = torch.cat([make(gmm).grad(x[:4], seed=123), make(gmm).grad(x[4:], seed=123, row_offset=4)])
    assert (whole - parts).abs().max() < 1e-12
    wrong = torch.cat([make(gmm).grad(x[:4], seed=123), make(gmm).grad(x[4:], seed=123)])  # rows re-used
    assert (whole - wrong).abs().max() > 1e-3
    with pytest.raises(ValueError, match="a generator or a seed"):
        make(gmm).grad(x, torch.Generator(), seed=1)
