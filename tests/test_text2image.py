"""Text-to-2D (integrations/text2image.py) on diffusers' tiny random components, offline: every distiller
runs 3 steps at 32x32 and writes its outputs, a resumed run equals an uninterrupted one, bad input fails
before any work, and `--dry-run --tiny` reports NFE per step."""
import json

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

from diffsolve.integrations import text2image as t2i  # noqa: E402
from diffsolve.integrations.t2i_cli import main  # noqa: E402
from diffsolve.integrations.text2image import (PAPER_PROMPTS, T2IConfig, run_text2image,  # noqa: E402
                                               tiny_components, tiny_prompt_embeds)

SMALL = dict(steps=3, resolution=32, fourier_features=16, mlp_width=16, mlp_depth=2, msd_steps=4,
             strip_every=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def components():
    return tiny_components()


def test_paper_prompts():
    assert len(PAPER_PROMPTS) == 10 and len(set(PAPER_PROMPTS)) == 10


@pytest.mark.parametrize("method", ["sds", "vsd", "sdi", "msd"])
def test_every_distiller_runs_3_steps(components, tmp_path, method):
    cfg = T2IConfig(method=method, **SMALL)
    model = run_text2image(components, tiny_prompt_embeds(components, 0), cfg, tmp_path, progress=False)
    for name in ("image.png", "strip.png", "log.json", "config.json", "checkpoint.pt"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "strip").glob("*.png"))) == 3
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in log)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["method"] == method and saved["guidance_scale"] == 7.5 and saved["lr"] == 1e-2
    from PIL import Image
    assert Image.open(tmp_path / "image.png").size == (32, 32)
    assert model.render(32, 32).shape == (1, 32, 32, 3)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["msd", "sds"])
def test_resume_equals_uninterrupted(components, tmp_path, method):
    cfg = T2IConfig(method=method, **{**SMALL, "checkpoint_every": 1})
    embeds = tiny_prompt_embeds(components, 0)
    full = _weights(run_text2image(components, embeds, cfg, tmp_path / "full", progress=False))
    run_text2image(components, embeds, cfg, tmp_path / "resumed", progress=False, stop_after=2)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "resumed" / "image.png").exists()
    resumed = _weights(run_text2image(components, embeds, cfg, tmp_path / "resumed", progress=False))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    log = json.loads((tmp_path / "resumed" / "log.json").read_text())
    assert log == json.loads((tmp_path / "full" / "log.json").read_text())


def test_resume_refuses_a_different_config(components, tmp_path):
    embeds = tiny_prompt_embeds(components, 0)
    run_text2image(components, embeds, T2IConfig(method="sds", **SMALL), tmp_path, progress=False, stop_after=1)
    with pytest.raises(ValueError, match="different config"):
        run_text2image(components, embeds, T2IConfig(method="sds", **{**SMALL, "lr": 0.1}), tmp_path,
                       progress=False)


