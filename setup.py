"""instructjax: the InstructGPT pipeline (pretrain -> SFT -> reward model -> PPO) in JAX."""
from setuptools import setup

setup(
    name="instructjax",
    version="0.1.0",
    description="JAX-native reproduction of the ChatGPT/InstructGPT training pipeline",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=[
        "instructjax",
        "instructjax.kernels",
        "instructjax.model",
        "instructjax.data",
        "instructjax.parallel",
        "instructjax.train",
        "instructjax.stages",
        "instructjax.rlhf",
        "instructjax.eval",
    ],
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
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout"],
    },
)
