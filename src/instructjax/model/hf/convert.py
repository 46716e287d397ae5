"""Hugging Face checkpoints to our params and back: LLaMA (2 and 3.x), Mistral, Qwen2, Qwen3
causal LMs, and their sequence classifiers as reward models.

Import builds every param from its HF tensors (layout.py) straight into its target layout:
with a mesh, each param's NamedSharding comes from its logical axes (parallel/mesh.py) and
each device's shard is read from disk on its own, slice by slice, so no process reads a
tensor it does not hold. Export writes safetensors shards, config.json and
generation_config.json that `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
import concurrent.futures
import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instructjax.model.heads import RewardModel
from instructjax.model.hf import configs, layout, safetensors_io
from instructjax.model.hf.safetensors_io import CheckpointMismatchError
from instructjax.model.transformer import Transformer, init_boxed_params
from instructjax.parallel import mesh as mesh_lib

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size, 5 GB
_LOAD_THREADS = min(8, os.cpu_count() or 1)
# Tensors older checkpoints carry that hold no weights: RoPE's cached inverse frequencies.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------- import

def load_hf(path, *, mesh=None, dtype="float32", scan_layers=True, max_seq_len=None):
    """A Hugging Face causal LM directory -> (params, ModelConfig, info).

    Reads config.json and model.safetensors, or model.safetensors.index.json and its
    shards; tensors may be float32, bfloat16 or float16 on disk.

    Args:
        path: local directory of a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
            or Qwen3ForCausalLM checkpoint.
        mesh: optional jax Mesh with axes ('data', 'fsdp', 'tensor'): params are created
            sharded by LOGICAL_AXIS_RULES, each device's shard read alone from disk; None
            puts them whole on the default device. Both give the same values bit for bit.
        dtype: param dtype name; the returned config uses it for compute too (change that
            with cfg.replace(dtype=...)).
        scan_layers: stacked [L, ...] layer params (True) or layers_0 .. layers_{L-1}.
        max_seq_len: ModelConfig.max_seq_len; default config.json's max_position_embeddings.

    Returns:
        params: `Transformer(cfg).apply({"params": params}, tokens)` params, in `dtype`.
        cfg: ModelConfig.
        info: dict (configs.info_from_hf): architecture, model_type, bos/eos/pad token ids,
            torch_dtype, max_position_embeddings.

    Raises:
        configs.UnsupportedCheckpointError: naming an unsupported architecture or config field.
        FileNotFoundError: naming a missing config.json or shard file.
        CheckpointMismatchError: naming a missing, unexpected or wrongly shaped tensor.
    """
    hf = configs.read_hf_config(path)
    family, architecture = configs.family_of(hf, configs.CAUSAL_LM)
    cfg = configs.model_config_from_hf(hf, family, dtype=dtype, scan_layers=scan_layers,
                                       max_seq_len=max_seq_len)
    params = _load_params(path, Transformer(cfg), mesh)
    return params, cfg, configs.info_from_hf(hf, architecture)


def load_hf_reward(path, *, mesh=None, dtype="float32", scan_layers=True, max_seq_len=None):
    """A `<Family>ForSequenceClassification` directory with one label -> RewardModel params.

    HF's score layer has no bias; ours does. `save_hf_reward` records our bias in
    config.json under configs.SCORE_BIAS_KEY and this reads it back (0 when absent), so
    export then import is exact. A sequence classifier has no LM head, so the returned
    config ties the embeddings (the reward model never uses the LM head; an untied trunk's
    head is not exported either).

    Args:
        path, mesh, dtype, scan_layers, max_seq_len: as in load_hf.

    Returns:
        params: {"trunk": Transformer params, "head": {"kernel" [E], "bias" []}} for
            `RewardModel(cfg)`; the head stays float32 as model/heads.py makes it.
        cfg: ModelConfig.
        info: load_hf's info plus "score_bias" (float).
    """
    hf = configs.read_hf_config(path)
    family, architecture = configs.family_of(hf, configs.SEQUENCE_CLASSIFICATION)
    num_labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if num_labels != 1:
        raise configs.UnsupportedCheckpointError(
            f"config.json num_labels={num_labels}: a reward model has exactly one label")
    cfg = configs.model_config_from_hf(hf, family, dtype=dtype, scan_layers=scan_layers,
                                       max_seq_len=max_seq_len)
    info = configs.info_from_hf(hf, architecture)
    info["score_bias"] = float(hf.get(configs.SCORE_BIAS_KEY, 0.0))
    params = _load_params(path, RewardModel(cfg), mesh, score_bias=info["score_bias"])
    return params, cfg, info


def abstract_params(module):
    """(shapes and dtypes of module's params, their logical PartitionSpecs), nothing
    allocated."""
    init = functools.partial(init_boxed_params, module, batch_shape=(1, 1))
    boxed = jax.eval_shape(init, jax.random.key(0))
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def _load_params(path, module, mesh, score_bias=None):
    """module's params, each read from the checkpoint at `path` into its own layout and
    dtype (and sharding, with a mesh); score_bias fills a reward head's bias."""
    abstract, specs = abstract_params(module)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    paths = [_dict_path(key_path) for key_path, _ in flat]
    shapes = {p: leaf.shape for p, (_, leaf) in zip(paths, flat)}
    shardings = [None] * len(flat)
    if mesh is not None:
        tree = mesh_lib.logical_to_sharding(specs, mesh)
        mesh_lib.check_divisible(abstract, tree)
        shardings = treedef.flatten_up_to(tree)
    # The reward head's bias has no HF tensor: it comes from config.json.
    sources = {p: layout.param_source(p, shapes[p]) for p in paths if p != ("head", "bias")}
    with safetensors_io.CheckpointReader(path) as reader:
        check_tensors(reader, sources, shapes, tied=module.cfg.tie_embeddings)

        def build(p, leaf, sharding):
            if p in sources:
                read = functools.partial(layout.read_param, reader, sources[p], leaf.shape,
                                         dtype=np.dtype(leaf.dtype))
            else:
                read = _constant_reader(score_bias, leaf.dtype)
            return _build_array(read, leaf.shape, sharding)

        # Params are independent, and numpy's copies release the GIL: one thread per core
        # overlaps their reads, casts and first-touch page faults (~1.3x on 2 cores).
        with concurrent.futures.ThreadPoolExecutor(_LOAD_THREADS) as pool:
            built = list(pool.map(build, paths, [leaf for _, leaf in flat], shardings))
    return jax.tree_util.tree_unflatten(treedef, built)


def _dict_path(key_path):
    return tuple(str(k.key) for k in key_path)


def _constant_reader(value, dtype):
    def read(index):
        del index  # a scalar: every shard is the whole of it
        return np.asarray(value, dtype)
    return read


def _build_array(read, shape, sharding):
    """A jax array of `shape` from read(index) -> np slice: whole on the default device, or
    one read per distinct shard index of `sharding`, shared by its replicas (XLA:CPU may
    adopt one host buffer for several devices, as jax itself does for replicated arrays;
    donating such a buffer leaves it untouched)."""
    if sharding is None:
        return jax.device_put(read(tuple(slice(None) for _ in shape)))
    cache = {}

    def callback(index):
        key = layout.normalize_index(index, shape)
        if key not in cache:
            cache[key] = read(index)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def check_tensors(reader, sources, shapes, tied):
    """Raises CheckpointMismatchError naming the first missing, unexpected, non-float or
    wrongly shaped tensor of the checkpoint.

    Args:
        reader: safetensors_io.CheckpointReader.
        sources: our param path -> layout.ParamSource.
        shapes: our param path -> full param shape.
        tied: the model ties its LM head to the embedding.
    """
    expected = {}
    for path, source in sources.items():
        shape = shapes[path]
        per_layer = shape[1:] if source.stacked else shape
        for name in source.hf_names:
            expected[name] = layout.hf_shape(source.layout, per_layer)
    present = reader.names()
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointMismatchError(f"tensor {missing[0]!r} is missing from the checkpoint "
                                      f"({len(missing)} missing in all: {missing[:5]})")
    ignored = {name for name in present if name.endswith(_IGNORED_SUFFIXES)}
    if tied:
        # transformers ties a duplicate LM head to the embedding when config.json says so.
        ignored.add("lm_head.weight")
    unexpected = sorted(present - set(expected) - ignored)
    if unexpected:
        raise CheckpointMismatchError(
            f"unexpected tensor {unexpected[0]!r} in the checkpoint ({len(unexpected)} in all: "
            f"{unexpected[:5]}); config.json does not describe it")
    for name, shape in expected.items():
        got = reader.shape(name)
        if got != shape:
            raise CheckpointMismatchError(f"tensor {name!r} has shape {list(got)}, expected "
                                          f"{list(shape)} from config.json")
        if reader.dtype(name) not in safetensors_io.FLOAT_DTYPES:
            raise CheckpointMismatchError(f"tensor {name!r} has dtype {reader.dtype(name)}; "
                                          f"expected one of {safetensors_io.FLOAT_DTYPES}")


# ---------------------------------------------------------------- export

def save_hf(params, model_config, path, *, tokenizer=None,
            max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, dtype=None, info=None):
    """Writes a Transformer as a Hugging Face causal LM directory.

    Files: config.json (the family from configs.export_family: info's architecture when it
    fits, else Qwen3 for qk_norm, Qwen2 for qkv_bias, Mistral for a sliding window, else
    Llama), model.safetensors or shards plus model.safetensors.index.json above
    max_shard_bytes, generation_config.json, and the tokenizer's files when one is given.

    Args:
        params: Transformer params, scanned or unrolled, numpy or (fully addressable,
            possibly sharded) jax arrays.
        model_config: their ModelConfig.
        path: directory to write (created; weight files of an earlier save are replaced).
        tokenizer: optional object with save_pretrained(path).
        max_shard_bytes: largest safetensors file.
        dtype: dtype name of the saved tensors; default each param's own.
        info: optional load_hf info: architecture to keep, bos/eos/pad ids,
            max_position_embeddings.

    Returns:
        path.
    """
    _check_params(params, Transformer, model_config)
    ids = _special_ids(info, tokenizer)
    family = configs.export_family(model_config, info)
    return _save(params, model_config, path, f"{family}ForCausalLM", family, ids, tokenizer,
                 max_shard_bytes, dtype, info, extra={})


def save_hf_reward(params, model_config, path, *, tokenizer=None,
                   max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, dtype=None, info=None):
    """Writes a RewardModel as `<Family>ForSequenceClassification` with num_labels=1.

    transformers reads the score at each row's last token that is not pad_token_id, which
    therefore must be known (info["pad_token_id"] or the tokenizer's pad_id). HF's score
    layer has no bias: our head's bias, a constant shift of every reward that
    Bradley-Terry losses and normalised PPO rewards ignore, goes into config.json as
    configs.SCORE_BIAS_KEY for load_hf_reward to restore; transformers' scores lack it.
    The trunk's LM head, if untied, is not written (a classifier has none).

    Args:
        params: {"trunk": ..., "head": {"kernel" [E], "bias" []}}.
        model_config, path, tokenizer, max_shard_bytes, dtype, info: as in save_hf.

    Returns:
        path.
    """
    _check_params(params, RewardModel, model_config)
    ids = _special_ids(info, tokenizer)
    if ids.get("pad_token_id") is None:
        raise ValueError("save_hf_reward needs a pad token id (info['pad_token_id'] or a "
                         "tokenizer with pad_id): transformers finds the scored token by it")
    family = configs.export_family(model_config, info)
    extra = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
             configs.SCORE_BIAS_KEY: float(np.asarray(params["head"]["bias"]))}
    trunk = {k: v for k, v in params["trunk"].items() if k != "lm_head"}
    return _save({"trunk": trunk, "head": {"kernel": params["head"]["kernel"]}}, model_config,
                 path, f"{family}ForSequenceClassification", family, ids, tokenizer,
                 max_shard_bytes, dtype, info, extra)


