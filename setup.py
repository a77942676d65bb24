"""dtrain: a distributed-training toolkit for slow, small or unreliable clusters."""
from setuptools import find_packages, setup

setup(
    name="dtrain",
    version="0.1.0",
    description="Distributed training toolkit: ZeRO, hierarchical sharding, CO2, offload, "
    "in-memory snapshots, FlexSP, fault injection.",
    python_requires=">=3.10",
    packages=find_packages(include=["dtrain", "dtrain.*"]),
    install_requires=[
        "torch>=2.4",  # install steps pin torch==2.13.0 on the CPU machines
        "numpy",
        "psutil",
        "tqdm",
        "safetensors",
        "pulp>=2.8",
        "highspy",
        "zfec>=1.5",  # erasure codes for in-memory snapshots
        "crc32c>=2.4",  # hardware CRC-32C: snapshot checksums every step
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "ray==2.60.0", "transformers>=4.40", "tensorboard", "matplotlib"],
        "hf": ["transformers>=4.40"],  # examples/hf_causal_lm.py; never with a torchvision built for another torch
        "ray": ["ray==2.60.0"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],  # metrics.tensorboard = "dir"
        "peers": ["deepspeed==0.19.8", "matplotlib"],
    },
    entry_points={"console_scripts": ["dtrain=dtrain.launch.cli:main"]},
)
