"""Stable Diffusion helpers of diffsolve.integrations.diffusers on diffusers' tiny random components, offline:
loading what save_pretrained wrote, the kernel-flow callback inside a stock StableDiffusionPipeline (checked
against the formula and against diffsolve's own split-face DDIM), VAE helpers and bad input."""
import math

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from conftest import tiny_sd_components  # noqa: E402

import diffsolve as ds  # noqa: E402
from diffsolve.integrations.diffusers import (SDComponents, SDDenoiser, encode_prompt,  # noqa: E402
                                              final_alphas_cumprod, from_ve, kernel_flow_callback,
                                              load_stable_diffusion, sigmas_from_scheduler, to_ve,
                                              vae_decode, vae_encode)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def parts():
    return tiny_sd_components()


def _save(parts, root):
    unet, sched, vae = parts
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    sched.save_pretrained(root / "scheduler")
    return root


# a. loading ------------------------------------------------------------------------------------------------
def test_load_roundtrip_bit_identical(parts, tmp_path):
    root = _save(parts, tmp_path / "sd")
    comp = load_stable_diffusion(root)
    assert isinstance(comp, SDComponents) and comp.text_encoder is None and comp.tokenizer is None
    g = torch.Generator().manual_seed(0)
    z, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 8, generator=g)
    with torch.no_grad():
        ref = parts[0](z, 500, encoder_hidden_states=emb).sample
        out = comp.unet(z, 500, encoder_hidden_states=emb).sample
    assert torch.equal(ref, out)
    assert torch.equal(comp.scheduler.alphas_cumprod, parts[1].alphas_cumprod)
    assert comp.scheduler.config.prediction_type == parts[1].config.prediction_type
    # the wrapped denoiser is the same function either way
    x, sigma = torch.randn(2, 4, 16, 16, generator=g) * 3, torch.tensor([2.0, 5.0])
    with torch.no_grad():
        d1 = SDDenoiser(comp, prompt_embeds=emb[:1])(x, sigma)
        d2 = SDDenoiser(unet=parts[0], scheduler=parts[1])(x, sigma, encoder_hidden_states=emb[:1].expand(2, -1, -1))
    assert torch.equal(d1, d2)


