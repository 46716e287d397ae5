"""instructjax: the InstructGPT pipeline (pretrain -> SFT -> reward model -> PPO) in JAX."""
from setuptools import find_packages, setup

setup(
    name="instructjax",
    version="0.1.0",
    description="JAX-native reproduction of the ChatGPT/InstructGPT training pipeline",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "numpy",
        "absl-py",
        "ml-collections>=1.1.0",
        "sentencepiece>=0.2.0",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "grain>=0.2.18",
        "tensorboardX",
        "matplotlib",
        # Open models: Hugging Face checkpoints, tokenizer.json files and chat templates.
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "jinja2>=3.1",
    ],
    extras_require={
        # torch and transformers are the Hugging Face reference in tests only. torch is pinned
        # to the CPU build on this machine's disk: unpinned, pip pulls a CUDA build of
        # several GB.
        "dev": ["pytest", "pytest-timeout", "torch==2.13.0", "transformers>=5,<6"],
    },
)
