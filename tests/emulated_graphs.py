"""A stand-in for CUDA graphs on the CPU, for `sbr.graphs.capture`.

A CUDA graph replays its kernels on the addresses it was recorded with: a tensor the step reads that
has moved since (FSDP2's all-gather put the weights elsewhere, a pooled buffer was reallocated) is
read at its old address, a silent wrong number. The stand-in records the address of every tensor the
step reads from outside itself (weights, caches, inputs; not its own intermediates), op by op; a replay
runs the step again and fails if it now reads any other address. It runs the step eagerly under a
dispatch mode, so the step must not be torch.compile'd (tests use sbr.decode.decode_step itself).
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

recorded = []                   # every graph captured, freed or not


class _Reads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads, self.outside, self.made = [], set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for x in tree_flatten((args, kwargs))[0]:
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in self.made:
                self.outside.add(x.untyped_storage().data_ptr())
                self.reads.append((str(func), x.data_ptr(), tuple(x.shape)))
        out = func(*args, **kwargs)
        for y in tree_flatten(out)[0]:                # the step's own tensors (not in-place results)
            if isinstance(y, torch.Tensor) and y.untyped_storage().data_ptr() not in self.outside:
                self.made.add(y.untyped_storage().data_ptr())
        return out


class Graph:
    def __init__(self, fn, reads, outside, out):
        self.fn, self.reads, self.outside, self.out, self.freed, self.replays = fn, reads, outside, out, False, 0

    def replay(self):
        assert not self.freed, "replay of a freed graph"
        with _Reads() as mode:
            out = self.fn()
        if mode.reads != self.reads:
            stale = next((a, b) for a, b in zip(mode.reads + [None], self.reads + [None]) if a != b)
            raise AssertionError(f"the graph would read stale addresses: now {stale[0]}, recorded {stale[1]}")
        self.out.copy_(out)
        self.replays += 1

    def reset(self):
        self.freed, self.fn = True, None


def capture(fn, pool=None):
    with _Reads() as mode:
        out = fn()
    graph = Graph(fn, mode.reads, mode.outside, out)   # outside: the storages read from outside the step
    recorded.append(graph)
    return graph, out
