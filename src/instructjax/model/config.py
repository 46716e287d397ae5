"""The model's hyperparameters: a frozen, validated dataclass and its closed-form size."""
import dataclasses

REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "llama3")

_LLAMA3_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_len")
_POSITIVE_INT_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                        "head_dim", "mlp_dim", "max_seq_len")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder-only Transformer; hashable, so usable as a jit static.

    Attributes:
        vocab_size: V, number of token ids.
        embed_dim: E, width of the residual stream.
        num_layers: L, number of blocks.
        num_heads: H, query heads.
        num_kv_heads: K, key/value heads (H % K == 0; K == H is plain multi-head attention).
        head_dim: D, width of one head (even: RoPE rotates pairs of features).
        mlp_dim: F, hidden width of the SwiGLU MLP.
        max_seq_len: longest sequence the model is called on (checked at call time).
        rope_theta: RoPE base wavelength.
        rope_scaling: one of ROPE_SCALINGS. "llama3" rescales RoPE's inverse frequencies as
            LLaMA 3.1+ does (transformers' `_compute_llama3_parameters`): wavelengths above
            rope_original_max_len / rope_low_freq_factor are stretched by
            rope_scaling_factor, those below rope_original_max_len / rope_high_freq_factor
            are kept, and the band between is interpolated smoothly.
        rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor: llama3's
            `factor`, `low_freq_factor`, `high_freq_factor` (defaults unused with "none").
        rope_original_max_len: llama3's `original_max_position_embeddings`; 0 (the
            default) only with rope_scaling="none".
        norm_eps: epsilon inside RMSNorm's square root (also of the qk norms).
        tie_embeddings: LM head reuses the token embedding (no separate [E, V] matrix).
        qkv_bias: add biases to the q, k, v projections (Qwen2 style).
        qk_norm: RMSNorm over D of each query and key head, with learned [D] scales, after
            the projections and before RoPE (Qwen3 style).
        sliding_window: 0 = full causal attention; W > 0 = query i sees key j only when
            i - W < j <= i (Mistral style; by index in the row, or by cache slot when
            decoding). The "pallas" attention_impl refuses it.
        dtype: compute dtype name, e.g. "bfloat16" on accelerators.
        param_dtype: dtype name the parameters are stored in.
        scan_layers: stack the blocks with nn.scan (one compiled block, params with a
            leading layers axis) instead of a Python loop of separately named blocks.
        remat_policy: activation rematerialisation of each block: one of REMAT_POLICIES.
        attention_impl: one of ATTENTION_IMPLS ("xla" = kernels/reference.py).
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "xla"

    def __post_init__(self):
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is a typo, not a size.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.rope_theta ({self.rope_theta}) and norm_eps "
                             f"({self.norm_eps}) must be positive")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        for name in ("rope_original_max_len", "sliding_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an int >= 0, got {value!r}")
        self._check_rope_scaling()
        self._check_sliding_window()

    def _check_rope_scaling(self):
        if self.rope_scaling == "none":
            # A scaling parameter set without rope_scaling="llama3" would be silently
            # ignored, and the model would run plain RoPE where the checkpoint expects scaled.
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in _LLAMA3_FIELDS:
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} has no effect "
                                     f"with rope_scaling='none'; set rope_scaling='llama3' or "
                                     f"leave {name} at {defaults[name]!r}")
            return
        if self.rope_original_max_len <= 0:
            raise ValueError(f"ModelConfig.rope_original_max_len must be positive with "
                             f"rope_scaling={self.rope_scaling!r}, got "
                             f"{self.rope_original_max_len}")
        if not self.rope_scaling_factor > 0 or not self.rope_low_freq_factor > 0:
            raise ValueError(f"ModelConfig.rope_scaling_factor ({self.rope_scaling_factor}) "
                             f"and rope_low_freq_factor ({self.rope_low_freq_factor}) must be "
                             f"positive")
        # The interpolation divides by their difference.
        if not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"ModelConfig.rope_high_freq_factor ({self.rope_high_freq_factor}) "
                             f"must exceed rope_low_freq_factor ({self.rope_low_freq_factor})")

    def _check_sliding_window(self):
        # The Pallas flash and decode kernels have no window: refusing here is better than a
        # model that silently attends further back than its checkpoint was trained to.
        if self.sliding_window and self.attention_impl == "pallas":
            raise ValueError(f"ModelConfig.sliding_window={self.sliding_window} is not "
                             f"supported by attention_impl='pallas' (its flash and decode "
                             f"kernels have no window); use 'xla' or 'cudnn'")

    @classmethod
    def from_dict(cls, d):
        """Builds a config from a mapping (a dict or a ml_collections ConfigDict).

        Keys missing from `d` that have defaults take them, so configs saved before a field
        existed (e.g. qk_norm, sliding_window) load as the model they described.

        Raises:
            ValueError: naming any unknown keys and listing the valid ones, or naming the
                required keys that are missing.
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown ModelConfig key(s) {unknown}; valid keys are {valid}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"ModelConfig is missing required key(s) {missing}")
        return cls(**d)

    def to_dict(self):
        """Plain dict of all fields (for checkpoints' metadata and logs)."""
        return dataclasses.asdict(self)

    def replace(self, **changes):
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"ModelConfig.{name}={value!r} is not valid; choose one of {allowed}")


def count_params(cfg):
    """Number of scalar parameters of `Transformer(cfg)`, from the config alone.

    Per layer: q E*H*D, k and v E*K*D each, output H*D*E, optional qkv bias (H+2K)*D,
    SwiGLU gate/up/down 3*E*F, two RMSNorm scales 2*E, optional qk-norm scales 2*D. Plus
    the embedding V*E, the final RMSNorm E, and the LM head E*V unless tied to the embedding.
    """
    E, H, K, D, F, V = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.mlp_dim, cfg.vocab_size)
    attention = E * H * D + 2 * E * K * D + H * D * E
    if cfg.qkv_bias:
        attention += (H + 2 * K) * D
    if cfg.qk_norm:
        attention += 2 * D
    per_layer = attention + 3 * E * F + 2 * E
    head = 0 if cfg.tie_embeddings else E * V
    return V * E + cfg.num_layers * per_layer + E + head
