"""Train-step throughput: tokens/s and model FLOPs utilisation (MFU).

  python benchmarks/train_step.py --model=tiny --batch=16 --seq=128 [--peak_tflops=989]

FLOPs per token follow PaLM (Chowdhery et al. 2022, App. B): 6 * N (N = parameters that do
matmuls: everything but the input embedding lookup, the tied head counted once) plus
attention 6 * L * H * D * T for causal attention (12 * L * H * D * T halved). MFU = achieved
FLOP/s / peak. The peak comes from --peak_tflops or a table of known devices (dense bf16).
The table is printed and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import models  # noqa: E402
from instructjax.model.config import ModelConfig, count_params  # noqa: E402
from instructjax.model.transformer import Transformer, init_boxed_params  # noqa: E402
from instructjax.parallel import mesh as mesh_lib  # noqa: E402
from instructjax.train.losses import lm_loss_fn  # noqa: E402
from instructjax.train import optim, state as state_lib, step as step_lib  # noqa: E402

# Dense bf16 peaks in TFLOP/s (vendor datasheets, no sparsity).
KNOWN_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0,
               "TPU v5 lite": 197.0, "TPU v4": 275.0, "TPU v6 lite": 918.0}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * matmul params + causal attention scores/values."""
    matmul_params = count_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.embed_dim)
    attention = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params + attention


def device_peak(device_kind: str, override: float | None) -> float | None:
    """Peak TFLOP/s of one device: the override, else a known device, else None."""
    if override:
        return override
    for name, peak in KNOWN_PEAKS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help=f"preset: {sorted(models.PRESETS)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default=None, help="compute dtype override")
    parser.add_argument("--attention_impl", default=None)
    parser.add_argument("--remat_policy", default=None)
    parser.add_argument("--scan_layers", default=None, choices=("true", "false"),
                        help="override the preset's lax.scan over layers")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()

    overrides = {k: v for k, v in dict(dtype=args.dtype, attention_impl=args.attention_impl,
                                        remat_policy=args.remat_policy).items() if v}
    if args.scan_layers:
        overrides["scan_layers"] = args.scan_layers == "true"
    cfg = ModelConfig.from_dict({**models.get(args.model).to_dict(), **overrides,
                                 "max_seq_len": max(args.seq, models.get(args.model).max_seq_len)})
    model = Transformer(cfg)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    mesh_lib.check_fits(mesh, global_batch=args.batch, num_heads=cfg.num_heads,
                        num_kv_heads=cfg.num_kv_heads)
    opt_cfg = optim.OptimConfig(learning_rate=1e-4, total_steps=1000, warmup_steps=10)
    tx = optim.make_optimizer(opt_cfg)

    def init_boxed(rng):
        return init_boxed_params(model, rng)

    _, shardings = state_lib.state_shardings(init_boxed, tx, mesh)
    state = state_lib.create_state(init_boxed, tx, shardings, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, size=(args.batch, args.seq + 1), dtype=np.int32)
    host_batch = {
        "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_mask": np.ones((args.batch, args.seq), np.float32),
        "segment_ids": np.ones((args.batch, args.seq), np.int32),
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy(),
    }
    batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim)) for k, v in host_batch.items()}
    with mesh_lib.activate(mesh):
        train_step = step_lib.jit_train_step(
            step_lib.make_train_step(lm_loss_fn(model), tx, optim.make_schedule(opt_cfg)),
            shardings, mesh, {k: v.ndim for k, v in host_batch.items()})
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        state, metrics = train_step(state, batch)  # one more warm step
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / args.steps

    tokens_per_s = args.batch * args.seq / step_s
    achieved = tokens_per_s * flops_per_token(cfg, args.seq) / 1e12
    device = jax.devices()[0]
    peak = device_peak(device.device_kind, args.peak_tflops)
    peak_total = peak * jax.device_count() if peak else None
    mfu = f"{achieved / peak_total:.1%}" if peak_total else "n/a (no peak known)"
    header = "| model | params | devices | batch x seq | compile s | step ms | tokens/s | TFLOP/s | MFU |"
    row = (f"| {args.model} ({cfg.dtype}, remat {cfg.remat_policy}, attn {cfg.attention_impl}, "
           f"scan {cfg.scan_layers}) | "
           f"{count_params(cfg) / 1e6:.2f}M | {jax.device_count()} x {device.device_kind} | "
           f"{args.batch} x {args.seq} | {compile_s:.1f} | {step_s * 1e3:.1f} | "
           f"{tokens_per_s:,.0f} | {achieved:.3f} | {mfu} |")
    print(header)
    print("|" + "---|" * 9)
    print(row)
    stamp = datetime.date.today().isoformat()
    command = "python benchmarks/train_step.py " + " ".join(sys.argv[1:])
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(f"\n### train_step — {stamp} — {platform.node() or 'host'} "
                f"({jax.devices()[0].platform}, jax {jax.__version__})\n\n`{command}`\n\n"
                f"{header}\n|{'---|' * 9}\n{row}\n")


if __name__ == "__main__":
    main()
