"""poet-peft: orthogonal reparameterised training (POET, ORA, spectral-clamped LoRA) as Hugging Face PEFT tuners."""

from pathlib import Path

from setuptools import find_packages, setup

# What the examples need: datasets for data, tokenizers for run_clm's BPE, tensorboard for --report_to tensorboard,
# evaluate for run_glue's metrics.
EXAMPLES = ["datasets>=3.0", "tokenizers>=0.21", "tensorboard>=2.14", "evaluate>=0.4"]

setup(
    name="poet-peft",
    version="0.1.0",
    description="POET (orthogonal equivalence transformation) training as a Hugging Face PEFT plugin",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The CUDA sources live in the top-level csrc/ and ship inside the package as poet_peft/csrc, where CuPy compiles
    # them at run time; the GLUE metric is a local `evaluate` module.
    package_dir={"": "src", "poet_peft.csrc": "csrc"},
    packages=[*find_packages("src"), "poet_peft.csrc"],
    package_data={"poet_peft": ["evaluate_modules/glue/*.py"], "poet_peft.csrc": ["*.cu"]},
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
        # galore-torch is bench_pretrain.py's GaLore baseline; it brings bitsandbytes, which PEFT then imports.
        "bench": [*EXAMPLES, "matplotlib>=3.7", "galore-torch>=1.0"],
        # CuPy and NVRTC install without a GPU: the tests compile every kernel for sm_80 and sm_90 with them.
        # scikit-learn and scipy are the references the GLUE metric is tested against; galore-torch runs the GaLore
        # baseline of run_clm.py.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            *EXAMPLES,
            "matplotlib>=3.7",
            "scikit-learn>=1.4",
            "scipy>=1.11",
            "galore-torch>=1.0",
            "cupy-cuda13x>=14.2",
            "nvidia-cuda-nvrtc==13.0.*",
        ],
    },
    py_modules=["poet_peft_cli"],  # the command, outside the package so that --help need not import torch
    entry_points={"console_scripts": ["poet-peft = poet_peft_cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
