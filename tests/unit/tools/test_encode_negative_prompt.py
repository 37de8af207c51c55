"""tools/encode_negative_prompt.py writes the embedding the trainer loads: the prompt's UMT5 hidden states, zero
past its tokens, tensors only."""

import pytest
import torch
from conftest import load_script

from megatron_rcm.checkpoint.negative_prompt import load_negative_embedding
from megatron_rcm.data.testing import TINY_SENTENCES, save_tiny_text_encoder

tool = load_script("tools/encode_negative_prompt.py")
PROMPT = TINY_SENTENCES[2]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    save_tiny_text_encoder(str(root))
    return root


def expected(root, length):
    """Independently of our encoder wrapper: tokenizer + UMT5 hidden states, zero past the prompt's tokens."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    enc = UMT5EncoderModel.from_pretrained(root / "text_encoder").eval()
    ids = tok([PROMPT], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(ids.input_ids, ids.attention_mask).last_hidden_state[0]
    n = int(ids.attention_mask.sum())
    return torch.cat([hidden[:n], torch.zeros(length - n, hidden.shape[1])]), n


@pytest.mark.parametrize("name", ["neg.pt", "neg.safetensors"])
def test_embedding_file(encoder_dir, tmp_path, capsys, name):
    out = tmp_path / name
    assert tool.main(["--text-encoder", str(encoder_dir), "--output", str(out), "--prompt", PROMPT,
                      "--max-length", "16"]) == 0
    want, n = expected(encoder_dir, 16)
    got = load_negative_embedding(str(out))
    assert got.shape == (16, 32) and n == 9 and torch.count_nonzero(got[n:]) == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if name.endswith(".pt"):  # what the trainer and the reference load: a plain tensor, safe to read
        torch.testing.assert_close(torch.load(out, weights_only=True), want, rtol=1e-5, atol=1e-5)
    assert tool.main(["--text-encoder", str(encoder_dir), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    torch.testing.assert_close(load_negative_embedding(str(out)), got, rtol=0, atol=0)


def test_bad_arguments(tmp_path, capsys):
    assert tool.main(["--text-encoder", str(tmp_path / "absent"), "--output", str(tmp_path / "neg.npy"),
                      "--max-length", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for part in ("must end in .pt or .safetensors", "--max-length must be >= 1", "is not a local folder"):
        assert part in err
    assert list(tmp_path.iterdir()) == []
