"""Target machines the scaled configs are sized for (the `config.hardware` section).

Numbers are per device. `memory_per_device_gb` is what a program may use, in 1e9 bytes: the
device's memory less room for the runtime (CUDA context, NCCL buffers, allocator
fragmentation). The dry run (`--config.dry_run=True`) checks every compiled program against
it and estimates step times from `peak_tflops` (dense bf16) and `hbm_gbps`.
"""


def h200(num_devices: int) -> dict:
    """`num_devices` NVIDIA H200 SXM: 141 GB HBM3e (125 GB budgeted), 989 dense bf16
    TFLOP/s, 4.8 TB/s; 8 per node on NVLink, nodes on InfiniBand."""
    return dict(name=f"{num_devices} x NVIDIA H200 SXM 141GB", num_devices=num_devices,
                memory_per_device_gb=125.0, peak_tflops=989.0, hbm_gbps=4800.0)