def _save(params, cfg, path, architecture, family, ids, tokenizer, max_shard_bytes, dtype,
          info, extra):
    save_tokenizer = _tokenizer_saver(tokenizer)
    tensors = export_tensors(params, dtype)
    os.makedirs(path, exist_ok=True)
    safetensors_io.write_checkpoint(path, tensors, max_shard_bytes)
    saved_dtype = np.dtype(jnp.dtype(dtype) if dtype else _embedding(params).dtype)
    max_positions = max(cfg.max_seq_len, (info or {}).get("max_position_embeddings") or 0)
    hf = configs.hf_config_dict(cfg, family, architecture, torch_dtype=saved_dtype.name,
                                ids=ids, max_position_embeddings=max_positions)
    hf.update(extra)
    _write_json(os.path.join(path, configs.CONFIG_FILE), hf)
    _write_json(os.path.join(path, configs.GENERATION_CONFIG_FILE),
                configs.generation_config_dict(ids))
    if save_tokenizer is not None:
        save_tokenizer(path)
    return path


def _embedding(params):
    trunk = params.get("trunk", params)
    return trunk["embed"]["embedding"]


def _tokenizer_saver(tokenizer):
    """tokenizer.save_pretrained, checked before anything is written."""
    if tokenizer is None:
        return None
    save = getattr(tokenizer, "save_pretrained", None)
    if not callable(save):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no save_pretrained(path) "
                        f"method to write Hugging Face tokenizer files; pass tokenizer=None "
                        f"to save the weights alone")
    return save


