"""Small video files made offline with PyAV, for tests and benchmarks."""

import numpy as np


def smooth_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 frames of moving low-frequency colour waves (distinct per seed).

    Smooth content keeps the comparison of two decoders about their YUV->RGB conversion rather than
    about how they upsample sharp chroma edges.
    """
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for i in range(num_frames):
        phase = 0.3 * i + 0.37 * seed
        img = np.stack(
            [
                np.sin(2 * np.pi * (1.5 * xx + phase)),
                np.cos(2 * np.pi * (1.2 * yy - phase)),
                np.sin(2 * np.pi * (xx + yy + 0.5 * phase + 0.1 * seed)),
            ],
            axis=-1,
        )
        frames.append((127.5 + 100.0 * img).astype(np.uint8))
    return np.stack(frames)


def write_video(
    path: str,
    frames: np.ndarray,
    *,
    codec: str = "libvpx-vp9",
    fps: int = 8,
    lossless: bool = True,
    pix_fmt: str = "yuv444p",
) -> None:
    """Encode ``[F, H, W, 3]`` uint8 RGB frames into ``path`` (container from the extension).

    The default, lossless VP9 in 4:4:4, decodes back to exactly the YUV the encoder was given.
    """
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = pix_fmt
        if lossless and codec == "libvpx-vp9":
            stream.options = {"lossless": "1"}
        elif codec in ("libx264", "h264"):
            stream.options = {"crf": "0" if lossless else "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_video(path: str) -> np.ndarray:
    """All frames of ``path`` as ``[F, H, W, 3]`` uint8 RGB, decoded by PyAV (FFmpeg)."""
    import av

    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def corrupt_payload(src: str, dst: str, first_packet: int = 1) -> None:
    """Copy ``src`` to ``dst`` scrambling the payload of its packets from ``first_packet`` on.

    The container stays intact and the first frames still decode, so a header probe passes the file
    while decoding it fails part-way: the kind of file that only shows up inside the pipeline.
    """
    import av

    data = bytearray(open(src, "rb").read())
    with av.open(src) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    for pos, size in packets[first_packet:]:
        for i in range(pos + 8, pos + size - 8):
            data[i] = (data[i] * 77 + 13) % 256
    with open(dst, "wb") as f:
        f.write(bytes(data))


# ---------------------------------------------------------------------------------------------------
# Tiny random encoders saved in the diffusers Wan folder layout (vae/, text_encoder/, tokenizer/)

TINY_SENTENCES = [
    "a red fox runs through the snow",
    "a blue car drives on a wet road at night",
    "two cats play with a ball of yarn",
    "waves break on a rocky shore under a grey sky",
]


def save_tiny_vae(root: str, seed: int = 0):
    """A randomly initialised ``AutoencoderKLWan`` (about 0.2 M parameters) saved to ``root/vae``."""
    import os

    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae.save_pretrained(os.path.join(root, "vae"))
    return vae


def save_tiny_text_encoder(root: str, seed: int = 0, hidden: int = 32):
    """A random ``UMT5EncoderModel`` and a word-level tokenizer (built offline from
    :data:`TINY_SENTENCES`) saved to ``root/text_encoder`` and ``root/tokenizer``."""
    import os

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = sorted({w for s in TINY_SENTENCES for w in s.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like T5: every sequence ends with </s>.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(os.path.join(root, "tokenizer"))

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(vocab) + 5,
        d_model=hidden,
        d_kv=8,
        d_ff=2 * hidden,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
    )
    encoder = UMT5EncoderModel(config)
    encoder.save_pretrained(os.path.join(root, "text_encoder"))
    return encoder, tokenizer
