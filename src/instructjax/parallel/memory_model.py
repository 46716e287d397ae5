"""Closed-form per-device memory and FLOPs of the models on a ('data','fsdp','tensor') mesh.

The ahead-of-time check (stages/dry_run.py) prints these beside what XLA reports for the
compiled programs, and tests hold the two together. Everything here is arithmetic on a
ModelConfig and the mesh sizes; nothing touches jax.

Layout assumed (parallel/mesh.py LOGICAL_AXIS_RULES): weight matrices (embedding, q/k/v/out,
gate/up/down, LM head) are split over fsdp x tensor; RMSNorm scales and scalar-head kernels
([E], 'embed') over fsdp only; qkv biases over tensor only; scalar-head biases replicated.
The data axis replicates parameters. Batch dims split over data x fsdp, kv heads over tensor.

Letters: L layers, E embed, H heads, K kv heads, D head dim, F mlp, V vocab.
"""

from __future__ import annotations

import dataclasses

from instructjax.model.config import ModelConfig, count_params

ADAM_MOMENTS = 2  # mu and nu, each shaped and sharded like the parameters
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the three mesh axes."""
    data: int
    fsdp: int
    tensor: int

    @property
    def batch_shards(self) -> int:
        """How many ways a batch dim is split (data x fsdp)."""
        return self.data * self.fsdp


@dataclasses.dataclass(frozen=True)
class ParamSplit:
    """A model's parameter count split by how the mesh shards each group."""
    matrices: int   # split over fsdp x tensor
    vectors: int    # split over fsdp only (norm scales, scalar-head kernels)
    biases: int     # split over tensor only (qkv biases)
    scalars: int    # replicated (scalar-head biases)

    @property
    def total(self) -> int:
        """Number of scalar parameters."""
        return self.matrices + self.vectors + self.biases + self.scalars


def transformer_split(cfg: ModelConfig, scalar_heads: int = 0) -> ParamSplit:
    """ParamSplit of Transformer(cfg) plus `scalar_heads` ScalarHeads ([E] kernel + bias).

    The total equals count_params(cfg) + scalar_heads * (E + 1).
    """
    E, L = cfg.embed_dim, cfg.num_layers
    norms = 2 * L * E + E
    biases = L * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim if cfg.qkv_bias else 0
    matrices = count_params(cfg) - norms - biases
    return ParamSplit(matrices=matrices, vectors=norms + scalar_heads * E, biases=biases,
                      scalars=scalar_heads)


def param_bytes_per_device(split: ParamSplit, mesh: MeshShape, dtype_bytes: int) -> float:
    """Bytes of one device's shard of the parameters stored in `dtype_bytes`-byte floats."""
    f, t = mesh.fsdp, mesh.tensor
    return dtype_bytes * (split.matrices / (f * t) + split.vectors / f + split.biases / t
                          + split.scalars)


def adam_bytes_per_device(split: ParamSplit, mesh: MeshShape) -> float:
    """Bytes of AdamW's float32 moments (mu, nu) on one device; counters are negligible."""
    return ADAM_MOMENTS * param_bytes_per_device(split, mesh, 4)


def kv_cache_bytes_per_device(cfg: ModelConfig, rows: int, slots: int, mesh: MeshShape,
                              dtype_bytes: int) -> float:
    """Bytes of the keys and values [L, rows, slots, K, D] on one device.

    Rows split over data x fsdp and kv heads over tensor (model/cache.py CACHE_AXES).
    """
    per_row = 2 * cfg.num_layers * slots * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    return per_row * rows / (mesh.batch_shards * mesh.tensor)


def batch_bytes_per_device(rows: int, bytes_per_row: int, mesh: MeshShape) -> float:
    """Bytes of a [rows, ...] input batch on one device (rows split over data x fsdp)."""
    return rows * bytes_per_row / mesh.batch_shards


def forward_flops(cfg: ModelConfig, rows: int, length: int, *, context: int | None = None,
                  lm_head: bool = True) -> float:
    """Matmul FLOPs of one forward pass over [rows, length] tokens (all devices together).

    2 FLOPs per multiply-add of every weight matrix per token, plus the attention scores and
    weighted sum (4 * H * D per query per attended slot; `context` slots, default `length`,
    counted in full as the plain-jnp attention computes them before masking). The LM head's
    E x V matmul is skipped with lm_head=False (the reward model's unused logits).
    """
    split = transformer_split(cfg)
    head = cfg.embed_dim * cfg.vocab_size  # tied or not, the head matmul runs
    weights = split.matrices - cfg.vocab_size * cfg.embed_dim * (0 if cfg.tie_embeddings else 1)
    weights -= cfg.vocab_size * cfg.embed_dim  # the embedding is a gather, not a matmul
    context = length if context is None else context
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    per_token = 2 * weights + attention + (2 * head if lm_head else 0)
    return float(per_token) * rows * length


def train_flops(cfg: ModelConfig, rows: int, length: int, *, remat: bool,
                lm_head: bool = True) -> float:
    """Forward + backward FLOPs of a gradient step (backward = 2 x forward; + 1 x with remat);
    lm_head=False for a scalar-head model (a reward model or a separate critic)."""
    return forward_flops(cfg, rows, length, lm_head=lm_head) * (4.0 if remat else 3.0)
