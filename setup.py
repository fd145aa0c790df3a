"""poet-peft: orthogonal reparameterised training (POET, ORA, spectral-clamped LoRA) as Hugging Face PEFT tuners."""

from pathlib import Path

from setuptools import find_packages, setup

# What examples/run_clm.py needs: datasets for data, tokenizers for its BPE, tensorboard for --report_to tensorboard.
EXAMPLES = ["datasets>=3.0", "tokenizers>=0.21", "tensorboard>=2.14"]

setup(
    name="poet-peft",
    version="0.1.0",
    description="POET (orthogonal equivalence transformation) training as a Hugging Face PEFT plugin",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"poet_peft": ["csrc/*.cu"]},  # compiled at run time by CuPy
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "peft>=0.21",
        "accelerate>=1.0",
        "safetensors>=0.4",
    ],
    extras_require={
        "cuda": ["cupy-cuda13x>=14.2", "nvidia-cuda-nvrtc==13.0.*"],
        "examples": EXAMPLES,
        "plot": ["matplotlib>=3.7"],
        "bench": [*EXAMPLES, "matplotlib>=3.7"],
        # CuPy and NVRTC install without a GPU: the tests compile every kernel for sm_80 and sm_90 with them.
        "test": ["pytest>=8", *EXAMPLES, "matplotlib>=3.7", "cupy-cuda13x>=14.2", "nvidia-cuda-nvrtc==13.0.*"],
    },
    entry_points={"console_scripts": ["poet-peft = poet_peft.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
