"""Attention kernel throughput: our Pallas kernels against cuDNN and XLA, in one run.

  python benchmarks/attention.py                 # GPU: the full table (minutes)
  python benchmarks/attention.py --quick         # any host: tiny sizes, interpret mode on CPU

Training attention, bf16, FlashAttention convention: forward FLOPs 4 * B * H * T * S * D
(H query heads), halved when causal; forward + backward counts 3.5x the forward (backward =
2.5x). Shapes follow /work/shared/KERNEL-ANCHORS.md: heads * head_dim = 2048, batch * seq =
16k tokens, GQA 4 query heads per kv head, seq 1k..16k, head dim 64 and 128, causal and not.
Each shape runs ours (kernels/flash.py: "ours" = Triton forward and backward,
"ours-mosaic" = the Hopper Mosaic GPU kernels of kernels/flash_mgpu*.py, where they
apply; "ours-mosaic-fwd" = Mosaic forward, Triton backward, not run by default),
`jax.nn.dot_product_attention` with implementation="cudnn" and with "xla";
an implementation that fails (no GPU, not Hopper, out of memory) is skipped with the reason
printed.

Decode: one token per sequence against a bf16 cache, GB/s = bytes of K and V that must be
read (2 * sum(lengths) * K * D * 2) over the time, for full and ragged (uniform random)
lengths, ours (kernels/decode.py: Triton, and on Hopper "ours-mosaic", the Mosaic
GPU kernel of kernels/decode_mgpu.py) vs the plain-jnp reference under XLA, against
the device copy bandwidth measured in the same run (x + 1 on a large array: read + write).

The tables are printed and appended to benchmarks/RESULTS.md (not in --quick mode unless
--results is given) with the date, device kind and jax version. Imports jax and numpy only.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from instructjax.kernels import decode as decode_lib  # noqa: E402
from instructjax.kernels import flash as flash_lib  # noqa: E402
from instructjax.kernels import flash_mgpu as mosaic_lib  # noqa: E402
from instructjax.kernels import reference  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 1 timed iteration, interpret mode on CPU (smoke test)")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths")
    p.add_argument("--head_dims", default=None, help="comma-separated head dims")
    p.add_argument("--tokens", type=int, default=None, help="batch * seq (default 16384)")
    p.add_argument("--width", type=int, default=None, help="heads * head_dim (default 2048)")
    p.add_argument("--gqa", type=int, default=4, help="query heads per kv head")
    p.add_argument("--impls", default="ours,ours-mosaic,cudnn,xla")
    p.add_argument("--no_bwd", action="store_true", help="forward only")
    p.add_argument("--no_decode", action="store_true")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 10)")
    p.add_argument("--block_q", type=int, default=None)
    p.add_argument("--block_kv", type=int, default=None)
    p.add_argument("--block_q_bwd", type=int, default=None)
    p.add_argument("--block_kv_bwd", type=int, default=None)
    p.add_argument("--num_warps", type=int, default=None)
    p.add_argument("--num_stages", type=int, default=None)
    p.add_argument("--mosaic_block_q", type=int, default=None,
                   help="Hopper forward: rows per compute warpgroup (multiple of 64)")
    p.add_argument("--mosaic_block_kv", type=int, default=None,
                   help="Hopper forward: keys per step (default: by head dim when no "
                        "--mosaic_* flag is given, else 128)")
    p.add_argument("--mosaic_stages", type=int, default=None,
                   help="Hopper kernels: shared-memory slots of the streamed blocks")
    p.add_argument("--mosaic_bwd_block_q", type=int, default=None,
                   help="Hopper backward: dQ rows per warpgroup, queries per dK/dV step")
    p.add_argument("--mosaic_bwd_block_kv", type=int, default=None,
                   help="Hopper backward: dK/dV rows per warpgroup, keys per dQ step")
    p.add_argument("--results", default=None,
                   help="markdown file to append to (default benchmarks/RESULTS.md; "
                        "none in --quick mode); '' to skip")
    return p.parse_args()


def time_fn(fn, args, iters):
    """Median seconds per call of a jitted fn, after one compile+warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def random_array(seed, shape, dtype):
    # Drawn flat: rank-4 random draws compile slowly on some hosts; values are what matter.
    x = jax.random.normal(jax.random.key(seed), (int(np.prod(shape)),), jnp.float32)
    return x.reshape(shape).astype(dtype)


OUR_VARIANTS = {  # impl -> (forward, backward) kernel families
    "ours": ("triton", "triton"),
    "ours-mosaic": ("mosaic", "mosaic"),
    "ours-mosaic-fwd": ("mosaic", "triton"),
}


