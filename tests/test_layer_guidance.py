"""Layer-perturbing guidance (integrations/layer_guidance.py) on diffusers' tiny random UNet and a tiny DiT:
PAG equals StableDiffusionPAGPipeline (pag_applied_layers=["mid"], DDIM) with and without CFG; every kind's
perturbed prediction differs from the plain one; the hooks leave the modules exactly as they were (also after an
exception); the combinations follow diffusers' guiders' formulas; the extra model calls are counted."""
import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from conftest import tiny_sd_components  # noqa: E402

import diffsolve as ds  # noqa: E402
from diffsolve.denoisers import VPDenoiser  # noqa: E402
from diffsolve.integrations.diffusers import SDDenoiser, from_ve, sigmas_from_scheduler, to_ve  # noqa: E402
from diffsolve.integrations.layer_guidance import (LayerPerturbation, PerturbedGuidance,  # noqa: E402
                                                   block_stacks, layer_skip_autoguidance, perturbed,
                                                   perturbed_attention_guidance, skip_layer_guidance,
                                                   smoothed_energy_guidance)

torch.set_num_threads(1)
N = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def parts():
    return tiny_sd_components()


def _state(module):
    """Everything the hooks could leave behind: per module, its instance attributes' names and the identity of
    its forward; the attention processors by identity."""
    return ([(name, sorted(vars(m)), m.forward.__func__ if hasattr(m.forward, "__func__") else m.forward)
             for name, m in module.named_modules()],
            {k: id(v) for k, v in module.attn_processors.items()} if hasattr(module, "attn_processors") else None)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 8, generator=g),
            torch.randn(1, 77, 8, generator=g))


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])  # the pipeline runs CFG only above 1
def test_pag_equals_the_stock_pag_pipeline(parts, guidance_scale):
    from diffusers import StableDiffusionPAGPipeline
    unet, sched, vae = parts
    latents, emb, neg = _inputs()
    before = _state(unet)
    pipe = StableDiffusionPAGPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                      pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    cfg_kw = dict(negative_prompt_embeds=neg) if guidance_scale > 1 else {}
    ref = pipe(prompt_embeds=emb, height=32, width=32, num_inference_steps=N, guidance_scale=guidance_scale,
               pag_scale=3.0, output_type="latent", latents=latents.clone(), **cfg_kw).images
    assert _state(unet) == before  # the pipeline restores its processors too: both runs see the same UNet

    sigmas, _ = sigmas_from_scheduler(sched, N)
    den = SDDenoiser(unet=unet, scheduler=sched)
    opts = dict(cfg_scale=guidance_scale, uncond={"encoder_hidden_states": neg}) if guidance_scale > 1 else {}
    extra = {"encoder_hidden_states": emb}

    def run(transforms):
        x, info = ds.sample_ddim(den, to_ve(latents, sigmas[0]), sigmas, extra, disable=True, transforms=transforms,
                                 return_info=True)
        return from_ve(x, sigmas[-1]), info

    ours, info = run([perturbed_attention_guidance(unet, 3.0, "mid", **opts)])
    assert (ours - ref).abs().max().item() < 1e-4
    assert info.nfe == N * (3 if guidance_scale > 1 else 2)  # the perturbed evaluation is counted
    assert _state(unet) == before  # hooks gone after the run
    # negative controls: PAG on another block, or no PAG at all, land elsewhere
    other, _ = run([perturbed_attention_guidance(unet, 3.0, "down_blocks", **opts)])
    assert (other - ref).abs().max().item() > 1e-2
    plain, _ = run([ds.cfg(guidance_scale, uncond={"encoder_hidden_states": neg})] if opts else [])
    assert (plain - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", ["pag", "slg", "seg", "skip"])
def test_each_perturbation_changes_the_prediction_and_leaves_no_trace(parts, kind):
    unet, sched, _ = parts
    latents, emb, _ = _inputs(2)
    den = SDDenoiser(unet=unet, scheduler=sched, prompt_embeds=emb)
    x, sigma = to_ve(latents, 3.0) * 1.0, torch.tensor([3.0])
    before = _state(unet)
    p = LayerPerturbation(unet, kind, "mid")
    assert _state(unet) == before  # the construction-time check installs and removes
    with torch.no_grad():
        d_c = den(x, sigma)
        with perturbed(p):
            assert _state(unet) != before  # the hooks are in place
            d_p = den(x, sigma)
        assert _state(unet) == before
        assert torch.equal(den(x, sigma), d_c)  # the model is itself again, to the bit
    assert (d_p - d_c).abs().max().item() > 1e-3


def test_hooks_removed_when_the_perturbed_call_raises(parts):
    unet, sched, _ = parts
    latents, emb, _ = _inputs(3)
    den = SDDenoiser(unet=unet, scheduler=sched, prompt_embeds=emb)
    before = _state(unet)
    calls = []

    def failing(x, sigma, **cond):  # fails on the second (perturbed) call
        calls.append(_state(unet) == before)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return den(x, sigma, **cond)

    guided = perturbed_attention_guidance(unet, 2.0).wrap(failing, ds.Run(1))
    with pytest.raises(RuntimeError, match="boom"):
        guided(to_ve(latents, 2.0), torch.tensor([2.0]))
    assert calls == [True, False]  # plain call without hooks, perturbed call with them
    assert _state(unet) == before
    # an install that fails halfway (the second block stack is gone) takes the first one's hooks back out
    from diffusers.hooks import LayerSkipConfig
    p = LayerPerturbation(unet, "pag", ["mid", "down_blocks"])
    assert len(p.configs) == 2
    p.configs[1] = LayerSkipConfig(indices=[0], fqn="nowhere.transformer_blocks", skip_attention=False,
                                   skip_attention_scores=True, skip_ff=False)
    with pytest.raises(ValueError, match="nowhere"):
        with perturbed(p):
            pass
    assert _state(unet) == before


def test_combinations_follow_the_guiders_formulas(parts):
    """SLG with CFG (diffusers' SkipLayerGuidance.forward: u + g (c - u) + s (c - p)), paper convention g = 1 + w;
    PAG without CFG (pipeline: c + s (c - p)); layer-skip autoguidance (AutoGuidance.forward: p + g (c - p))."""
    unet, sched, _ = parts
    latents, emb, neg = _inputs(4)
    den = SDDenoiser(unet=unet, scheduler=sched)
    x, sigma, cond = to_ve(latents, 2.0), torch.tensor([2.0]), {"encoder_hidden_states": emb}
    with torch.no_grad():
        c, u = den(x, sigma, **cond), den(x, sigma, encoder_hidden_states=neg)
        p_slg = LayerPerturbation(unet, "slg", "mid")
        with perturbed(p_slg):
            p = den(x, sigma, **cond)
        run = ds.Run(1)
        counted = run.count(den)
        out = PerturbedGuidance(p_slg, 1.5, cfg_scale=4.0, uncond={"encoder_hidden_states": neg},
                                convention="paper").wrap(counted, run)(x, sigma, **cond)
        assert (out - (u + 5.0 * (c - u) + 1.5 * (c - p))).abs().max().item() < 1e-4
        assert run.info.nfe == 3 and torch.allclose(run.uncond, u, atol=1e-5)
        unbatched = PerturbedGuidance(p_slg, 1.5, cfg_scale=5.0, uncond={"encoder_hidden_states": neg},
                                      batched=False).wrap(den, ds.Run(1))(x, sigma, **cond)
        assert (unbatched - out).abs().max().item() < 1e-4
        ag = layer_skip_autoguidance(unet, 2.5, "mid")
        with perturbed(ag.perturbation):
            p_skip = den(x, sigma, **cond)
        out = ag.wrap(den, ds.Run(1))(x, sigma, **cond)
        assert (out - (p_skip + 2.5 * (c - p_skip))).abs().max().item() < 1e-4
        assert torch.equal(p_skip, p)  # dropout 1 skips the block outright, as SLG does


def test_sigma_range_skips_the_perturbed_call(parts):
    unet, sched, _ = parts
    latents, emb, _ = _inputs(5)
    den = SDDenoiser(unet=unet, scheduler=sched, prompt_embeds=emb)
    sigmas, _ = sigmas_from_scheduler(sched, 6)
    lo, hi = float(sigmas[3]), float(sigmas[1])  # sigmas[1] and sigmas[2] lie in (lo, hi]
    inside = sum(1 for s in sigmas[:-1] if lo < float(s) <= hi)
    _, info = ds.sample_ddim(den, to_ve(latents, sigmas[0]), sigmas, disable=True, return_info=True,
                             transforms=[perturbed_attention_guidance(unet, 3.0, sigma_range=(lo, hi))])
    assert inside == 2 and info.nfe == 6 + inside


def test_transformer_layers_by_index(parts):
    """A tiny DiT: integer layers index the `transformer_blocks` stack (fqn="auto", diffusers' guiders' naming)."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=3,
                                norm_num_groups=2, sample_size=8, patch_size=2).eval()
    assert block_stacks(dit) == {"transformer_blocks": 3}

    class Eps(torch.nn.Module):
        def forward(self, z, t, class_labels=None):
            return dit(z, t.reshape(-1).expand(z.shape[0]), class_labels, return_dict=False)[0]

    den = VPDenoiser(Eps(), parts[1].alphas_cumprod)
    g = torch.Generator().manual_seed(6)
    x, sigma, labels = torch.randn(2, 4, 8, 8, generator=g) * 2, torch.tensor([2.0, 2.0]), torch.tensor([1, 7])
    before = _state(dit)
    with torch.no_grad():
        d_c = den(x, sigma, class_labels=labels)
        for kind, guide in (("slg", skip_layer_guidance(dit, 2.8, [1])),
                            ("seg", smoothed_energy_guidance(dit, 2.8, [1])),
                            ("pag", perturbed_attention_guidance(dit, 3.0, [1]))):
            out = guide.wrap(den, ds.Run(2))(x, sigma, class_labels=labels)
            assert (out - d_c).abs().max().item() > 1e-3, kind
            assert _state(dit) == before, kind
        one, two = (skip_layer_guidance(dit, 1.0, [i]).wrap(den, ds.Run(2))(x, sigma, class_labels=labels)
                    for i in (1, 2))
        assert (one - two).abs().max().item() > 1e-3  # the index picks the block


def test_bad_options_are_refused_before_work(parts):
    unet = parts[0]
    with pytest.raises(ValueError, match="matches no transformer block"):
        LayerPerturbation(unet, "pag", "nowhere")
    with pytest.raises(ValueError, match="fqn='auto'"):
        LayerPerturbation(unet, "slg", [0])  # a UNet has no top-level block stack
    with pytest.raises(ValueError, match="out of range"):
        LayerPerturbation(unet, "slg", [1], fqn="mid_block.attentions.0.transformer_blocks")
    with pytest.raises(ValueError, match="kind"):
        LayerPerturbation(unet, "blur", "mid")
    with pytest.raises(ValueError, match="dropout"):
        LayerPerturbation(unet, "skip", "mid", dropout=0.0)
    with pytest.raises(ValueError, match="both cfg_scale and uncond"):
        perturbed_attention_guidance(unet, 3.0, cfg_scale=5.0)
    with pytest.raises(ValueError, match="sigma_range"):
        perturbed_attention_guidance(unet, 3.0, sigma_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="scale"):
        perturbed_attention_guidance(unet, float("nan"))
