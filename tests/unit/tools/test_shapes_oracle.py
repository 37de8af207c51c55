"""benchmarks/shapes_oracle.py: the exact posterior mean of the shapes set knows the clip at low noise and loses
accuracy when a caption word is left out at high noise."""

import torch
from conftest import load_script

from megatron_rcm.data import shapes


def test_ideal_denoiser_errors_order_as_information_does():
    oracle = load_script("benchmarks/shapes_oracle.py")
    videos, attributes = shapes.all_videos(shapes.ShapesConfig())
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(len(videos), (64,), generator=gen)
    x0 = videos[index]
    low = oracle.posterior_errors(videos, attributes, index, 0.7 * x0 + 0.3 * torch.randn(x0.shape, generator=gen),
                                  0.3)
    assert low["all words"] < 1e-8 and low["caption mean only"] > 0.05  # the noisy clip names its video
    high = oracle.posterior_errors(videos, attributes, index, 0.1 * x0 + 0.9 * torch.randn(x0.shape, generator=gen),
                                   0.9)
    for word in oracle.WORDS:
        assert high[f"without {word}"] > 1.05 * high["all words"]
    assert high["caption mean only"] > high["all words"]
