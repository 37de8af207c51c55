"""VAE / UMT5 wrappers against diffusers' / transformers' own calls on tiny random models."""

import pytest
import torch

from megatron_rcm.data.testing import TINY_SENTENCES, save_tiny_text_encoder, save_tiny_vae
from megatron_rcm.models.encoders import TextEncoderConfig, UMT5TextEncoder, WanVAE


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_wan")
    save_tiny_vae(str(root))
    save_tiny_text_encoder(str(root))
    return root


def test_vae_normalises_like_wan(tiny_wan):
    vae = WanVAE.from_pretrained(tiny_wan)
    video = torch.rand(2, 3, 5, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, *vae.latent_shape(5, 16, 24)) == (2, 16, 2, 2, 3)
    # Independent reference: diffusers' encode + the inverse of WanPipeline's decode-side de-normalisation.
    z = vae.vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents / inv_std + mean, z, rtol=1e-5, atol=1e-5)
    decoded = vae.decode(latents)
    torch.testing.assert_close(decoded, vae.vae.decode(z).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.latent_shape(6, 16, 24)


def test_vae_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        WanVAE.from_pretrained(tmp_path / "absent")


def test_text_embeddings_padded_like_wan(tiny_wan):
    enc = UMT5TextEncoder.from_pretrained(tiny_wan, dtype=torch.float32, config=TextEncoderConfig(max_length=16))
    captions = [TINY_SENTENCES[0], "  two  cats &amp; a ball  "]
    out = enc(captions)
    assert out.shape == (2, 16, 32)
    # Reference: the same steps as diffusers' WanPipeline._get_t5_prompt_embeds, written out here.
    tokens = enc.tokenizer(
        [TINY_SENTENCES[0], "two cats & a ball"], padding="max_length", max_length=16, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    hidden = enc.encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    lengths = tokens.attention_mask.sum(1)
    assert lengths.tolist() == [8, 6]  # 7 words + </s>; 5 tokens ("&" is one) + </s>
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[i, :n], hidden[i, :n])
        assert torch.count_nonzero(out[i, n:]) == 0
    # Cached: a second call returns the same values without re-encoding.
    assert enc.cache_info()["entries"] == 2
    torch.testing.assert_close(enc([captions[1]]), out[1:])
    neg = enc.negative_embedding("bad quality")
    assert neg is enc.negative_embedding("bad quality") and neg.shape == (1, 16, 32)


def test_cache_is_bounded(tiny_wan):
    config = TextEncoderConfig(max_length=16, cache_size=2)
    enc = UMT5TextEncoder.from_pretrained(tiny_wan, dtype=torch.float32, config=config)
    enc(TINY_SENTENCES[:3])
    assert enc.cache_info()["entries"] == 2