def test_load_errors(parts, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_stable_diffusion(missing)
    root = _save(parts, tmp_path / "sd")
    import shutil
    shutil.rmtree(root / "unet")
    with pytest.raises(FileNotFoundError, match="unet"):
        load_stable_diffusion(root)
    root2 = _save(parts, tmp_path / "sd2")
    for f in (root2 / "vae").iterdir():
        if f.suffix in (".safetensors", ".bin"):
            f.unlink()
    with pytest.raises(FileNotFoundError, match="vae.*weights"):
        load_stable_diffusion(root2)
    with pytest.raises(ValueError, match="dtype"):
        load_stable_diffusion(root2, dtype=torch.int64)
    with pytest.raises(ValueError, match="device"):
        load_stable_diffusion(root2, device="not-a-device")
    with pytest.raises(FileNotFoundError, match="some-org/some-model"):  # a Hub id absent from the cache
        load_stable_diffusion("some-org/some-model")


# b. the kernel-flow callback in a stock pipeline -----------------------------------------------------------
def _pipe(parts):
    from diffusers import StableDiffusionPipeline
    unet, sched, vae = parts
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_kernel_flow_callback_matches_exact_flow_and_sample_ddim(parts):
    n, lam = 5, 3.0
    g = torch.Generator().manual_seed(1)
    latents0 = torch.randn(1, 4, 4, 4, generator=g)
    emb = torch.randn(1, 77, 8, generator=g)
    center = torch.randn(1, 4, 4, 4, generator=g)
    pipe = _pipe(parts)
    flow = kernel_flow_callback(center, lam)
    records = []

    def recording(p, i, t, kw):
        before = kw["latents"].clone()
        after = flow(p, i, t, kw)["latents"]
        records.append((int(t), before, after.clone()))
        return {"latents": after}

    out = pipe(prompt_embeds=emb, height=32, width=32, num_inference_steps=n, guidance_scale=1.0,
               output_type="latent", latents=latents0.clone(), callback_on_step_end=recording).images
    assert len(records) == n
    sched, T = pipe.scheduler, pipe.scheduler.config.num_train_timesteps
    acp = sched.alphas_cumprod.double()
    for t, before, after in records:  # the formula, written out independently of the callback
        prev = t - T // n
        a_t, a_p = acp[t].item(), (acp[prev].item() if prev >= 0 else final_alphas_cumprod(sched))
        s2, s2n = (1 - a_t) / a_t, (1 - a_p) / a_p
        f = math.exp(-(s2 - s2n) / lam ** 2)
        c = math.sqrt(a_p) * center
        expect = c + (before - c) * f
        assert (after - expect).abs().max().item() < 1e-6
    assert (records[0][2] - records[0][1]).abs().max().item() > 0.1  # the callback does act (factor ~0.2)
    assert torch.equal(out, records[-1][2])

    # the real cross-check: diffsolve's split-face DDIM on the same UNet lands on the same latents
    sigmas, _ = sigmas_from_scheduler(sched, n)
    den = SDDenoiser(unet=parts[0], scheduler=sched, prompt_embeds=emb)
    x = ds.sample_ddim(den, to_ve(latents0, sigmas[0]), sigmas, disable=True,
                       transforms=[ds.gaussian_kernel(center, lam, face="split")])
    ours = from_ve(x, sigmas[-1])
    assert (ours - out).abs().max().item() < 1e-4
    # negative control: without the kernel the pipeline's latents are far away
    plain = pipe(prompt_embeds=emb, height=32, width=32, num_inference_steps=n, guidance_scale=1.0,
                 output_type="latent", latents=latents0.clone()).images
    assert (plain - out).abs().max().item() > 1e-2


def test_kernel_flow_callback_limited_interval(parts):
    """Outside (sigma_lo, sigma_hi] the callback is the identity; a huge sigma_lo switches it off."""
    g = torch.Generator().manual_seed(2)
    latents0, emb, center = (torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, 8, generator=g),
                             torch.randn(1, 4, 4, 4, generator=g))
    pipe = _pipe(parts)
    kw = dict(prompt_embeds=emb, height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
              output_type="latent")
    off = pipe(latents=latents0.clone(), callback_on_step_end=kernel_flow_callback(center, 1.0, sigma_lo=1e6), **kw)
    plain = pipe(latents=latents0.clone(), **kw)
    assert torch.equal(off.images, plain.images)
    with pytest.raises(ValueError, match="sigma_lo"):
        kernel_flow_callback(center, 1.0, sigma_lo=2.0, sigma_hi=1.0)


# c. VAE helpers and prompts --------------------------------------------------------------------------------
def test_vae_encode_decode_shapes_and_bad_size(parts):
    vae = parts[2]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lat = vae_encode(vae, images, generator=torch.Generator().manual_seed(0))
        assert lat.shape == (2, 4, 16, 16)
        back = vae_decode(vae, lat)
    assert back.shape == (2, 3, 32, 32) and back.min() >= 0 and back.max() <= 1
    with pytest.raises(ValueError, match="33x32"):
        vae_encode(vae, torch.rand(1, 3, 33, 32))


def test_encode_prompt(parts):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=77)).eval()

    class Tok:  # a stand-in tokenizer: the vocabulary files of a real one would need the Hub
        model_max_length = 77

        def __call__(self, prompts, **kw):
            ids = torch.zeros(len(prompts), self.model_max_length, dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, :len(p)] = torch.tensor([ord(ch) % 100 for ch in p][:77])
            return {"input_ids": ids}

    unet, sched, vae = parts
    comp = SDComponents(unet, vae, sched, enc, Tok())
    emb = encode_prompt(comp, ["a cat", "a dog"])
    assert emb.shape == (2, 77, 8)
    assert not torch.equal(emb[0], emb[1])
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(comp, [])
    with pytest.raises(ValueError, match="tokenizer and no text_encoder"):
        encode_prompt(SDComponents(unet, vae, sched), ["a cat"])
