"""Build one scheduled qie PrimFunc for a target and call it on numpy arrays (tests and bench).

The Relax pass does the same wiring inside a graph; this module is the kernel layer's own harness:
``Kernel(spec, isa, target)(x, packed, za, **epilogue_operands)`` returns the output as numpy.
"""

from __future__ import annotations

import numpy as np
import tvm

from . import conv, gemm, matmul
from .gemm import PackedWeights, Tile
from . import isa as isa_mod
from .isa import Isa


def epilogue_operands(epi: gemm.Epilogue, n: int, *, mult=None, scale=None, bias=None, fbias=None, zy=0) -> list:
    """The epilogue's operands in PrimFunc order, as the arrays the kernel takes."""
    nsc = n if epi.per_channel else 1
    if epi.out == "int32":
        return []
    if epi.out == "float32":
        out = [np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (nsc,)).copy()]
        return out + ([np.asarray(fbias, np.float32).reshape(n)] if epi.bias else [])
    out = [np.broadcast_to(np.asarray(mult, np.float32).reshape(-1), (nsc,)).copy()]
    if epi.bias:
        out.append(np.asarray(bias, np.int32).reshape(n))
    return out + [np.asarray([zy], np.int32).reshape(1)]


class Kernel:
    """A compiled qie matmul or conv PrimFunc (symbolic rows / batch) for one target."""

    def __init__(self, spec, isa: Isa, target, tile: Tile | None = None):
        self.spec, self.isa = spec, isa
        mod = conv if isinstance(spec, conv.ConvSpec) else matmul
        self.tile = tile or mod.tile_for(spec, isa)
        self.func = mod.scheduled(spec, isa, self.tile)
        self.lib = tvm.tirx.build(tvm.IRModule({"main": self.func}), target=isa_mod.kernel_target(target))
        kind = tvm.target.Target(target).kind.name
        self.dev = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)

    def pack(self, w: np.ndarray, zw) -> PackedWeights | np.ndarray:
        """Weights in the kernel's layout: packed GEMM panels, or (depthwise) ``w - zw`` as int32."""
        if isinstance(self.spec, conv.ConvSpec):
            return conv.pack(self.spec, self.isa, w, zw, self.tile)
        return gemm.pack_weights(w, zw, self.isa, self.tile)

    def out_shape(self, x: np.ndarray) -> tuple:
        if isinstance(self.spec, conv.ConvSpec):
            return (x.shape[0], self.spec.out_channels, *self.spec.out_hw)
        return (x.shape[0], self.spec.n)

    def args(self, x, packed, za, **epi) -> list:
        n = self.spec.out_channels if isinstance(self.spec, conv.ConvSpec) else self.spec.n
        za = np.asarray([za], np.int32).reshape(1)
        if isinstance(packed, np.ndarray):       # depthwise
            ops = [x, packed, za]
        else:
            ops = [x, packed.packed, packed.colsum, za] + ([packed.zb] if self.spec.epi.zb else [])
        ops += epilogue_operands(self.spec.epi, n, **epi)
        out = np.zeros(self.out_shape(x), self.spec.epi.out)
        return [tvm.runtime.tensor(np.ascontiguousarray(o), self.dev) for o in ops + [out]]

    GUARD = 0x5A

    def __call__(self, x, packed, za, **epi) -> np.ndarray:
        """Run once; the output lives in a larger buffer whose tail is checked afterwards, so a kernel
        that writes past its output raises instead of corrupting the heap silently."""
        args = self.args(x, packed, za, **epi)
        shape = self.out_shape(x)
        nbytes = int(np.prod(shape)) * np.dtype(self.spec.epi.out).itemsize
        big = tvm.runtime.tensor(np.full(nbytes + 64, self.GUARD, np.uint8), self.dev)
        out = big._create_view(shape, self.spec.epi.out)
        self.lib["main"](*args[:-1], out)
        raw = big.numpy()
        if np.any(raw[nbytes:] != self.GUARD):
            raise AssertionError(f"{self.func.attrs['global_symbol']} wrote past the end of its output")
        return raw[:nbytes].view(self.spec.epi.out).reshape(shape).copy()
