"""megatron-rcm: rCM distillation of video/image diffusion transformers on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-rcm",
    version="0.1.0",
    description="rCM (score-regularized continuous-time consistency) distillation of Wan2.1 and "
    "Cosmos-Predict2 DiTs with megatron-core tensor/sequence/context/pipeline parallelism",
    python_requires=">=3.12",
    # The Triton kernels are the top-level package `rcm_kernels`: nothing at the repository root may be named
    # `kernels`, since `python -m pytest` / `python -m ...` put the root on sys.path and such a folder would shadow
    # the PyPI package `kernels`, which transformers imports.
    packages=find_packages(include=["megatron_rcm", "megatron_rcm.*", "rcm_kernels"]),
    install_requires=[
        "torch>=2.6,<2.15",
        "megatron-core>=0.19,<0.20",
        "safetensors>=0.4,<1",
        "diffusers>=0.35,<0.50",
        "transformers>=4.50,<6",
        "einops>=0.8,<1",
        "pyyaml>=6,<7",
        "tensorboard>=2.15,<3",
        "numpy>=1.26,<3",
        "av>=12,<17",
        "tqdm>=4.60,<5",
        "psutil>=5.9",
        "accelerate>=1.0,<2",
        "pillow>=10",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.0"],
        "dali": ["nvidia-dali-cuda130>=2.0,<3"],
        "flash": ["flash-attn>=2.6"],
        "dev": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "nvidia-dali-cuda130>=2.0,<3",
            "sentencepiece>=0.2",
        ],
    },
    entry_points={"console_scripts": [
        "megatron-rcm-train = megatron_rcm.cli:train",
        "megatron-rcm-convert = megatron_rcm.cli:convert",
        "megatron-rcm-generate = megatron_rcm.cli:generate",
    ]},
)
