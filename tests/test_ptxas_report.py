"""scripts/ptxas_report.py's reading of ptxas's ``-v`` log, on logs the H200 printed.

(The compile itself needs jax's CUDA plugin, which CI does not install; the report it prints
was checked against these same GPU logs, BENCHMARKS.md §3.)
"""

from __future__ import annotations

import os

from script_modules import SCRIPTS, load_script

RESULTS = os.path.join(SCRIPTS, "results", "h200-2026-11-30-s4")


def _log(name: str) -> list[str]:
    with open(os.path.join(RESULTS, name)) as f:
        return f.read().splitlines()


def test_reads_registers_spills_per_kernel():
    """call5_new.log: the kernels at 1x8192 at the default 240/24, ..., and last the variant
    at 232/40."""
    ptxas_report = load_script("ptxas_report")
    kernels = ptxas_report.parse_report(_log("call5_new.log"))
    fwd, dkdv, dq = kernels[:3]
    assert fwd.name == "lorax_mgpu_attention_fwd_mosaic_gpu_kernel"
    assert (fwd.registers, fwd.stack, fwd.spill_stores, fwd.spill_loads) == (168, 0, 0, 0)
    assert dkdv.name == "lorax_mgpu_attention_dkdv_mosaic_gpu_kernel"
    assert (dkdv.registers, dkdv.stack, dkdv.spill_stores, dkdv.spill_loads) == (168, 112, 176, 352)
    assert dq.name.endswith("_dq_mosaic_gpu_kernel") and dq.spill_loads == 0
    at_232 = [k for k in kernels if k.name == dkdv.name][-1]
    assert (at_232.stack, at_232.spill_stores, at_232.spill_loads) == (144, 252, 452)
    assert all(k.wgmma_fences == k.wgmma_serialized == 0 for k in kernels)


def test_counts_the_wgmma_warnings_of_the_kernel_they_name():
    ptxas_report = load_script("ptxas_report")
    kernels = ptxas_report.parse_report(_log("call1_fused.log"))
    fused = [k for k in kernels if k.name == "lorax_mgpu_attention_dkdv_mosaic_gpu_kernel"]
    assert [(k.spill_stores, k.spill_loads, k.wgmma_fences) for k in fused][0] == (524, 1836, 8)
    assert all(k.wgmma_fences == 0 for k in kernels if "dkdv" not in k.name)
    serialized = [
        "ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to non wgmma instructions defining input registers of a wgmma between "
        "start and end of the pipeline stage in the function 'k_mosaic_gpu_kernel'",
        "ptxas info    : Function properties for k_mosaic_gpu_kernel",
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem",
    ]  # the line as ptxas 13.0 printed it for an experimental forward (this file's commit)
    (k,) = ptxas_report.parse_report(serialized)
    assert (k.name, k.wgmma_fences, k.wgmma_serialized) == ("k_mosaic_gpu_kernel", 0, 1)


# The shape of nvdisasm's output for one pipelined loop: a barrier wait whose retry sits out of
# line (jumping back unconditionally), a spill reload in the loop, the loop's predicated branch.
_SASS = """\
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR7], R3 ;
        /*0020*/              @!P1 BRA `(.L_x_9) ;
.L_x_2:
        /*0030*/                   LDL R2, [R1+0x10] ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0058*/                   MUFU.EX2 R3, R3 ;
        /*005c*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   STL [R1+0x14], R2 ;
        /*0068*/                   MUFU.EX2 R4, R4 ;
        /*0070*/               @P0 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
.L_x_9:
        /*0090*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR7], R3 ;
        /*00a0*/              @!P1 BRA `(.L_x_9) ;
        /*00b0*/                   BRA `(.L_x_2) ;
"""


def test_finds_the_wgmma_loop_and_its_spills_not_the_wait_retries():
    ptxas_report = load_script("ptxas_report")
    (loop,) = ptxas_report.wgmma_loops(_SASS)
    assert (loop.first_line, loop.instructions, loop.wgmmas) == (1, 10, 2)
    assert (loop.local_loads, loop.local_stores) == (1, 1)
    assert loop.exp2_under_wgmma == 1  # the one before the wait, not the one after
