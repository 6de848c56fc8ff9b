"""A numpy emulator of the straight-line PTX the NF4 decode inlines (``_quad_asm``): enough of
``and``/``shr``/``lop3``/``prmt`` and packed 16-bit ``mul``/``fma`` to check the assembly bit for
bit against the kernel's jnp interpreter branch."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from pallas_kernels.nf4_matmul_mgpu import _fma_round


def run_ptx(asm: str, inputs: list, dtype, n_out: int) -> tuple[np.ndarray, ...]:
    """Runs ``asm`` on uint32 arrays: outputs ``$0 .. $(n_out-1)``, inputs from ``$n_out`` on."""
    regs = {f"${i + n_out}": np.asarray(v, np.uint32) for i, v in enumerate(inputs)}
    shape = np.broadcast_shapes(*(np.shape(v) for v in inputs))

    def val(tok):
        return regs[tok] if tok in regs else np.uint32(int(tok, 0))

    def halves(v):  # a packed pair as float32 (exact), low half first
        bits = np.stack([v & 0xFFFF, v >> 16]).astype(np.uint16)
        return bits.view(jnp.dtype(dtype)).astype(np.float32)

    def pack(lo, hi):
        lo, hi = (np.asarray(h.astype(dtype)).view(np.uint16).astype(np.uint32) for h in (lo, hi))
        return lo | (hi << 16)

    for line in asm.splitlines():
        m = re.fullmatch(r"\s*([a-z0-9.]+) (\S+), (.*);", line)
        if not m or m[1].startswith("."):
            continue
        op, dst, args = m[1], m[2], [val(a.strip()) for a in m[3].split(",")]
        if op == "and.b32":
            out = args[0] & args[1]
        elif op == "shr.u32":
            out = args[0] >> args[1]
        elif op == "lop3.b32":
            a, b, c, lut = args
            out = np.zeros_like(a)
            for i in range(8):
                if int(lut) >> i & 1:
                    out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
        elif op == "prmt.b32":
            a, b, c = (np.broadcast_to(v, shape).astype(np.uint32) for v in args)
            table = np.stack([(w >> (8 * i)) & 0xFF for w in (a, b) for i in range(4)])
            out = np.zeros_like(a)
            for k in range(4):
                sel = (c >> (4 * k)) & 0xF
                byte = np.take_along_axis(table, (sel & 7)[None].astype(np.int64), 0)[0]
                byte = np.where(sel & 8, np.where(byte & 0x80, 0xFF, 0), byte)
                out |= byte.astype(np.uint32) << (8 * k)
        elif op.startswith("mul.rn."):
            a, b = halves(args[0]), halves(args[1])
            out = pack(a[0] * b[0], a[1] * b[1])
        elif op.startswith("fma.rn."):
            (a, b, c) = (halves(v) for v in args)
            out = pack(*(np.asarray(_fma_round(a[i] * b[i], c[i], dtype)) for i in range(2)))
        else:
            raise AssertionError(f"unemulated PTX: {line}")
        regs[dst] = np.asarray(out, np.uint32)
    return tuple(regs[f"${i}"] for i in range(n_out))
