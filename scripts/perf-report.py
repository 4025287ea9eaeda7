#!/usr/bin/env python3
"""Writes docs/performance.md and docs/performance.png from the benchmarks'
results (bench-results/*.jsonl, as scripts/bench-all.sh leaves them).

Every figure in them is a ratio or an efficiency from one run in which
ringtrain and its peer (Gloo) alternated on the same machine; absolute times
are shown only next to the peer's from the same run.

Usage: scripts/perf-report.py [RESULTS_DIR] [DOCS_DIR]
"""
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest(rs, key):
    """The last row for each key (a rerun replaces an earlier one)."""
    out = {}
    for r in rs:
        out[key(r)] = r
    return list(out.values())


def main():
    results = sys.argv[1] if len(sys.argv) > 1 else "bench-results"
    docs = sys.argv[2] if len(sys.argv) > 2 else "docs"
    os.makedirs(docs, exist_ok=True)
    lab = latest(rows(os.path.join(results, "netlab.jsonl")),
                 lambda r: (r["impl"], r["world"], r["rate_mbit"]))
    loop = latest(rows(os.path.join(results, "loopback.jsonl")),
                  lambda r: (r["impl"], r["world"]))
    train = latest(rows(os.path.join(results, "train.jsonl")),
                   lambda r: (r.get("kind", ""), r["world"], r.get("model", "")))
    accuracy = rows(os.path.join(results, "accuracy.jsonl"))

    md = ["# Performance", "",
          "Made by `scripts/bench-all.sh` (not part of the test run); every ratio comes from",
          "one run in which ringtrain and the peer from `../shared/bench/peers/` alternated",
          "on the same machine. Raw rows: `bench-results/*.jsonl`.", ""]

    if lab:
        rates = sorted({r["rate_mbit"] for r in lab})
        md += ["## All-reduce over the emulated multi-host lab", "",
               "W ranks in W network namespaces on one bridge, each rank's link shaped by `tc`",
               "(`scripts/netlab.sh`); 100 MB of f32. bound = 2(W-1)/W x wire bytes / rate,",
               "efficiency = bound / median time. delay_ms is the delay the links really had",
               "(0 where the kernel has no netem).", "",
               "| link | W | implementation | wire bytes | median s | bound s | efficiency | vs Gloo |",
               "|---|---|---|---|---|---|---|---|"]
        for r in sorted(lab, key=lambda r: (r["rate_mbit"], r["world"], r["impl"])):
            md.append(f"| {r['rate_mbit']:.0f} Mbit/s, {r['delay_ms']} ms | {r['world']} | {r['impl']} | "
                      f"{r['wire_bytes'] / 1e6:.0f} MB | {r['median_s']:.3f} | {r['bound_s']:.3f} | "
                      f"{r['efficiency'] * 100:.1f}% | {r['speedup_vs_gloo']:.2f}x |")
        md.append("")
        fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
        for rate in rates:
            impls = sorted({r["impl"] for r in lab if r["rate_mbit"] == rate})
            for impl in impls:
                pts = sorted((r["world"], r) for r in lab if r["impl"] == impl and r["rate_mbit"] == rate)
                ws = [w for w, _ in pts]
                label = f"{impl} @ {rate:.0f} Mbit/s"
                style = "--" if impl == "gloo" else "-"
                ax_t.plot(ws, [r["median_s"] for _, r in pts], style, marker="o", label=label)
                ax_e.plot(ws, [r["efficiency"] * 100 for _, r in pts], style, marker="o", label=label)
        ax_t.set(xlabel="world size W", ylabel="all-reduce of 100 MB, median s",
                 title="Time (lower is better)")
        ax_e.set(xlabel="world size W", ylabel="% of the ring's bound",
                 title="Efficiency against 2(W-1)/W * S / B")
        ax_e.set_ylim(0, 105)
        for ax in (ax_t, ax_e):
            ax.grid(alpha=0.3)
            ax.set_xticks(sorted({r["world"] for r in lab}))
        ax_e.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(os.path.join(docs, "performance.png"), dpi=110)
        md += ["![time and efficiency against world size and link rate](performance.png)", ""]

    if loop:
        md += ["## All-reduce on loopback (one host)", "",
               "100 MB; ranks of one host move frames through shared memory (see README,",
               "\"Same-host links\"); `ringtrain-tcp-aead` is the same with that turned off",
               "(sealed frames over loopback TCP).", "",
               "| W | implementation | Gloo median s | ours median s | vs Gloo |", "|---|---|---|---|---|"]
        for r in sorted(loop, key=lambda r: (r["world"], r["impl"])):
            md.append(f"| {r['world']} | {r['impl']} | {r['gloo_median_s']:.3f} | {r['median_s']:.3f} | "
                      f"{r['speedup_vs_gloo']:.2f}x |")
        md.append("")

    if train:
        md += ["## Training", "",
               "One clock for both sides: wall time from the start of the first step after the",
               "warm-up on the earliest rank to the end of the last step on the latest (DDP:",
               "between barriers; ringtrain: each worker reports its steps' wall-clock start and",
               "end). `f32-after-backward` reduces the whole gradient after backward; `f32`",
               "reduces buckets while backward runs (gradient hooks, as DDP does) and on into",
               "the next step's forward pass, which waits layer by layer for the pieces it",
               "needs (README, \"Overlap\"); `bf16` and `powersgd-4` compress the gradient on",
               "the wire (`ring.compression`). The compute",
               "ceiling is twice one rank alone with one thread (`ddp_train.py --world 1",
               "--threads 1`), measured in the same run. A row may come from a later run",
               "than the others (then on another machine: compare ratios, not samples/s); a",
               "row's `run` says which when it is not the whole-suite run.", "",
               "| what | W | model | DDP | ringtrain | ringtrain / DDP | ringtrain / ceiling |",
               "|---|---|---|---|---|---|---|"]
        for r in train:
            ceiling = f"{r['ours'] / r['ceiling']:.0%}" if r.get("ceiling") else ""
            what = r.get("kind", "") + (f" ({r['run']})" if r.get("run") else "")
            md.append(f"| {what} | {r['world']} | {r.get('model', '')} | {r['ddp']:.1f} | "
                      f"{r['ours']:.1f} | {r['ratio']:.2f}x | {ceiling} |")
        md.append("")

    if accuracy:
        by = {}
        for r in accuracy:
            by.setdefault(r["setting"], []).append(r)
        ddp = statistics.mean(r["test_accuracy"] for r in by.get("ddp", [])) if "ddp" in by else None
        seeds = sorted({r["seed"] for r in accuracy})
        md += ["## Accuracy of each gradient compressor", "",
               "CNN, 2 epochs, W=4, batch 64 per rank, lr 0.05, momentum 0.9; test accuracy per",
               f"seed ({', '.join(map(str, seeds))}) and the mean (`scripts/bench-accuracy.sh`).", "",
               "| setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs DDP |",
               "|---|" + "---|" * (len(seeds) + 2)]
        for setting, rs in by.items():
            per = {r["seed"]: r["test_accuracy"] for r in rs}
            mean = statistics.mean(per.values())
            vs = f"{(mean - ddp) * 100:+.2f} pp" if ddp is not None else ""
            md.append(f"| {setting} | " + " | ".join(f"{per[s]:.4f}" if s in per else "" for s in seeds)
                      + f" | {mean:.4f} | {vs} |")
        md.append("")

    md += ["## Rerun", "", "```sh", "scripts/bench-all.sh      # root (network namespaces); ~35 minutes on 2 cores",
           "```", ""]
    with open(os.path.join(docs, "performance.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {docs}/performance.md" + (f" and {docs}/performance.png" if lab else ""))


if __name__ == "__main__":
    main()
