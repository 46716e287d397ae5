"""Hugging Face config.json <-> ModelConfig, for the LLaMA, Mistral, Qwen2 and Qwen3 families.

Import reads a config.json dict into our ModelConfig plus an `info` dict of what the stages
need beyond the model's shape (architecture, special token ids, on-disk dtype); export writes
a config.json dict for the family that expresses a ModelConfig exactly. Every value our model
cannot reproduce is refused with an error naming the config field.
"""
import json
import os

from instructjax.model.config import ModelConfig

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Family name -> config.json model_type. The architectures are "<Family>ForCausalLM" and
# "<Family>ForSequenceClassification".
FAMILIES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3"}
CAUSAL_LM = tuple(f"{family}ForCausalLM" for family in FAMILIES)
SEQUENCE_CLASSIFICATION = tuple(f"{family}ForSequenceClassification" for family in FAMILIES)

# Recorded in a reward model's config.json: HF's score layer has no bias (see convert.py).
SCORE_BIAS_KEY = "instructjax_score_bias"
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_DEFAULT_ROPE_THETA = 10000.0  # transformers' default_theta when a config names none
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings")


class UnsupportedCheckpointError(ValueError):
    """A checkpoint our model cannot reproduce exactly (architecture or config value)."""


def read_json(path):
    """The parsed JSON file at `path` (a dict)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_hf_config(directory):
    """config.json of a checkpoint directory, with ids config.json lacks taken from
    generation_config.json (when that file exists).

    Returns:
        The config dict.
    """
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face "
                                f"checkpoint directory")
    hf = read_json(path)
    generation_path = os.path.join(directory, GENERATION_CONFIG_FILE)
    if os.path.isfile(generation_path):
        generation = read_json(generation_path)
        for key in _SPECIAL_IDS:
            if hf.get(key) is None and generation.get(key) is not None:
                hf[key] = generation[key]
    return hf


def family_of(hf, supported):
    """(family name, architecture) of a config dict whose architecture is in `supported`."""
    architectures = hf.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in supported:
        raise UnsupportedCheckpointError(
            f"unsupported architecture {architectures!r} in config.json 'architectures'; "
            f"supported: {list(supported)}")
    architecture = architectures[0]
    family = next(name for name in FAMILIES if architecture.startswith(name + "For"))
    return family, architecture


def _refuse(field, value, why):
    raise UnsupportedCheckpointError(f"config.json {field}={value!r} is not supported: {why}")


def _rope_fields(hf):
    """Our rope_* fields from transformers 5's `rope_parameters` or the older `rope_scaling`
    plus top-level `rope_theta`."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(field) or {})
    if any(isinstance(v, dict) for v in params.values()):
        _refuse(field, params, "per-layer-type RoPE settings")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse("partial_rotary_factor", partial, "RoPE rotates every feature of a head here")
    theta = float(params.get("rope_theta", hf.get("rope_theta") or _DEFAULT_ROPE_THETA))
    if rope_type == "default":
        return {"rope_theta": theta}
    if rope_type != "llama3":
        _refuse(f"{field}.rope_type", rope_type, "only 'default' and 'llama3' RoPE exist here")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        _refuse(field, params, f"llama3 RoPE needs {missing}")
    return {"rope_theta": theta, "rope_scaling": "llama3",
            "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            # transformers falls back to max_position_embeddings when this is absent.
            "rope_original_max_len": int(params.get("original_max_position_embeddings")
                                         or hf["max_position_embeddings"])}


def _family_fields(family, hf):
    """qkv_bias, qk_norm and sliding_window as `family` defines them, refusing the variants
    our model lacks."""
    if family in ("Llama", "Qwen3") and hf.get("attention_bias"):
        # These families put a bias on the output projection too; ours has none.
        _refuse("attention_bias", True, "the output projection has no bias here")
    if hf.get("mlp_bias"):
        _refuse("mlp_bias", True, "the MLP has no biases here")
    if family in ("Qwen2", "Qwen3") and hf.get("use_sliding_window"):
        _refuse("use_sliding_window", True, "Qwen's per-layer sliding windows are not "
                                            "implemented (Mistral-style uniform windows are)")
    window = hf.get("sliding_window") if family == "Mistral" else None
    return {"qkv_bias": family == "Qwen2", "qk_norm": family == "Qwen3",
            "sliding_window": int(window or 0)}


def model_config_from_hf(hf, family, *, dtype="float32", scan_layers=True, max_seq_len=None):
    """ModelConfig of a config.json dict of `family` (one of FAMILIES).

    Args:
        hf: the config dict (read_hf_config).
        family: e.g. "Llama" (family_of).
        dtype: param and compute dtype name of the result ("float32", "bfloat16", "float16").
        scan_layers: the param layout to build (stacked [L, ...] layers or layers_i).
        max_seq_len: longest sequence the model will be called on; default
            max_position_embeddings.

    Returns:
        ModelConfig. A sequence classifier's has tie_embeddings=True whatever config.json
        says: its checkpoint holds no LM head, and a tied trunk needs none.
    """
    activation = hf.get("hidden_act", "silu")
    if activation not in ("silu", "swish"):
        _refuse("hidden_act", activation, "the MLP is SwiGLU (silu)")
    missing = [key for key in _REQUIRED if hf.get(key) is None]
    if missing:
        raise UnsupportedCheckpointError(f"config.json lacks {missing}")
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        max_seq_len=int(max_seq_len or hf["max_position_embeddings"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)) or _is_classifier(hf),
        dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    fields.update(_rope_fields(hf))
    fields.update(_family_fields(family, hf))
    return ModelConfig(**fields)


