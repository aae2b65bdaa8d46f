"""Speed and memory benchmarks (``make bench``); never part of the tests.

Each module ``bench_*.py`` exposes ``main(args) -> str`` returning a Markdown section.
Every ratio in a table is measured in one run on one machine, since these machines are
noisy: compare ratios, not absolute times across runs.
"""

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
