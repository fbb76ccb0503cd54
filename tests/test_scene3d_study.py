"""The 3-D comparison: DistillationGuidance's pixel path (hand-written SDS gradient on a recording denoiser),
and the study's quick mode (every distiller runs at equal calls, a second call reuses the finished fields,
an interrupted call resumes to the same records)."""
import math
from dataclasses import replace

import pytest
import torch

from diffsolve.integrations.threestudio import DistillationGuidance, PixelConditions, pixel_schedule
from diffsolve_studies.scene3d import study
from diffsolve_studies.scene3d.distill import METHODS

NULL = 4


class Recording(torch.nn.Module):
    """A pixel denoiser whose output depends on the class and the camera: D = x / (1 + sigma^2) + 0.1 c a,
    c = class + 1 (0 for the null class), a = cos(azimuth) + sin(elevation); every call recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, class_labels=None, elevation=0.0, azimuth=0.0):
        s = torch.as_tensor(sigma, dtype=x.dtype).flatten().expand(x.shape[0])[:, None, None, None]
        c = torch.where(class_labels == NULL, 0, class_labels + 1).to(x.dtype)[:, None, None, None]
        a = (torch.cos(torch.deg2rad(azimuth)) + torch.sin(torch.deg2rad(elevation))).to(x.dtype)[:, None, None, None]
        out = x / (1 + s ** 2) + 0.1 * c * a
        self.calls.append(dict(x=x.clone(), sigma=s.flatten().clone(), labels=class_labels.clone(),
                               elevation=elevation.clone(), azimuth=azimuth.clone(), out=out.clone()))
        return out


def test_pixel_guidance_sds_gradient_by_hand():
    den, sched, w = Recording(), pixel_schedule(0.01, 20.0), 3.0
    g = DistillationGuidance(method="sds", guidance_scale=w, parity="threestudio", pixels=True, denoiser=den,
                             scheduler=sched, seed=5)
    rgb = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    elev, azim = torch.tensor([10.0, 30.0, -5.0]), torch.tensor([0.0, 120.0, -150.0])
    out = g(rgb, PixelConditions(2, NULL), elev, azim, torch.full((3,), 2.4))
    out["loss_sds"].backward()
    (call,) = den.calls
    B = 3
    # one batched CFG call at the render's own size (no resize), [uncond; cond], the camera in both halves
    assert call["x"].shape == (2 * B, 3, 32, 32)
    assert call["labels"].tolist() == [NULL] * B + [2] * B
    assert torch.equal(call["elevation"], elev.repeat(2)) and torch.equal(call["azimuth"], azim.repeat(2))
    # sigma on the schedule's grid, inside threestudio's [min_step, max_step]
    sigmas = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt()
    s = call["sigma"][:B].double()
    t = [int((sigmas - v).abs().argmin()) for v in s]
    assert all(20 <= ti <= 980 and abs(sigmas[ti] - v) < 1e-5 * v for ti, v in zip(t, s))
    # by hand: x = 2 rgb - 1, z = x + sigma n, D_g = D_c + w (D_c - D_u), grad = (1 - abar) (z - D_g) / sigma - n
    x = rgb.detach().permute(0, 3, 1, 2) * 2 - 1
    z = call["x"][B:]
    n = (z - x) / s.float()[:, None, None, None]
    d_u, d_c = call["out"][:B], call["out"][B:]
    d_g = d_c + w * (d_c - d_u)
    sig = s.float()[:, None, None, None]
    grad = sig ** 2 / (1 + sig ** 2) * ((z - d_g) / sig - n)
    # loss_sds = 0.5 |x - (x - grad)|^2 / B: d / d rgb = 2 grad / B (x = 2 rgb - 1), in [B, H, W, 3]
    assert torch.allclose(rgb.grad, (2 * grad / B).permute(0, 2, 3, 1), atol=1e-6)
    assert grad.abs().max() > 1e-3  # the camera and class terms reach the gradient


class NullIsGuide(torch.nn.Module):
    """`prior` for a real class; for the null class, `guide`'s output with the real class and camera."""

    def __init__(self, prior, guide, cls):
        super().__init__()
        self.prior, self.guide, self.cls = prior, guide, cls

    def forward(self, x, sigma, class_labels=None, elevation=0.0, azimuth=0.0):
        real = class_labels != NULL
        cond = self.prior(x, sigma, torch.where(real, class_labels, self.cls), elevation, azimuth)
        guided = self.guide(x, sigma, torch.where(real, class_labels, self.cls), elevation, azimuth)
        return torch.where(real[:, None, None, None], cond, guided)


