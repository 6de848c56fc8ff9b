"""Merges bench_train.py and bench_torch.py outputs into scripts/results/bench_train.json.

"lorax" is the fastest lorax configuration whose peak device memory is within 24 GiB;
"lorax_lowmem" the one with the least peak memory (ties: the faster). Rows from the PyTorch
side are copied as they are.

    python scripts/publish_results.py --lorax train.json [more.json ...] --torch torch.json \
        --commit SHA

Several --torch files may be given, newest first: a (system, shape) row is taken from the first
file that has it, and every copied row records its file under "source" (so a baseline carried
over from an earlier session says so).
"""

from __future__ import annotations

import argparse
import json
import os

MEMORY_CAP_GIB = 24.0
WORKLOAD = "NF4 double-quant base, LoRA r16 a16 on all 7 projections (f32), AdamW"


def lorax_rows(paths: list[str]) -> tuple[list[dict], dict]:
    """The published lorax rows from every bench_train.py JSON in ``paths`` (rows pooled)."""
    data: dict = {}
    pooled: list[dict] = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        pooled += data["rows"]
    ok = [r for r in pooled if "error" not in r]
    out = []
    for shape in sorted({r["shape"] for r in ok}):
        runs = [r for r in ok if r["shape"] == shape]
        within = [r for r in runs if r["peak_mem_gib"] <= MEMORY_CAP_GIB]
        fastest = max(within, key=lambda r: r["tokens_per_s"])
        leanest = min(runs, key=lambda r: (round(r["peak_mem_gib"], 2), -r["tokens_per_s"]))
        for system, r in (("lorax", fastest), ("lorax_lowmem", leanest)):
            out.append(
                {
                    "system": system,
                    "shape": shape,
                    "tokens_per_s": round(r["tokens_per_s"], 1),
                    "peak_mem_gib": round(r["peak_mem_gib"], 2),
                    "config": f"{WORKLOAD}; remat={r['remat']}, attention={r['attention']}"
                    + "".join(f", {k}={v}" for k, v in r.get("forward", {}).items())
                    + f", loss_chunk={r.get('loss_chunk', 'auto')}"
                    + (", embeddings_on_host" if r.get("embeddings_on_host") else ""),
                    "notes": f"median of {r['steps_timed']} steps "
                    f"({r['median_step_s'] * 1e3:.0f} ms); "
                    f"MFU {r['mfu']:.3f} counting lorax.train.flops; start to first step "
                    f"{r['start_to_first_step_s']:.1f} s; first loss {r['first_loss']:.4f}",
                }
            )
    return out, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lorax", required=True, nargs="+", help="bench_train.py JSONs (pooled)")
    p.add_argument("--torch", nargs="*", default=[], help="bench_torch.py JSONs, newest first")
    p.add_argument("--commit", required=True)
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_train.json")
    )
    a = p.parse_args()
    rows, data = lorax_rows(a.lorax)
    seen = set()
    for path in a.torch:
        with open(path) as f:
            for r in json.load(f)["rows"]:
                if (r["system"], r["shape"]) not in seen:
                    seen.add((r["system"], r["shape"]))
                    rows.append(dict(r, source=os.path.relpath(path)))
    result = {
        "device": data["device"],
        "date": data["date"],
        "commit": a.commit,
        "jax": data.get("jax"),
        "rows": rows,
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for r in rows:
        print(
            f"{r['system']:<13} {r['shape']:>7} {r['tokens_per_s']:>9.0f} tok/s "
            f"{r['peak_mem_gib']:6.2f} GiB  {r['config']}"
        )


if __name__ == "__main__":
    main()
