"""The dry run's report: the table printed from dry_run.json and the memory-budget check."""

from __future__ import annotations

GB = 1e9


def over_budget(result: dict) -> tuple[str, float] | None:
    """(program, GB) of the first program whose total per-device bytes exceed the budget."""
    limit = float(result["hardware"]["memory_per_device_gb"])
    if limit <= 0:
        return None
    for name, p in result["programs"].items():
        if p["total_bytes"] > limit * GB:
            return name, p["total_bytes"] / GB
    return None


def _gb(x: float) -> str:
    """Bytes as GB with 4 significant digits (small configs stay readable)."""
    return f"{x / GB:.4g}"


def format_table(result: dict) -> str:
    """The human-readable report of a dry_run() result."""
    hw, mesh = result["hardware"], result["mesh"]
    lines = [f"[dry_run] stage {result['stage']} on {result['devices']['count']} "
             f"{result['devices']['platform']} devices"
             f"{' (virtual)' if result['devices']['virtual'] else ''}; mesh {mesh}; target "
             f"{hw['name'] or '-'}: {hw['memory_per_device_gb']} GB/device, "
             f"{hw['peak_tflops']} TFLOP/s, {hw['hbm_gbps']} GB/s"]
    lines.append("| model | params | closed form |")
    lines.append("|---|---|---|")
    for name, n in result["params"].items():
        lines.append(f"| {name} | {n:,} | {result['closed_form_params'][name]:,} |")
    lines.append("")
    lines.append("| resident buffer | GB/device | closed form GB |")
    lines.append("|---|---|---|")
    for name, b in result["closed_form_bytes_per_device"].items():
        measured = result["resident_bytes_per_device"].get(name)
        lines.append(f"| {name} | {'-' if measured is None else _gb(measured)} | {_gb(b)} |")
    lines.append("")
    lines.append("| program | calls | args GB | out GB | alias GB | temp GB | code MB | peak GB "
                 "| +resident GB | args closed form GB | TFLOP/dev/step | closed form | s/step "
                 "| compile s |")
    lines.append("|" + "---|" * 14)
    def tflops(x):
        return "-" if x is None else f"{x / 1e12:.2f}"

    for name, p in result["programs"].items():
        seconds = "-" if p["seconds_per_step"] is None else f"{p['seconds_per_step']:.3f}"
        lines.append(
            f"| {name} | {p['calls_per_step']} | {_gb(p['argument_bytes'])} "
            f"| {_gb(p['output_bytes'])} | {_gb(p['alias_bytes'])} | {_gb(p['temp_bytes'])} "
            f"| {p['code_bytes'] / 1e6:.1f} | {_gb(p['peak_bytes'])} | {_gb(p['total_bytes'])} "
            f"| {_gb(p['closed_form_argument_bytes'])} "
            f"| {tflops(p['flops_per_device_per_step'])} "
            f"| {tflops(p['closed_form_flops_per_device_per_step'])} "
            f"| {seconds} | {p['compile_seconds']:.1f} |")
    if result["step_seconds"] is None:
        step = "no hardware.peak_tflops: FLOPs and step time not estimated"
    else:
        step = (f"{tflops(result['step_flops_per_device'])} TFLOP/device, "
                f"{result['step_seconds']:.2f} s at peak (roofline, no communication)")
    lines.append(f"step: {step}; compile {result['compile_seconds']:.1f} s (+ cost twins "
                 f"{result['cost_twin_compile_seconds']:.1f} s); wall {result['wall_seconds']:.1f} s")
    return "\n".join(lines)
