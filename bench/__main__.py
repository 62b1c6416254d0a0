"""python -m bench [--quick] [--sizes 1000,10000]: run the benchmarks, write results.

Results go to bench/out/ (JSON and Markdown); figures are reported with the
command that produced them. Needs root: it builds network namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from . import control_plane


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the harness")
    parser.add_argument("--sizes", default=None, help="Service counts, comma-separated")
    parser.add_argument("--changes", type=int, default=None, help="endpoint changes to time per size")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("python -m bench: needs root (it builds network namespaces)", file=sys.stderr)
        return 3
    sizes = [int(s) for s in (args.sizes or ("1000" if args.quick else "1000,10000,30000")).split(",")]
    changes = args.changes or (20 if args.quick else 100)
    results = {"command": " ".join(["python -m bench", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
               "control_plane": []}
    print(f"control plane: {sizes} Services x 10 endpoints, {changes} changes each")
    for size in sizes:
        results["control_plane"].append(control_plane.measure(size, changes=changes).summary())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}` ({results['date']}, {results['machine']['cpus']} CPUs, "
             f"kernel {results['machine']['kernel']})", "",
             "| Services | cold start (s) | full sync (s) | change live, median (ms) | p90 (ms) | "
             "partial sync, median (ms) | peak RSS (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["control_plane"]:
        lines.append(f"| {r['services']} | {r['cold_start_s']:.2f} | {r['full_sync_s']:.2f} | "
                     f"{r['change_latency_ms_median']} | {r['change_latency_ms_p90']} | "
                     f"{r['change_sync_ms_median']} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