@pytest.mark.parametrize("method", ["sds", "msd", "csd"])
def test_pixel_guidance_autoguidance_is_cfg_with_the_guide_as_unconditional(method):
    # autoguidance replaces D_u by the guide's D(x | class, camera): the same gradient as CFG on a model whose
    # null class answers with the guide's conditional output (an independent construction of the same field)
    prior = Recording()
    guide = Recording()
    guide.forward = lambda x, sigma, class_labels=None, elevation=0.0, azimuth=0.0: (  # a weaker, shifted model
        Recording.forward(guide, x, sigma, class_labels, elevation, azimuth) * 0.7 + 0.05)
    rgb = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    cams = (torch.tensor([0.0, 20.0]), torch.tensor([0.0, 90.0]), torch.full((2,), 2.4))
    opts = dict(method=method, guidance_scale=2.0, parity="threestudio", pixels=True, scheduler=pixel_schedule(),
                seed=4, **({"steps": 2} if method == "msd" else {}))
    key = {"sds": "loss_sds", "msd": "loss_msd", "csd": "loss_csd"}[method]
    grads = []
    for g in (DistillationGuidance(denoiser=prior, guide=guide, **opts),
              DistillationGuidance(denoiser=NullIsGuide(prior, guide, 1), **opts),
              DistillationGuidance(denoiser=prior, **opts)):  # plain CFG: must differ
        x = rgb.clone().requires_grad_()
        g(x, PixelConditions(1, NULL), *cams)[key].backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert (grads[0] - grads[2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guide must be a denoiser"):
        DistillationGuidance(denoiser=prior, guide=3.0, **opts)


def test_pixel_guidance_methods_and_errors():
    den = Recording()
    rgb = torch.rand(2, 32, 32, 3)
    cams = (torch.tensor([0.0, 20.0]), torch.tensor([0.0, 90.0]), torch.full((2,), 2.4))
    for method, key in (("msd", "loss_msd"), ("sdi_official", "loss_sdi"), ("vsd", "loss_vsd"), ("ism", "loss_ism")):
        g = DistillationGuidance(method=method, parity="threestudio", pixels=True, denoiser=den,
                                 scheduler=pixel_schedule(), **({"steps": 2} if method == "msd" else {}))
        out = g(rgb, PixelConditions(1, NULL), *cams)
        assert torch.isfinite(out[key]) and out[key] > 0
    with pytest.raises(ValueError, match="pixels=True needs"):
        DistillationGuidance(method="sds", pixels=True, denoiser=den)
    g = DistillationGuidance(method="sds", parity="threestudio", pixels=True, denoiser=den, scheduler=pixel_schedule())
    with pytest.raises(ValueError, match="PixelConditions"):
        g(rgb, object(), *cams)
    with pytest.raises(ValueError, match="one per view"):
        g(rgb, PixelConditions(1, NULL), torch.zeros(3), cams[1], cams[2])


def _strip(record):
    return {k: v for k, v in record.items() if k != "seconds"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cfg = study.quick_config()
    out = tmp_path_factory.mktemp("text3d")
    return cfg, out, study.run_study(cfg, out, progress=False)


def test_quick_study_runs_every_distiller_at_equal_calls(quick):
    cfg, _, res = quick
    runs = res["runs"]
    assert len(runs) == len(study.plan(cfg)) == len(METHODS) + 1 + len(cfg.autoguidance)
    assert {r["run"]["method"] for r in runs.values()} == set(METHODS)
    for key, r in runs.items():
        # the rule: never above the budget, within the last step's cost of it
        assert cfg.budget - r["last_step_nfe"] < r["nfe"] <= cfg.budget, key
        assert set(study.METRICS) <= set(r["final"]) and all(math.isfinite(r["final"][m]) for m in study.METRICS)
    assert runs["sds/tower/w3/none/seed0"]["nfe"] == cfg.budget  # 2 calls a step, divides the budget
    assert runs["sds/tower/w3/none/seed0"]["steps"] == cfg.budget // 2
    assert set(res["summary"]) == set(METHODS) | {"msd+paper", "sds+autoguidance", "msd+autoguidance"}
    assert "w3" in res["prior_check"] and "msd-sds/iou" in res["comparisons"]
    assert "msd+autoguidance-sds+autoguidance/iou" in res["comparisons"]
    # autoguidance's fields are guided by the weak prior: same seed and cameras, another field
    auto, plain = runs["msd/tower/w3/none/seed0/autoguidance"], runs["msd/tower/w3/none/seed0"]
    assert auto["final"]["view_error"] != plain["final"]["view_error"]


def test_quick_study_reuses_and_resumes(quick, tmp_path):
    cfg, out, first = quick
    again = study.run_study(cfg, out, progress=False)
    assert again["computed_this_call"] == 0 and again["runs"] == first["runs"]
    sub = replace(cfg, methods=("sds", "msd"), msd_paper=False, autoguidance=("msd",))
    part = study.run_study(sub, tmp_path, progress=False, stop_after=1)
    assert part["computed_this_call"] == 1 and len(part["runs"]) == 1
    done = study.run_study(sub, tmp_path, progress=False)
    assert done["computed_this_call"] == 2
    assert {k: _strip(v) for k, v in done["runs"].items()} == {k: _strip(first["runs"][k]) for k in done["runs"]}


@pytest.mark.parametrize("section, name", [("## Results: the full run (budget 400)", "text_to_3d"),
                                           ("## Results: the longer run (budget 1000)", "text_to_3d_long"),
                                           ("## Results: equal optimisation steps", "text_to_3d_steps")])
def test_docs_tables_are_the_committed_json(section, name):
    import json
    from pathlib import Path

    from conftest import load_benchmark, markdown_table
    root = Path(__file__).resolve().parents[1]
    bench = load_benchmark("text_to_3d")
    res = json.loads((root / "benchmarks" / "results" / f"{name}.json").read_text())
    generated = bench.markdown(res)
    docs = (root / "docs" / "text-to-3d.md").read_text()
    assert markdown_table(docs, section, "method") == markdown_table(generated, "## Fields", "method")


def test_equal_steps_gives_every_method_the_same_steps(tmp_path):
    cfg = replace(study.quick_config(), equal="steps", budget=3, methods=("sds", "msd", "sdi"), msd_paper=False,
                  autoguidance=())
    runs = study.run_study(cfg, tmp_path, progress=False)["runs"]
    assert {r["run"]["method"]: r["steps"] for r in runs.values()} == {"sds": 3, "msd": 3, "sdi": 3}
    assert runs["msd/tower/w3/none/seed0"]["nfe"] > runs["sds/tower/w3/none/seed0"]["nfe"] == 6  # calls differ
    with pytest.raises(ValueError, match="equal must be one of"):
        replace(cfg, equal="time")
