"""A device's streaming-read bandwidth, measured: the floor a memory-bound step is held against."""
import time

import torch


def read_bandwidth(device="cpu", gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s: the best of `repeats` full reductions (sum and amax, whichever runs faster here) over a
    buffer far larger than the caches."""
    buf = torch.ones(int(gib * 2**30) // 4, device=device)
    sync = torch.cuda.synchronize if buf.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        for op in (torch.sum, torch.amax):
            sync()
            t0 = time.perf_counter()
            op(buf)
            sync()
            best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best