def test_bad_input_fails_before_work(components, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(t2i, "DistillationGuidance", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="downsampling factor 2"):
        run_text2image(components, tiny_prompt_embeds(components, 0), T2IConfig(**{**SMALL, "resolution": 33}),
                       tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    # on the command line, bad values are usage errors: exit status 2 and one line naming the problem
    for args, message in ((["--tiny", "--resolution", "31", "--out", str(tmp_path / "b")], "downsampling factor 2"),
                          (["--tiny", "--prompts", "--out", str(tmp_path / "c")], "non-empty"),
                          (["--model", str(tmp_path / "no_such_model"), "--out", str(tmp_path / "d")],
                           "does not exist")):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="method"):
        run_text2image(components, tiny_prompt_embeds(components, 0), T2IConfig(method="xyz"), tmp_path / "e")
    assert calls == [] and not any((tmp_path / n).exists() for n in "bcde")


def test_dry_run_tiny_writes_nfe(tmp_path, capsys):
    out = tmp_path / "nfe.json"
    main(["--dry-run", "--tiny", "--msd-steps", "4", "--nfe-out", str(out)])
    data = json.loads(out.read_text())
    nfe = {r["method"]: r["nfe_per_step"] for r in data["methods"]}
    assert sorted(nfe) == ["msd", "sdi", "sds", "vsd"]
    assert nfe["sds"] == 2.0  # one CFG pair
    assert nfe["msd"] > nfe["sds"]
    assert "UNet evals" in capsys.readouterr().out


def test_main_tiny_end_to_end(tmp_path, capsys):
    main(["--tiny", "--prompts", "a cat", "--methods", "sds", "--steps", "2", "--out", str(tmp_path)])
    run = tmp_path / "sds" / "00_a_cat" / "seed0"
    assert (run / "image.png").is_file() and (run / "prompt.txt").read_text() == "a cat\n"
    out = capsys.readouterr().out
    assert "FID skipped" in out and "CLIP similarity skipped" in out


def test_mismatched_embeddings_fail_before_work(components, tmp_path, monkeypatch):
    """Prompt embeddings of another dtype or device than the UNet's: a ValueError naming both, before the
    guidance is built or anything is written (the 'meta' device stands in for another device)."""
    calls = []
    monkeypatch.setattr(t2i, "DistillationGuidance", lambda *a, **k: calls.append(1))
    cond, uncond = tiny_prompt_embeds(components, 0)
    cfg = T2IConfig(**SMALL)
    with pytest.raises(ValueError, match=r"\(cond\) has dtype torch.float64 but the UNet has dtype torch.float32"):
        run_text2image(components, (cond.double(), uncond), cfg, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"\(uncond\) is on device meta but the UNet is on device cpu"):
        run_text2image(components, (cond, uncond.to("meta")), cfg, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="floating-point"):
        run_text2image(components, (cond.long(), uncond), cfg, tmp_path / "c", progress=False)
    assert calls == [] and not any((tmp_path / n).exists() for n in "abc")


def test_msd_terminates_when_lambda_falls_below_lambda_1(components, tmp_path):
    """§4.5: with stop_when_converged the run ends at the first step whose bandwidth is below 1e-2
    (computed here from the log-linear schedule), writes its image and says so; without, it runs on."""
    import math
    kw = {**SMALL, "steps": 5, "distiller_kwargs": {"bandwidth_start": 2.0, "bandwidth_end": 1e-4}}
    lam = [math.exp(math.log(2.0) + k / 5 * (math.log(1e-4) - math.log(2.0))) for k in range(5)]
    expected = next(k for k, v in enumerate(lam) if v < 1e-2)
    assert 0 < expected < 4
    embeds = tiny_prompt_embeds(components, 0)
    run_text2image(components, embeds, T2IConfig(method="msd", stop_when_converged=True, **kw), tmp_path / "a",
                   progress=False)
    assert json.loads((tmp_path / "a" / "termination.json").read_text())["converged_at_step"] == expected
    assert [r["step"] for r in json.loads((tmp_path / "a" / "log.json").read_text())] == list(range(1, expected + 1))
    assert (tmp_path / "a" / "image.png").is_file()
    run_text2image(components, embeds, T2IConfig(method="msd", **kw), tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "termination.json").exists()
    assert len(json.loads((tmp_path / "b" / "log.json").read_text())) == 5


def test_guidance_interval_limits_cfg(components):
    """CFG in (lo, hi]: an interval holding every sigma is plain CFG; one holding none is no guidance
    (w = 0), for the same seed; a bad interval is refused."""
    from diffsolve.integrations.threestudio import DistillationGuidance
    cond, uncond = tiny_prompt_embeds(components, 0)
    utils = t2i._PromptUtils(cond, uncond)
    x = torch.randn(1, 8, 8, 4, generator=torch.Generator().manual_seed(0))  # latents, channels last

    def grad(**kw):
        g = DistillationGuidance(components, method="sds", seed=3, **kw)
        g.update_step(0, 0)
        latents = torch.nn.Parameter(x.clone())
        g(latents, utils, rgb_as_latents=True)["loss_sds"].backward()
        return latents.grad

    full, none = grad(), grad(guidance_scale=0.0)
    assert (full - none).abs().max() > 1e-4  # guidance matters here, so the checks below can fail
    assert torch.allclose(grad(guidance_interval=(0.0, 1e6)), full, atol=1e-6)
    assert torch.allclose(grad(guidance_interval=(1e5, 1e6)), none, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(2.0, 1.0\)"):
        DistillationGuidance(components, method="sds", guidance_interval=(2.0, 1.0))
