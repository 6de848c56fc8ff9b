"""The few Nsight Compute metrics that place a kernel's time, one column per profiled kernel.

``ncu --set full`` records ~2000 metrics per launch; what decided the attention kernels
(BENCHMARKS.md §3, "a profile against cuDNN") was whether the tensor pipe was busy, and what
kept it idle. This prints those rows from the CSV of ``ncu -i REPORT --page raw --csv``, for
any number of such files (e.g. ours and cuDNN's, profiled in separate processes):

    python scripts/ncu_summary.py run95/ncu_raw.csv run96/ncu_cudnn_raw.csv [--match fused|sdpa]

``--source FILE`` reads ``ncu -i REPORT --page source --csv --print-source sass`` instead (one
kernel, with ``--section SourceCounters``): its warp-stall samples by warpgroup (the SASS
between two ``setmaxnreg``, USETMAXREG, is one warpgroup's), by stall reason and by opcode,
and the warp-instructions each warpgroup executed by opcode.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

# (row label, metric): elapsed time and clock, then where the cycles went.
METRICS = (
    ("ms", "gpu__time_duration.sum"),
    ("SM cycles (elapsed)", "sm__cycles_elapsed.avg"),
    ("tensor pipe active %", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed"),
    ("shared wavefronts %",
     "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed"),
    ("issue slots busy %", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("instructions", "smsp__inst_executed.sum"),
    ("local-load requests", "l1tex__t_requests_pipe_lsu_mem_local_op_ld.sum"),
    ("local-store requests", "l1tex__t_requests_pipe_lsu_mem_local_op_st.sum"),
    *(
        (f"stall {reason} / issue",
         f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio")
        for reason in ("long_scoreboard", "barrier", "wait", "short_scoreboard", "gmma")
    ),
)  # fmt: skip


def _kernels(path: str, match: str | None) -> list[tuple[str, dict[str, str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, launches = rows[0], rows[2:]  # row 1 holds the units
    found = []
    for values in launches:
        record = dict(zip(header, values, strict=False))
        name = record.get("Kernel Name", "?")
        if match is None or re.search(match, name):
            found.append((name, record))
    return found


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _opcode(sass: str) -> str:
    words = sass.split()
    if words and words[0].startswith("@"):  # predicated
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def _top(counts: collections.Counter, total: float, n: int) -> str:
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counts.most_common(n) if total)


def source_summary(path: str) -> None:
    """Stall samples and executed instructions of one kernel, warpgroup by warpgroup."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next(r for r in rows if "Source" in r)
    lines = rows[rows.index(header) + 1 :]
    col = {name: i for i, name in enumerate(header)}
    samples, executed = col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"]
    stalls = [(h[len("stall_") :], i) for h, i in col.items()
              if h.startswith("stall_") and "Not Issued" not in h]  # fmt: skip
    starts = [0] + [i for i, r in enumerate(lines) if "USETMAXREG" in r[col["Source"]]]
    total = sum(_number(r[samples]) or 0.0 for r in lines)
    for n, (a, b) in enumerate(zip(starts, starts[1:] + [len(lines)], strict=True)):
        part = lines[a:b]
        share = sum(_number(r[samples]) or 0.0 for r in part)
        reasons, ops, mix = collections.Counter(), collections.Counter(), collections.Counter()
        for r in part:
            sass = r[col["Source"]].strip()
            ops[_opcode(sass)] += _number(r[samples]) or 0.0
            mix[_opcode(sass)] += _number(r[executed]) or 0.0
            for name, i in stalls:
                reasons[name] += _number(r[i]) or 0.0
        label = "prologue" if n == 0 else f"warpgroup code {n - 1}"
        print(f"== {label} (SASS rows {a}-{b}): {100 * share / total:.1f}% of the samples")
        print(f"   stalled on: {_top(reasons, share, 6)}")
        print(f"   samples at: {_top(ops, share, 8)}")
        print(f"   executed ({sum(mix.values()):.3g} warp-instructions): "
              f"{_top(mix, sum(mix.values()), 10)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="*", help="ncu --page raw --csv output files")
    parser.add_argument("--match", help="regex on the kernel name (default: every launch)")
    parser.add_argument("--source", help="an ncu --page source --csv file (see above)")
    args = parser.parse_args()
    if args.source:
        source_summary(args.source)
        if not args.csv:
            return
    kernels = [k for path in args.csv for k in _kernels(path, args.match)]
    if not kernels:
        raise SystemExit(f"no kernel in {args.csv} matches {args.match!r}")
    for i, (name, _) in enumerate(kernels):
        print(f"[{i}] {name[:120]}")
    print(f"{'':<28}" + "".join(f"{f'[{i}]':>14}" for i in range(len(kernels))))
    for label, metric in METRICS:
        cells = []
        for _, record in kernels:
            value = _number(record.get(metric, ""))
            cells.append("-" if value is None else f"{value:,.4g}")
        print(f"{label:<28}" + "".join(f"{c:>14}" for c in cells))
    print(f"{'tensor-active cycles':<28}" + "".join(
        f"{_tensor_cycles(record):>14}" for _, record in kernels))  # fmt: skip


def _tensor_cycles(record: dict[str, str]) -> str:
    """Busy tensor-pipe cycles: the same work shows the same count on any schedule."""
    active = _number(record.get(METRICS[2][1], ""))
    cycles = _number(record.get(METRICS[1][1], ""))
    return "-" if active is None or cycles is None else f"{active / 100 * cycles:,.4g}"


if __name__ == "__main__":
    main()