def _special_ids(info, tokenizer):
    """bos/eos/pad ids from info, else from the tokenizer's bos_id/eos_id/pad_id."""
    info = info or {}
    ids = {}
    for key, attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_ids"),
                      ("pad_token_id", "pad_id")):
        value = info.get(key)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, attr, None)
        ids[key] = value
    eos = ids["eos_token_id"]
    # every id that ends generation (LLaMA 3's <|eot_id|> and <|end_of_text|>): a list
    # when there are several, as the families' own config files write it
    if isinstance(eos, (tuple, list)):
        ids["eos_token_id"] = list(eos) if len(eos) > 1 else int(eos[0])
    return ids


def _check_params(params, module_cls, cfg):
    """Raises ValueError naming the first param whose path or shape differs from what
    module_cls(cfg) has, in the params' own layer layout."""
    trunk = params.get("trunk", params)
    cfg = cfg.replace(scan_layers="layers" in trunk)
    expected, _ = abstract_params(module_cls(cfg))
    want = {_dict_path(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(
        expected)[0]}
    got = {_dict_path(p): np.shape(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(
        params)[0]}
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            raise ValueError(f"param {'/'.join(path)} has shape {got.get(path)} but the model "
                             f"config gives {want.get(path)} (None = absent)")


def export_tensors(params, dtype=None):
    """The HF tensors of params, produced lazily: [(name, nbytes, produce() -> np.ndarray)].

    A reward model's head/bias (no HF tensor) must have been removed by the caller.
    """
    out = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError("saving needs fully addressable params: gather them to one "
                             "process first (multi-process export is not supported)")
        names = _dict_path(key_path)
        source = layout.param_source(names, np.shape(leaf))
        out_dtype = np.dtype(jnp.dtype(dtype) if dtype else leaf.dtype)
        per_layer = np.shape(leaf)[1:] if source.stacked else np.shape(leaf)
        nbytes = math.prod(layout.hf_shape(source.layout, per_layer)) * out_dtype.itemsize
        for i, name in enumerate(source.hf_names):
            layer = i if source.stacked else None
            out.append((name, nbytes, functools.partial(_produce, leaf, layer, source.layout,
                                                        out_dtype)))
    return out


def _produce(leaf, layer, tensor_layout, out_dtype):
    # One layer at a time: a stacked [L, ...] param never comes to the host whole.
    array = np.asarray(leaf if layer is None else leaf[layer])
    return layout.to_hf(tensor_layout, array, out_dtype)


def _write_json(path, content):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")