def _is_classifier(hf):
    return any(a in SEQUENCE_CLASSIFICATION for a in hf.get("architectures") or [])


def info_from_hf(hf, architecture):
    """What the stages need beyond ModelConfig, from a config dict.

    Returns:
        dict with "architecture" (e.g. "LlamaForCausalLM"), "model_type", "bos_token_id",
        "eos_token_id" (an int, a list of ints, or None), "pad_token_id", "torch_dtype" (the
        dtype name config.json gives, e.g. "bfloat16", or None) and
        "max_position_embeddings".
    """
    info = {"architecture": architecture, "model_type": hf.get("model_type")}
    info.update({key: hf.get(key) for key in _SPECIAL_IDS})
    info["torch_dtype"] = hf.get("dtype") or hf.get("torch_dtype")
    info["max_position_embeddings"] = hf.get("max_position_embeddings")
    return info


def _family_can_express(family, cfg):
    """Whether `family`'s config.json can describe `cfg` exactly."""
    if family == "Qwen2":
        # Qwen2 always has q/k/v biases (zeros would stand in, but re-import would differ).
        return cfg.qkv_bias and not cfg.qk_norm and not cfg.sliding_window
    if family == "Qwen3":
        return cfg.qk_norm and not cfg.qkv_bias and not cfg.sliding_window
    if family == "Mistral":
        return not cfg.qkv_bias and not cfg.qk_norm
    return not cfg.qkv_bias and not cfg.qk_norm and not cfg.sliding_window


def export_family(cfg, info=None):
    """The family a ModelConfig is written as: the imported one (info["architecture"]) when
    it can express cfg, else Qwen3 for qk_norm, Qwen2 for qkv_bias, Mistral for a sliding
    window, else Llama.

    Raises:
        UnsupportedCheckpointError: no family has cfg's combination of features.
    """
    imported = (info or {}).get("architecture") or ""
    family = imported.split("For")[0]
    if family in FAMILIES and _family_can_express(family, cfg):
        return family
    family = ("Qwen3" if cfg.qk_norm else "Qwen2" if cfg.qkv_bias
              else "Mistral" if cfg.sliding_window else "Llama")
    if _family_can_express(family, cfg):
        return family
    raise UnsupportedCheckpointError(
        f"no Hugging Face family has qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm} and "
        f"sliding_window={cfg.sliding_window} together")


def _rope_parameters(cfg):
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        params.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                      low_freq_factor=cfg.rope_low_freq_factor,
                      high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_len)
    return params


def _family_entries(family, cfg):
    if family == "Mistral":
        return {"sliding_window": cfg.sliding_window or None}
    if family in ("Qwen2", "Qwen3"):
        entries = {"use_sliding_window": False, "sliding_window": None,
                   "max_window_layers": cfg.num_layers}
        if family == "Qwen3":
            entries["attention_bias"] = False
        return entries
    return {"attention_bias": False, "mlp_bias": False}


def hf_config_dict(cfg, family, architecture, *, torch_dtype, ids, max_position_embeddings):
    """config.json contents for `cfg` written as `architecture` of `family`.

    Args:
        cfg: ModelConfig.
        family: a FAMILIES key (export_family).
        architecture: "<family>ForCausalLM" or "<family>ForSequenceClassification".
        torch_dtype: dtype name of the saved tensors.
        ids: dict with bos_token_id, eos_token_id, pad_token_id (values may be None).
        max_position_embeddings: int.

    Returns:
        The dict to write as config.json.
    """
    hf = {"architectures": [architecture], "model_type": FAMILIES[family],
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
          "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "hidden_act": "silu",
          "max_position_embeddings": int(max_position_embeddings),
          "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
          "rope_parameters": _rope_parameters(cfg), "attention_dropout": 0.0,
          "use_cache": True, "dtype": torch_dtype, "torch_dtype": torch_dtype}
    # The pre-5 spelling too: transformers 4.x and serving stacks that read config.json
    # themselves (vLLM, TGI, llama.cpp's converter) look for rope_theta / rope_scaling and
    # would otherwise run theta 10000 without scaling.
    hf["rope_theta"] = cfg.rope_theta
    if cfg.rope_scaling != "none":
        legacy = dict(_rope_parameters(cfg))
        legacy.pop("rope_theta")
        hf["rope_scaling"] = legacy
    hf.update(_family_entries(family, cfg))
    hf.update({key: ids.get(key) for key in _SPECIAL_IDS})
    return hf


def generation_config_dict(ids):
    """generation_config.json contents: the special ids that are set."""
    return {key: ids[key] for key in _SPECIAL_IDS if ids.get(key) is not None}
