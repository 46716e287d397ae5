"""Hugging Face checkpoint import speed: our load_hf against just reading the bytes.

  python benchmarks/hf_load.py                  # 0.85B LLaMA shape, ~30 s on 2 cores, ~10 GB RAM
  python benchmarks/hf_load.py --layers=2       # quick smoke run

Writes a random LLaMA checkpoint (bf16 on disk, 1 GB shards plus an index; numpy only, no
torch) into a temporary directory, then times, on the host CPU:
  (a) reading every tensor's bytes with safetensors' numpy `get_tensor` (the floor: what any
      loader must read);
  (b) load_hf(dir, dtype="float32") to jax arrays on the default device (reading, casting
      bf16 -> float32, un-flattening the heads and transposing to our [in, out] layout);
  (c) the same with dtype="bfloat16" (no cast);
  and, as the floor of (b) on this host, allocating and filling float32 arrays of the params'
  sizes (first-touch page faults of fresh memory, which (a) avoids by reusing its buffers).
The files stay in the page cache between runs, so the three compare the work after the disk.
Each is run --repeats times; the table gives the first (cold) and the best time. The table is
printed and appended to benchmarks/RESULTS.md with the date, machine and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from instructjax.model.config import ModelConfig, count_params  # noqa: E402
from instructjax.model.hf import configs, load_hf, safetensors_io  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embed", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shard_gb", type=float, default=1.0)
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"),
                   help="markdown file to append to; '' to skip")
    return p.parse_args()


def random_bf16(rng, shape):
    """Random finite bf16 values: random bit patterns with the top exponent bit cleared
    (|x| < 2), much cheaper than drawing normals for a billion entries."""
    import ml_dtypes
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16) & np.uint16(0xBFFF)
    return bits.view(ml_dtypes.bfloat16)


def hf_shapes(cfg):
    """{tensor name: shape} of an untied LlamaForCausalLM of cfg's shape."""
    E, H, K, D, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, E), "model.norm.weight": (E,),
              "lm_head.weight": (cfg.vocab_size, E)}
    per_layer = {"self_attn.q_proj.weight": (H * D, E), "self_attn.k_proj.weight": (K * D, E),
                 "self_attn.v_proj.weight": (K * D, E), "self_attn.o_proj.weight": (E, H * D),
                 "mlp.gate_proj.weight": (F, E), "mlp.up_proj.weight": (F, E),
                 "mlp.down_proj.weight": (E, F), "input_layernorm.weight": (E,),
                 "post_attention_layernorm.weight": (E,)}
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{name}": s for name, s in per_layer.items()})
    return shapes


def write_checkpoint(directory, cfg, shard_bytes, seed=0):
    """A random LlamaForCausalLM checkpoint of cfg's shape, bf16 on disk; returns its bytes."""
    rng = np.random.default_rng(seed)
    tensors = [(name, 2 * math.prod(shape), lambda shape=shape: random_bf16(rng, shape))
               for name, shape in hf_shapes(cfg).items()]
    safetensors_io.write_checkpoint(directory, tensors, shard_bytes)
    hf = configs.hf_config_dict(cfg, "Llama", "LlamaForCausalLM", torch_dtype="bfloat16",
                                ids={"bos_token_id": 1, "eos_token_id": 2},
                                max_position_embeddings=cfg.max_seq_len)
    with open(os.path.join(directory, configs.CONFIG_FILE), "w") as f:
        json.dump(hf, f)
    return sum(nbytes for _, nbytes, _ in tensors)


def read_all_bytes(directory):
    """(a): every tensor through safetensors numpy; returns the bytes read."""
    total = 0
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, file), framework="np") as f:
            for name in f.keys():
                total += f.get_tensor(name).nbytes
    return total


def load_params(directory, dtype):
    """(b), (c): load_hf, waiting for the arrays; returns the bytes of the params."""
    params, _, _ = load_hf(directory, dtype=dtype)
    jax.block_until_ready(params)
    return sum(x.nbytes for x in jax.tree.leaves(params))


def fill_fresh_memory(sizes):
    """Floor of (b) on this host: allocating and filling float32 arrays of these element
    counts, kept alive as the params are (first-touch page faults, no reading at all)."""
    kept = [np.full(size, 1.0, np.float32) for size in sizes]
    return sum(x.nbytes for x in kept)


def timed(fn, repeats):
    """(first run's seconds, best run's seconds, fn's result). Later runs in this process
    may reuse memory the earlier ones freed, so the first is the cold-start figure."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times[0], min(times), result


def main(args):
    cfg = ModelConfig(vocab_size=args.vocab, embed_dim=args.embed, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads,
                      head_dim=args.embed // args.heads, mlp_dim=args.mlp, max_seq_len=4096,
                      tie_embeddings=False)
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        disk_bytes = write_checkpoint(directory, cfg, int(args.shard_gb * 2**30))
        write_s = time.perf_counter() - start
        read = timed(lambda: read_all_bytes(directory), args.repeats)
        f32 = timed(lambda: load_params(directory, "float32"), args.repeats)
        bf16 = timed(lambda: load_params(directory, "bfloat16"), args.repeats)
    sizes = [math.prod(shape) for shape in hf_shapes(cfg).values()]
    floor = timed(lambda: fill_fresh_memory(sizes), args.repeats)
    assert read[2] == disk_bytes
    header = "| what | GB in | GB out | s, first | s, best | GB/s in (best) | x (a) (best) |"
    rows = [("(a) safetensors numpy, all tensors", disk_bytes, read),
            ("(b) load_hf -> float32 params", disk_bytes, f32),
            ("(c) load_hf -> bfloat16 params", disk_bytes, bf16),
            ("floor of (b): fill fresh float32 arrays", None, floor)]
    lines = [header, "|" + "---|" * 7] + [
        f"| {what} | {f'{gb_in / 1e9:.2f}' if gb_in else '-'} | {gb_out / 1e9:.2f} | "
        f"{first:.2f} | {best:.2f} | {f'{gb_in / 1e9 / best:.2f}' if gb_in else '-'} | "
        f"{best / read[1]:.2f} |" for what, gb_in, (first, best, gb_out) in rows]
    title = (f"LLaMA shape E {cfg.embed_dim}, L {cfg.num_layers}, H {cfg.num_heads}/K "
             f"{cfg.num_kv_heads}, F {cfg.mlp_dim}, V {cfg.vocab_size}: "
             f"{count_params(cfg) / 1e9:.2f}B params, bf16 on disk; written in {write_s:.1f} s; "
             f"{args.repeats} runs each")
    print(title)
    print("\n".join(lines))
    if args.results:
        stamp = datetime.date.today().isoformat()
        command = "python benchmarks/hf_load.py " + " ".join(sys.argv[1:])
        machine = f"{platform.node() or 'host'}, {os.cpu_count()} CPUs"
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(f"\n### hf_load — {stamp} — {machine} ({jax.devices()[0].platform}, "
                    f"jax {jax.__version__})\n\n`{command.strip()}`\n\n{title}\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(parse_args())
