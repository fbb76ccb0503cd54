"""Prompt encoders of SDXL, SD3 and Flux against the pipelines' own encode_prompt, on tiny random CLIP / T5
encoders with a stand-in tokenizer (a real tokenizer's vocabulary files would need the Hub)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,  # noqa: E402
                          T5EncoderModel)

from integrations import flux as F  # noqa: E402
from integrations import sd3 as S  # noqa: E402
from integrations import sdxl as X  # noqa: E402
from integrations._loading import StandInTokenizer  # noqa: E402

PROMPTS = ["a photo of a cat", "an oil painting of a tiny boat at dawn"]


def _clip(hidden, projection=False, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=0, hidden_size=hidden, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=99, projection_dim=32,
                         max_position_embeddings=16)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model=32, seed=2):
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=99, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4)).eval()


def _tok(length=16):
    return StandInTokenizer(99, length)


def test_sd3_encode_prompt_equals_the_pipeline():
    c = S.tiny_sd3_components()
    c.text_encoder, c.text_encoder_2, c.text_encoder_3 = _clip(32, True, 0), _clip(32, True, 1), _t5()
    c.tokenizer, c.tokenizer_2, c.tokenizer_3 = _tok(), _tok(), _tok(24)
    pipe = StableDiffusion3Pipeline(transformer=c.transformer, scheduler=c.scheduler, vae=c.vae,
                                    text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
                                    tokenizer_2=c.tokenizer_2, text_encoder_3=c.text_encoder_3,
                                    tokenizer_3=c.tokenizer_3)
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                           max_sequence_length=24)
    got, got_pooled = S.encode_prompt(c, PROMPTS, max_sequence_length=24)
    torch.testing.assert_close(got, emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    c.text_encoder_3 = pipe.text_encoder_3 = None  # no T5: zeros, as the pipeline does
    emb, _, _, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                      max_sequence_length=24)
    torch.testing.assert_close(S.encode_prompt(c, PROMPTS, max_sequence_length=24)[0], emb, rtol=0, atol=1e-6)
    c.tokenizer = None
    with pytest.raises(ValueError, match="the SD3 components have no tokenizer"):
        S.encode_prompt(c, PROMPTS)
    with pytest.raises(ValueError, match="wrap it in a list"):
        S.encode_prompt(c, "a cat")


def test_flux_encode_prompt_equals_the_pipeline():
    c = F.tiny_flux_components()
    c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2 = _clip(32), _t5(), _tok(), _tok(24)
    pipe = FluxPipeline(transformer=c.transformer, scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder,
                        tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2)
    emb, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=24)
    got, got_pooled = F.encode_prompt(c, PROMPTS, max_sequence_length=24)
    torch.testing.assert_close(got, emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    c.text_encoder_2 = None
    with pytest.raises(ValueError, match="the Flux components have no text_encoder_2"):
        F.encode_prompt(c, PROMPTS)


def test_sdxl_encode_prompt_equals_the_pipeline():
    c = X.tiny_sdxl_components()
    c.text_encoder, c.text_encoder_2 = _clip(32, False, 0), _clip(32, True, 1)
    c.tokenizer, c.tokenizer_2 = _tok(), _tok()
    pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                     tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                     scheduler=c.scheduler)
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    got, got_pooled = X.encode_prompt(c, PROMPTS)
    torch.testing.assert_close(got, emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    c.tokenizer_2 = None
    with pytest.raises(ValueError, match="the SDXL components have no tokenizer_2"):
        X.encode_prompt(c, PROMPTS)