def our_block_sizes(impl, block_sizes):
    """BlockSizes of one of our variants (OUR_VARIANTS)."""
    forward, backward = OUR_VARIANTS[impl]
    if "mosaic" in (forward, backward) and not mosaic_lib.is_hopper(jax.devices()[0]):
        # flash_attention would fall back to Triton and the row would be mislabelled.
        raise ValueError(f"{impl} needs a Hopper (sm_90) GPU; the CPU interpreter is for "
                         "tests")
    return dataclasses.replace(block_sizes, gpu_forward=forward, gpu_backward=backward)


def attention_fns(impl, causal, block_sizes, interpret, head_dim):
    """(forward, forward+backward) jitted functions of (q, k, v, do) for one impl."""
    if impl in OUR_VARIANTS:
        ours = our_block_sizes(impl, block_sizes)
        if impl != "ours" and ours.mosaic is None:
            ours = dataclasses.replace(ours, mosaic=mosaic_lib.MosaicBlocks.default(head_dim))

        def attn(q, k, v):
            return flash_lib.flash_attention(q, k, v, causal=causal, block_sizes=ours,
                                             interpret=interpret)
    elif impl in ("cudnn", "xla"):
        def attn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    else:
        raise ValueError(f"unknown impl {impl!r}: use {', '.join(OUR_VARIANTS)}, cudnn, xla")

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return vjp(do)

    return jax.jit(lambda q, k, v, do: attn(q, k, v)), jax.jit(fwd_bwd)


def short_error(err):
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text[:160]


def rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def check_correctness(args, impls, block_sizes, interpret, dtype):
    """Our kernels (bf16, compiled for this device) against the float32 reference.

    Timings of a wrong kernel mean nothing, so every run first compares the forward output
    and the q/k/v gradients at the shortest sequence, causal and not, plus packed segments.
    Returns markdown lines; bf16 errors should be ~5e-3 (the interpret-mode tests bound
    them by 1e-2).
    """
    T = args.seqs[0]
    lines = ["| kernel | check | D | causal | segments | out | dq | dk | dv |", "|" + "---|" * 9]
    variants = [impl for impl in impls if impl.startswith("ours")]
    if not mosaic_lib.is_hopper(jax.devices()[0]):
        variants = [impl for impl in variants if impl == "ours"]
    for D in args.head_dims:
        H = args.width // D
        K = max(1, H // args.gqa)
        B = max(1, min(4, args.tokens // T))
        q = random_array(10, (B, T, H, D), dtype)
        k = random_array(11, (B, T, K, D), dtype)
        v = random_array(12, (B, T, K, D), dtype)
        do = random_array(13, (B, T, H, D), dtype)
        # Four documents of unequal length, then padding.
        bounds = np.array([0, T // 8, T // 3, T // 2, T - T // 16, T])
        seg = jnp.asarray(np.repeat([1, 2, 3, 4, 0], np.diff(bounds))[None].repeat(B, 0),
                          jnp.int32)
        cases = [(impl, causal, segment_ids) for impl in variants
                 for causal, segment_ids in [(False, None), (True, None), (True, seg)]
                 if impl == "ours" or segment_ids is None]   # mosaic: no segment ids
        for impl, causal, segment_ids in cases:
            def run(attn, *xs):
                out, vjp = jax.vjp(attn, *xs)
                return (out, *vjp(do.astype(out.dtype)))
            ours_blocks = our_block_sizes(impl, block_sizes)
            ours = jax.jit(lambda q, k, v: run(
                lambda q, k, v: flash_lib.flash_attention(
                    q, k, v, segment_ids=segment_ids, causal=causal, block_sizes=ours_blocks,
                    interpret=interpret), q, k, v))
            ref = jax.jit(lambda q, k, v: run(
                lambda q, k, v: reference.attention(q, k, v, segment_ids=segment_ids,
                                                    causal=causal), q, k, v))
            try:
                got = ours(q, k, v)
                want = ref(*(x.astype(jnp.float32) for x in (q, k, v)))
                errs = [f"{rel_err(a, b):.1e}" for a, b in zip(got, want)]
            except Exception as err:
                errs = ["–"] * 4
                print(f"  check failed D={D} causal={causal}: {short_error(err)}", flush=True)
            lines.append(f"| {impl} | T={T} | {D} | {'yes' if causal else 'no'} | "
                         f"{'packed' if segment_ids is not None else 'none'} | "
                         + " | ".join(errs) + " |")
            print("  " + lines[-1], flush=True)
    return "\n".join(lines)


def bench_training(args, impls, block_sizes, interpret, dtype):
    rows = []
    for D in args.head_dims:
        H = args.width // D
        K = max(1, H // args.gqa)
        for T in args.seqs:
            B = max(1, args.tokens // T)
            q = random_array(0, (B, T, H, D), dtype)
            k = random_array(1, (B, T, K, D), dtype)
            v = random_array(2, (B, T, K, D), dtype)
            do = random_array(3, (B, T, H, D), dtype)
            for causal in (False, True):
                flops = 4.0 * B * H * T * T * D / (2 if causal else 1)
                row = {"T": T, "D": D, "B": B, "H": H, "K": K, "causal": causal}
                for impl in impls:
                    try:
                        fwd, fwd_bwd = attention_fns(impl, causal, block_sizes, interpret, D)
                    except ValueError as err:
                        print(f"  skip {impl}: {err}", flush=True)
                        continue
                    for mode, fn, fargs, mult in [("fwd", fwd, (q, k, v, do), 1.0),
                                                  ("fwdbwd", fwd_bwd, (q, k, v, do), 3.5)]:
                        if mode == "fwdbwd" and args.no_bwd:
                            continue
                        try:
                            sec = time_fn(fn, fargs, args.iters)
                            row[(impl, mode)] = mult * flops / sec / 1e12
                        except Exception as err:  # report and go on: the table is the point
                            row[(impl, mode)] = None
                            print(f"  skip {impl} {mode} T={T} D={D} causal={causal}: "
                                  f"{short_error(err)}", flush=True)
                measured = [f"{impl}/{mode}=" + (f"{tf:.3g}" if tf else "-")
                            for (impl, mode), tf in
                            ((key, val) for key, val in row.items() if isinstance(key, tuple))]
                print("  " + " ".join(measured), f"(T={T} D={D} causal={causal})", flush=True)
                rows.append(row)
    return rows


def training_table(rows, impls, no_bwd):
    modes = ["fwd"] if no_bwd else ["fwd", "fwdbwd"]
    ours_impls = [i for i in impls if i.startswith("ours")]
    others = [i for i in impls if not i.startswith("ours")]
    header = ["seq", "D", "B x H/K", "causal"]
    for mode in modes:
        header += [f"{mode} {i}" for i in impls]
        header += [f"{mode} {o}/{i}" for o in ours_impls for i in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda x: f"{x:.3g}" if x is not None else "–"
    for r in rows:
        cells = [str(r["T"]), str(r["D"]), f"{r['B']} x {r['H']}/{r['K']}",
                 "yes" if r["causal"] else "no"]
        for mode in modes:
            cells += [fmt(r.get((i, mode))) for i in impls]
            for o in ours_impls:
                ours = r.get((o, mode))
                for i in others:
                    other = r.get((i, mode))
                    cells.append(f"{ours / other:.2f}" if ours and other else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def copy_bandwidth(n_bytes, iters):
    """Device memory bandwidth in GB/s from x + 1 on a bf16 array (reads and writes n_bytes)."""
    x = jnp.zeros((n_bytes // 2,), jnp.bfloat16)
    sec = time_fn(jax.jit(lambda x: x + 1), (x,), iters)
    return 2 * n_bytes / sec / 1e9


def bench_decode(args, interpret, dtype, copy_gbs):
    """Decode GB/s table: ours (Triton), ours-mosaic (Hopper only) and the XLA reference."""
    H, K, D = 32, 8, 128
    if args.quick:
        H, K, D = 8, 2, 64
    impls = {"ours": jax.jit(lambda q, k, v, n: decode_lib.decode_attention(
        q, k, v, n, interpret=interpret))}
    if mosaic_lib.is_hopper(jax.devices()[0]):
        impls["ours-mosaic"] = jax.jit(lambda q, k, v, n: decode_lib.decode_attention(
            q, k, v, n, gpu_kernel="mosaic"))
    else:
        print("  decode ours-mosaic skipped: needs a Hopper (sm_90) GPU", flush=True)
    impls["xla"] = jax.jit(reference.decode_attention_reference)
    ours = [name for name in impls if name != "xla"]
    header = (["cache L", "B", "lengths", "bytes K+V (MB)"] + [f"{n} GB/s" for n in impls]
              + [f"{n}/copy" for n in impls] + [f"{n}/xla" for n in ours])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda a: f"{a:.3g}" if a is not None else "–"
    ratio = lambda a, b: f"{a / b:.2f}" if a and b else "–"
    for L in args.decode_lens:
        B = max(1, min(64, args.decode_tokens // L))
        q = random_array(4, (B, H, D), dtype)
        k = random_array(5, (B, L, K, D), dtype)
        v = random_array(6, (B, L, K, D), dtype)
        rng = np.random.default_rng(L)
        for kind, lengths in [("full", np.full(B, L)), ("ragged", rng.integers(0, L + 1, B))]:
            lengths = jnp.asarray(lengths, jnp.int32)
            n_bytes = 2 * int(lengths.sum()) * K * D * jnp.dtype(dtype).itemsize
            result = {}
            for name, fn in impls.items():
                try:
                    sec = time_fn(fn, (q, k, v, lengths), args.iters)
                    result[name] = n_bytes / sec / 1e9
                except Exception as err:
                    result[name] = None
                    print(f"  skip decode {name} L={L}: {short_error(err)}", flush=True)
            cells = ([str(L), str(B), kind, f"{n_bytes / 1e6:.3g}"]
                     + [fmt(result[n]) for n in impls]
                     + [ratio(result[n], copy_gbs) for n in impls]
                     + [ratio(result[n], result["xla"]) for n in ours])
            lines.append("| " + " | ".join(cells) + " |")
            print(f"  decode L={L} {kind}: "
                  + ", ".join(f"{n} {fmt(result[n])} GB/s" for n in impls), flush=True)
    return "\n".join(lines)


def main():
    args = parse_args()
    csv = lambda s: [int(x) for x in s.split(",")]
    if args.quick:
        args.seqs = csv(args.seqs or "128,256")
        args.head_dims = csv(args.head_dims or "64")
        args.tokens = args.tokens or 512
        args.width = args.width or 256
        args.iters = args.iters or 1
        args.decode_lens, args.decode_tokens, copy_bytes = [256], 1024, 1 << 23
    else:
        args.seqs = csv(args.seqs or "1024,2048,4096,8192,16384")
        args.head_dims = csv(args.head_dims or "64,128")
        args.tokens = args.tokens or 16384
        args.width = args.width or 2048
        args.iters = args.iters or 10
        # B * L = 256k cache tokens: 1.07 GB of bf16 K+V per layer at K = 8, D = 128.
        args.decode_lens, args.decode_tokens, copy_bytes = [1024, 4096, 16384], 1 << 18, 1 << 30
    if args.results is None:
        args.results = "" if args.quick else os.path.join(os.path.dirname(__file__),
                                                          "RESULTS.md")

    device = jax.devices()[0]
    interpret = jax.default_backend() == "cpu"
    impls = args.impls.split(",")
    defaults = flash_lib.BlockSizes.default()
    overrides = {name: getattr(args, name) for name in
                 ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd", "num_warps",
                  "num_stages") if getattr(args, name) is not None}
    mosaic_flags = {"block_q": args.mosaic_block_q, "block_kv": args.mosaic_block_kv,
                    "num_stages": args.mosaic_stages, "bwd_block_q": args.mosaic_bwd_block_q,
                    "bwd_block_kv": args.mosaic_bwd_block_kv}
    mosaic_overrides = {name: value for name, value in mosaic_flags.items() if value is not None}
    if mosaic_overrides:
        overrides["mosaic"] = mosaic_lib.MosaicBlocks(**mosaic_overrides)
    block_sizes = flash_lib.BlockSizes(**{**defaults.__dict__, **overrides})
    dtype = jnp.bfloat16
    print(f"device {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{'interpret mode, ' if interpret else ''}blocks {block_sizes}", flush=True)

    check_md = check_correctness(args, impls, block_sizes, interpret, dtype)
    print("\nRelative error vs the float32 reference (bf16 inputs)")
    print(check_md)
    rows = bench_training(args, impls, block_sizes, interpret, dtype)
    train_md = training_table(rows, impls, args.no_bwd)
    print("\nTraining attention, TFLOP/s (bf16, GQA "
          f"{args.gqa}:1, heads x dim = {args.width}, batch x seq = {args.tokens})")
    print(train_md)

    decode_md = ""
    if not args.no_decode:
        copy_gbs = copy_bandwidth(copy_bytes, args.iters)
        print(f"\ncopy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
        decode_md = bench_decode(args, interpret, dtype, copy_gbs)
        print(f"\nDecode attention (bf16, copy {copy_gbs:.0f} GB/s)")
        print(decode_md)

    if args.results:
        stamp = datetime.date.today().isoformat()
        command = "python benchmarks/attention.py " + " ".join(sys.argv[1:])
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(f"\n### attention — {stamp} — {device.device_kind} "
                    f"({jax.default_backend()}, jax {jax.__version__})\n\n`{command}`\n\n"
                    f"Blocks: {block_sizes}\n\nRelative error of our kernels vs the float32 "
                    f"reference (bf16 inputs):\n\n{check_md}\n\n"
                    f"Training attention, TFLOP/s (bf16, GQA {args.gqa}:1, heads x dim = {args.width}, batch x seq = {args.tokens}; "
                    f"fwd+bwd counts 3.5x the forward FLOPs):\n\n{train_md}\n")
            if decode_md:
                f.write(f"\nDecode attention (bf16; copy bandwidth {copy_gbs:.0f} GB/s):\n\n"
                        f"{decode_md}\n")
        print(f"\nappended to {args.results}")


if __name__ == "__main__":
    main()
