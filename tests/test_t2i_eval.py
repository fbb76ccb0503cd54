"""Evaluation of text-to-2D (integrations/evaluate.py), offline with tiny random networks: FID through
torchmetrics with a supplied feature network against an independent scipy Fréchet distance, CLIP similarity
against a hand computation with the same CLIP model, the DDIM references against a stock
StableDiffusionPipeline, and `main --inception --clip` end to end (metrics recorded, or skipped with a
message)."""
import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")
pytest.importorskip("scipy.linalg")

import torch  # noqa: E402
from conftest import frechet_distance_scipy, tiny_clip, tiny_feature_network  # noqa: E402
from PIL import Image  # noqa: E402

from diffsolve.integrations import evaluate  # noqa: E402
from diffsolve.integrations.diffusers import tiny_sd_components  # noqa: E402
from diffsolve.integrations.t2i_cli import main  # noqa: E402

torch.set_num_threads(1)


def _images(n, seed, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _scipy_fid(net, real, fake):
    """Fréchet distance of Gaussians fitted to the features, written out with numpy / scipy."""
    with torch.no_grad():
        return frechet_distance_scipy(*(net(x).double().numpy() for x in (real, fake)))


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "features.pt"
    tiny_feature_network(path)
    return path


def test_fid_matches_scipy_frechet_distance(feature_file, tmp_path):
    net = evaluate.load_feature_network(feature_file)
    assert isinstance(net, torch.jit.ScriptModule)
    real = _images(40, 0)
    fake = (0.7 * _images(40, 1) + 0.2).clamp(0, 1)
    ours, expected = evaluate.fid(net, real, fake), _scipy_fid(net, real, fake)
    assert expected > 1e-3
    assert abs(ours - expected) <= 1e-6 * expected + 1e-9, (ours, expected)
    # a set against itself is ~0; against a shifted copy it grows with the shift
    assert abs(evaluate.fid(net, real, real)) < 1e-6
    small, large = (evaluate.fid(net, real, (real + d).clamp(0, 1), batch_size=7) for d in (0.05, 0.3))
    assert 0 < small < large
    # a pickled module (torch.save) is refused, not unpickled (unpickling runs code): save it as TorchScript
    torch.save(tiny_feature_network(), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="TorchScript"):
        evaluate.load_feature_network(tmp_path / "module.pt")


def test_feature_network_errors(tmp_path, feature_file):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        evaluate.load_feature_network(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt"):
        evaluate.load_feature_network(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list, not a TorchScript module"):
        evaluate.load_feature_network(tmp_path / "list.pt")
    if not evaluate._torch_fidelity_available():
        torch.save({"w": torch.zeros(2)}, tmp_path / "state.pth")
        with pytest.raises(ValueError, match="torch-fidelity"):
            evaluate.load_feature_network(tmp_path / "state.pth")
    net = evaluate.load_feature_network(feature_file)
    with pytest.raises(ValueError, match="at least 2 real"):
        evaluate.fid(net, _images(1, 0), _images(3, 1))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _manual_clip_cosine(model, vocab, image, prompt):
    """CLIP cosine computed by hand: BPE without merges spelled out, pixels normalised with CLIP's constants."""
    ids = [vocab["<|startoftext|>"]]
    for word in prompt.lower().split():
        ids += [vocab[c] for c in word[:-1]] + [vocab[word[-1] + "</w>"]]
    ids.append(vocab["<|endoftext|>"])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    pixels = (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255 - mean) / std
    with torch.no_grad():
        text = model.text_projection(model.text_model(input_ids=torch.tensor([ids])).pooler_output)[0]
        img = model.visual_projection(model.vision_model(pixel_values=pixels[None]).pooler_output)[0]
    return float(text @ img / (text.norm() * img.norm()))


def test_clip_similarity_matches_hand_computation(clip_dir):
    model, processor = evaluate.load_clip(clip_dir)
    vocab = processor.tokenizer.get_vocab()
    arrays = (torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).round().byte().numpy()
    images = [Image.fromarray(a) for a in arrays]
    prompts = ["a cat", "a red dog on a hill", "tulip"]
    sims = evaluate.clip_similarity(model, processor, images, prompts)
    expected = torch.tensor([_manual_clip_cosine(model, vocab, im, p) for im, p in zip(images, prompts)])
    assert sims.shape == (3,)
    torch.testing.assert_close(sims, expected, rtol=0, atol=1e-5)
    shuffled = evaluate.clip_similarity(model, processor, images, prompts[::-1])
    assert (shuffled - sims).abs().max() > 1e-3  # the prompt matters
    with pytest.raises(FileNotFoundError, match="no_clip"):
        evaluate.load_clip(clip_dir.parent / "no_clip")
    with pytest.raises(ValueError, match="one prompt per image"):
        evaluate.clip_similarity(model, processor, images, prompts[:2])


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_ddim_reference_equals_stock_pipeline(guidance_scale):
    from diffusers import StableDiffusionPipeline
    c = tiny_sd_components()
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g)
    ours = evaluate.ddim_reference(c, (cond, uncond), seed=3, resolution=32, steps=4, guidance_scale=guidance_scale)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=None, tokenizer=None, unet=c.unet, scheduler=c.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    stock = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=32, width=32, num_inference_steps=4,
                 guidance_scale=guidance_scale, latents=latents, output_type="pt").images[0].permute(1, 2, 0)
    assert ours.shape == (32, 32, 3)
    err = (ours - stock).abs().max().item()
    assert err < 1e-4, err
    other = evaluate.ddim_reference(c, (cond, uncond), seed=4, resolution=32, steps=4, guidance_scale=guidance_scale)
    assert (other - stock).abs().max() > 1e-3  # the seed matters


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 2 images: rank-1 covariances
def test_main_records_metrics_or_skips(tmp_path, feature_file, clip_dir, capsys):
    common = ["--tiny", "--prompts", "a cat", "a dog", "--methods", "sds", "--steps", "1", "--quiet"]
    skipped = main([*common, "--out", str(tmp_path / "plain")])
    assert skipped["metrics"] == {"fid": evaluate.SKIPPED_FID, "clip_similarity": evaluate.SKIPPED_CLIP}
    assert "--inception PATH" in capsys.readouterr().out
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["metrics"] == skipped["metrics"]
    assert not (tmp_path / "plain" / "ddim").exists()  # no references without --inception

    out = tmp_path / "metrics"
    res = main([*common, "--out", str(out), "--ddim-steps", "2", "--inception", str(feature_file),
                "--clip", str(clip_dir)])
    assert [r["job"] for r in res["jobs"]] == ["sds/00/seed0", "sds/01/seed0", "ddim/00/seed0", "ddim/01/seed0"]
    assert res["reference"]["steps"] == 2 and res["reference"]["guidance_scale"] == 7.5

    def load(r):
        return torch.from_numpy(np.asarray(Image.open(out / r["dir"] / "image.png").convert("RGB")).copy()
                                ).permute(2, 0, 1).float() / 255
    fake = torch.stack([load(r) for r in res["jobs"] if r["method"] == "sds"])
    real = torch.stack([load(r) for r in res["jobs"] if r["method"] == "ddim"])
    expected = _scipy_fid(tiny_feature_network(), real, fake)  # same weights (seed 0) as the file
    assert res["metrics"]["fid"]["sds"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    model, processor = evaluate.load_clip(clip_dir)
    vocab = processor.tokenizer.get_vocab()
    for r in res["jobs"]:
        image = Image.open(out / r["dir"] / "image.png").convert("RGB")
        assert r["clip_similarity"] == pytest.approx(_manual_clip_cosine(model, vocab, image, r["prompt"]), abs=1e-5)
    sds = [r["clip_similarity"] for r in res["jobs"] if r["method"] == "sds"]
    assert res["metrics"]["clip_similarity"]["sds"] == pytest.approx(sum(sds) / 2)
    assert set(res["metrics"]["clip_similarity"]) == {"sds", "ddim"}


def test_fid_with_one_image_per_method_is_skipped_with_a_reason(tmp_path, feature_file):
    res = main(["--tiny", "--prompts", "a cat", "--methods", "sds", "--steps", "1", "--quiet", "--ddim-steps", "1",
                "--out", str(tmp_path), "--inception", str(feature_file)])
    assert res["metrics"]["fid"]["sds"].startswith("skipped: FID needs")


def test_bad_metric_paths_fail_before_work(tmp_path, feature_file, capsys):
    """Usage errors (exit status 2, one line naming the flag), before anything is written."""
    (tmp_path / "bad_clip").mkdir()
    for args, message in ((["--out", str(tmp_path / "a"), "--inception", str(tmp_path / "x.pt")], "--inception"),
                          (["--out", str(tmp_path / "b"), "--clip", str(tmp_path / "clip")], "--clip"),
                          (["--out", str(tmp_path / "c"), "--clip", str(tmp_path / "bad_clip")], "config.json"),
                          (["--out", str(tmp_path / "d"), "--inception", str(feature_file), "--ddim-steps", "0"],
                           "--ddim-steps")):
        with pytest.raises(SystemExit) as exit_:
            main(["--tiny", "--prompts", "a cat", *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not any((tmp_path / n).exists() for n in "abcd")
