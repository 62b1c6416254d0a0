"""PNG plots from the results dict: latency percentiles per path vs Services, and latency CDFs.

matplotlib is imported here only (the `bench` extra); `write` raises
ImportError when it is missing, and the caller reports that instead of plots.
"""

from __future__ import annotations

from pathlib import Path

from .loadgen import MODE_TEXT

COLORS = {"direct": "black", "kernel": "tab:blue", "userspace": "tab:green", "iptables-reference": "tab:red",
          "direct-on-kernel-node": "tab:gray", "netfilterqueue": "tab:orange", "userspace-busy-poll": "tab:olive",
          "userspace-blocking": "tab:purple", "userspace-event-loop": "tab:cyan",
          "kernel-maglev": "tab:brown"}


def write(results: dict, out: Path) -> list[str]:
    """Writes the PNGs into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["latency"]["records"]
    modes = results["latency"]["settings"]["modes"]
    names = []

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    for ax, mode in zip(axes.flat, modes):
        direct = next((r for r in records if r["path"] == "direct" and r["mode"] == mode), None)
        for path, color in COLORS.items():
            if path == "direct":
                continue
            rows = sorted((r for r in records if r["path"] == path and r["mode"] == mode and r["latency_us"]),
                          key=lambda r: r["services"])
            if not rows:
                continue
            xs = [r["services"] for r in rows]
            for which, style in (("p50", "-o"), ("p99", "--s")):
                ax.plot(xs, [r["latency_us"][which] for r in rows], style, color=color, label=f"{path} {which}")
        if direct and direct["latency_us"]:
            for which, style in (("p50", "-"), ("p99", "--")):
                ax.axhline(direct["latency_us"][which], linestyle=style, color=COLORS["direct"], linewidth=1,
                           label=f"direct {which}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Services programmed")
        ax.set_ylabel("latency (µs, log scale)")
        ax.set_title(MODE_TEXT[mode], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"Latency per path vs Services (p50 solid, p99 dashed) — {results['date']}")
    fig.tight_layout()
    name = "latency-vs-services.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    names.append(name)

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    for ax, mode in zip(axes.flat, modes):
        for record in records:
            if record["mode"] != mode or not record["cdf_us"]:
                continue
            sizes = sorted({r["services"] for r in records if r["path"] == record["path"] and r["services"]})
            if record["services"] is not None and record["services"] not in (sizes[0], sizes[-1]):
                continue  # smallest and largest only, to keep it readable
            xs = [x for x, _ in record["cdf_us"]]
            ys = [y for _, y in record["cdf_us"]]
            label = record["path"] if record["services"] is None else f"{record['path']} {record['services']:,}"
            style = "-" if record["services"] in (None, sizes[-1] if sizes else None) else ":"
            ax.plot(xs, ys, style, color=COLORS.get(record["path"]), label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency (µs)")
        ax.set_ylabel("fraction of requests ≤ latency")
        ax.set_title(MODE_TEXT[mode], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency CDF (largest Service count solid, smallest dotted)")
    fig.tight_layout()
    name = "latency-cdf.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names
