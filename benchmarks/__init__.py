"""Speed and memory benchmarks (``make bench``); never part of the tests.

Each module ``bench_*.py`` exposes ``main(args) -> str`` returning a Markdown section.
Every ratio in a table is measured in one run on one machine, since these machines are
noisy: compare ratios, not absolute times across runs.
"""

import platform

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: str) -> str:
    """The device's name as the tables print it (the GPU's, or the CPU's with its threads)."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
