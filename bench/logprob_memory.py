"""Peak memory of the log-prob computation: sbr's chunked, checkpointed LM head vs a full log_softmax.

    python bench/logprob_memory.py [--tokens 2048] [--vocab 151936] [--hidden 256] [--chunk 256]

Both run in this process, one after the other, forward and backward, on the same hidden states
(8 completions x 256 tokens by default) and a 151,936-token vocabulary (Qwen2-VL's). Peak memory is
read from the PyTorch profiler's allocation events (CPU) or torch.cuda.max_memory_allocated (GPU),
counting only what the computation allocates beyond its inputs. Prints both and their ratio.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sbr.policy import _chunk_logprobs  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402


def full(h, w, t):
    logits = (h @ w.t()).float()                                       # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1)


def chunked(h, w, t, chunk):
    none = torch.empty(0, dtype=torch.long, device=h.device)
    out = [checkpoint(_chunk_logprobs, h[i:i + chunk], w, t[i:i + chunk], 1.0, none, use_reentrant=False)[0]
           for i in range(0, t.numel(), chunk)]
    return torch.cat(out)


def peak_bytes(fn, h, w, t) -> int:
    """Bytes allocated at the high-water mark of fn's forward and backward, above the inputs."""
    if h.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(h, w, t).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(h, w, t).sum().backward()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    now = peak = 0
    for e in events:
        now += e.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8 * 256)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    w = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).requires_grad_(True)
    t = torch.randint(0, args.vocab, (args.tokens,), device=device)
    lp_full, lp_chunk = full(h, w, t), chunked(h, w, t, args.chunk)
    diff = (lp_full - lp_chunk).abs().max().item()
    base = peak_bytes(full, h, w, t)
    ours = peak_bytes(lambda *a: chunked(*a, args.chunk), h, w, t)
    mib = 2 ** 20
    print(f"device {device}, threads {torch.get_num_threads()}, tokens {args.tokens}, vocab {args.vocab}, "
          f"hidden {args.hidden}, chunk {args.chunk}")
    print(f"full log_softmax peak: {base / mib:9.1f} MiB   (one (tokens x vocab) fp32 tensor: "
          f"{args.tokens * args.vocab * 4 / mib:.1f} MiB)")
    print(f"chunked peak:          {ours / mib:9.1f} MiB")
    print(f"ratio full / chunked:  {base / ours:9.2f}x    max |log-prob difference| {diff:.2e}")


if __name__ == "__main__":
    main()
