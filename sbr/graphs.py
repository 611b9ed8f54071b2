"""CUDA graphs of the compiled decoding step: one recording a prompt-length bucket, freed and recorded
again when the addresses it reads move, counted.

A decoding step at 7B launches ~600 small kernels for ~15 GB of weight reads; a CUDA graph replays
them with one launch, on the addresses it was recorded with. The step reads the weights and rotary
tables, the pooled cache buffers (sbr.decode.GroupCache: each prompt-length bucket a view at the start
of one buffer a layer, so buckets A -> B -> A keep their addresses) and three small inputs (token ids,
positions, t), copied into the recording's own buffers before each replay.

Under FSDP2 the weights do not keep their addresses: `reshard()` frees the unsharded storage and the
next all-gather allocates it anew. Keeping it would hold the whole bf16 model (15.2 GB at 7B) through
training, which an A100-40GB cannot spare beside the sharded fp32 state, so instead the first step of a
rollout whose weights moved frees every recording (`CUDAGraph.reset()`) and records its bucket again.
torch.compile's own graphs (mode="reduce-overhead") would keep every earlier recording and check
them all, one by one, before recording again; here at most one recording a bucket is alive, all
drawing on one memory pool.
A recording costs two warm-up runs of the step and one capture: ~3 step times, about 1% of a
256-token rollout (`recordings` counts them; the trainer logs them per step as `decode_recordings`).

On the CPU there are no CUDA graphs: the compiled step runs as it is. Tests replace `capture` by a
stand-in that checks every replay reads the addresses its recording read (tests/test_decode.py).
"""
import torch

from sbr.decode import GroupCache, decode_step


def static_step(device: torch.device):
    """The compiled decoding step for `device`: under CUDA graphs on a GPU, Inductor's code elsewhere."""
    compiled = torch.compile(decode_step, fullgraph=True)   # static shapes but for the prompt length
    return StepGraphs(compiled) if uses_graphs(device) else compiled


def uses_graphs(device: torch.device) -> bool:
    return device.type == "cuda"


def capture(fn, pool):
    """Record fn() into a CUDA graph drawing on memory pool `pool`: (graph, its output). Warm-up runs on
    a side stream first (the first compiles and autotunes), as torch.cuda.graph's documentation asks.
    cuBLAS's workspaces are cleared around the capture, as Inductor's own graphs do, so none is
    allocated inside the pool and pinned there; thread-local capture, as Inductor's, so another thread's
    CUDA call (NCCL's watchdog, a profiler) cannot break it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)
    clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    clear()
    return graph, out


def addresses(model, cache: GroupCache) -> list:
    """What a recording of the step reads: the text decoder's parameters and buffers, the LM head, and
    the cache's buffers (None where the cache has no such tensor)."""
    text, head = model.model.language_model, model.lm_head
    return [*text.parameters(), *text.buffers(), *head.parameters(), *head.buffers(),
            *cache.pre_k, *cache.pre_v, *cache.own_k, *cache.own_v, cache.pre_bias, cache.slots]


class StepGraphs:
    """Calls like `decode_step(model, cache, token_ids, positions, t)` with t a 0-dim tensor."""

    def __init__(self, step):
        self.step = step
        self.live = {}             # shapes of the tensors read (all at self._base) -> (graph, static inputs, output)
        self.recordings = 0        # every capture since construction
        self.invalidations = 0     # rollouts whose weights or buffers had moved, every recording freed
        self._base = None          # the addresses every live recording reads
        self._cache = self._key = None
        self._args = None          # (model, cache) of this call: what a capture reads
        self._pool = None          # one memory pool shared by the recordings (replayed one at a time)

    def free(self):
        for graph, _, _ in self.live.values():
            graph.reset()
        self.live.clear()

    def __call__(self, model, cache: GroupCache, token_ids: torch.Tensor, positions: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        if cache is not self._cache:               # a new rollout: have its weights or buffers moved?
            reads = addresses(model, cache)
            base = tuple(None if x is None else x.data_ptr() for x in reads)
            if base != self._base:                 # every live recording reads stale addresses
                self.invalidations += self._base is not None
                self.free()
                self._base = base
            self._cache = cache                    # buckets differ only in shapes, at the same addresses
            self._key = tuple(None if x is None else tuple(x.shape) for x in reads)
        self._args = model, cache
        entry = self.live.get(self._key)
        if entry is None:
            inputs = token_ids.clone(), positions.clone(), t.clone()
            if self._pool is None and uses_graphs(token_ids.device):
                self._pool = torch.cuda.graph_pool_handle()
            graph, out = capture(lambda: self.step(*self._args, *inputs), self._pool)
            self.live[self._key] = entry = graph, inputs, out
            self.recordings += 1
        graph, inputs, out = entry
        for buffer, value in zip(inputs, (token_ids, positions, t)):
            buffer.copy_(value)
        graph.replay()
        return out.clone()                         # the next replay overwrites `out`
