"""python -m bench [--quick] [--sizes 1,1000,10000] [--cp-sizes 1000,10000] [--only latency|control-plane]

Measures, in network namespaces it builds and removes (needs root):
1. latency through every path (`latency.py`): new connections (the headline),
   UDP first packets, round trips on established flows;
2. control-plane cost (`control_plane.py`), with kube-proxy's iptables layout
   for the same cluster as the yardstick.
Writes results.json (raw figures, machine, command), results.md and PNG plots
into --out (default bench/out/). Progress goes to stderr as it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import control_plane, latency, plots, report

PRESETS = {
    # A smoke test of the whole harness: a few minutes on 2 cores.
    "quick": {"sizes": "1,1000", "cp_sizes": "1000", "rounds": 3, "changes": 20,
              "count": {"tcp-crr": 300, "udp-crr": 300, "tcp-rr": 2000, "udp-rr": 2000}, "seconds": 2.0},
    # What the README quotes.
    "full": {"sizes": "1,1000,10000,30000", "cp_sizes": "1000,10000,30000", "rounds": 30, "changes": 100,
             "count": {"tcp-crr": 500, "udp-crr": 500, "tcp-rr": 3000, "udp-rr": 3000}, "seconds": 3.0},
}


class Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self):
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


def _first_line(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "nft": _first_line("nft", "--version"),
            "iptables": _first_line("iptables-nft", "--version"),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_start": loadavg()}


def code_version() -> dict:
    """The commit measured, and whether dataplane/ had uncommitted changes then."""
    root = Path(__file__).resolve().parent.parent
    commit = _first_line("git", "-C", str(root), "rev-parse", "--short", "HEAD")
    try:
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "dataplane"], capture_output=True,
                               text=True, timeout=10).stdout.splitlines()
    except OSError:
        dirty = []
    return {"commit": commit, "uncommitted_dataplane_files": len(dirty)}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # so that every `finally` removes its namespaces


def noise_note(records: list[dict]) -> str:
    """How much the floor itself moved between rounds: the reader's gauge of the noise."""
    for record in records:
        if record["path"] == "direct" and record["mode"] == report.HEADLINE_MODE and record["rounds_p50_us"]:
            spread = record["rounds_p50_us"]
            swing = spread["max"] / spread["min"] if spread["min"] else 0
            verdict = ("noisy: compare ratios within the run, not absolute figures across runs" if swing > 1.10
                       else "fairly steady")
            return (f"Noise gauge: `direct`'s per-round median new-connection latency ranged "
                    f"{spread['min']:.1f}–{spread['max']:.1f} µs ({swing:.2f}×), {verdict}.")
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds: a smoke test of the harness")
    parser.add_argument("--sizes", help="Service counts for the latency paths, comma-separated")
    parser.add_argument("--cp-sizes", help="Service counts for the control plane, comma-separated")
    parser.add_argument("--paths", default=",".join(latency.DEFAULT_PATHS),
                        help=f"latency paths, comma-separated, of {', '.join(latency.PATHS)}")
    parser.add_argument("--rounds", type=int, help="interleaved latency rounds")
    parser.add_argument("--changes", type=int, help="endpoint changes to time per control-plane size")
    parser.add_argument("--only", choices=("latency", "control-plane", "userspace"),
                        help="run one part only; userspace: python -m bench.userspace (forwarder capacity too)")
    parser.add_argument("--split-cpus", action="store_true",
                        help="pin client and server to different CPUs (default: the same one; see bench/README.md)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    parser.add_argument("--report-only", metavar="RESULTS_JSON",
                        help="measure nothing: redraw results.md and the plots from a results.json into --out")
    args = parser.parse_args()
    if args.only == "userspace":
        from . import userspace

        return userspace.main(["--out", args.out, *(["--quick"] if args.quick else [])])
    if args.report_only:
        return write_reports(json.loads(Path(args.report_only).read_text()), Path(args.out))
    if os.geteuid() != 0:
        print("python -m bench: needs root (it builds network namespaces)", file=sys.stderr)
        return 3
    preset = PRESETS["quick" if args.quick else "full"]
    sizes = _sizes(args.sizes or preset["sizes"])
    cp_sizes = _sizes(args.cp_sizes or preset["cp_sizes"])
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(latency.PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {', '.join(latency.PATHS)}")
    last = (os.cpu_count() or 1) - 1
    client_cpu, server_cpu = (0, last) if args.split_cpus else (last, last)
    settings = latency.Settings(
        sizes=tuple(sizes), paths=paths, rounds=args.rounds or preset["rounds"], count=preset["count"],
        seconds=preset["seconds"], client_cpu=client_cpu, server_cpu=server_cpu)
    signal.signal(signal.SIGTERM, _interrupt)
    progress = Progress()
    started = time.monotonic()
    results: dict = {"command": " ".join(["python -m bench", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
                     "machine": machine(), "code": code_version()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.only != "control-plane":
            results["latency"] = run_latency(settings, progress)
        if args.only is None and not args.quick:  # issue 11's capacity figure: new flows/s decided, none failed open
            from . import userspace

            progress("userspace capacity: floods of new flows, userspace then kernel mode")
            results["userspace_capacity"] = userspace.measure_capacity(
                [50000, 100000, 150000, 200000, 250000], 3.0, progress)
        if args.only != "latency":
            results["control_plane"] = run_control_plane(cp_sizes, args.changes or preset["changes"], progress)
    except KeyboardInterrupt:
        progress("interrupted: namespaces removed, nothing written")
        return 130
    results["machine"]["loadavg_end"] = loadavg()
    results["elapsed_s"] = time.monotonic() - started
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")  # first: the figures are safe
    write_reports(results, out)
    progress(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(results.get('plots', []))} plots")
    return 0


def write_reports(results: dict, out: Path) -> int:
    """Plots (when matplotlib is there), then results.json again (with the plot names) and results.md."""
    out.mkdir(parents=True, exist_ok=True)
    results.pop("plots", None)
    results.pop("plots_missing", None)
    if "latency" in results:
        try:
            results["plots"] = plots.write(results, out)
        except ImportError as error:
            results["plots_missing"] = f"not drawn: {error} (scripts/setup.sh installs the `bench` extra)"
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    print(report.markdown(results))
    return 0


def run_latency(settings: latency.Settings, progress: Progress) -> dict:
    progress(f"latency: paths {', '.join(settings.paths)} at {', '.join(map(str, settings.sizes))} Services; "
             f"{settings.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="dataplane-bench-") as tmp, \
            latency.LatencyBench(settings, Path(tmp), progress) as bench:
        bench.build()
        progress(f"latency: {len(bench.targets)} labs ready; measuring")
        raw = bench.run()
        records = latency.summarize(bench.targets, raw, settings, bench.cpu)
        return {"settings": {**settings.__dict__, "sizes": list(settings.sizes), "paths": list(settings.paths),
                             "modes": list(settings.modes)},
                "records": records, "setup": latency.setup_records(bench.targets),
                "unavailable": bench.unavailable, "noise": noise_note(records)}


def run_control_plane(sizes: list[int], changes: int, progress: Progress) -> list[dict]:
    progress(f"control plane: {sizes} Services x 10 endpoints, {changes} changes each")
    figures = []
    for size in sizes:
        before = loadavg()
        summary = control_plane.measure(size, changes=changes, progress=progress).summary()
        summary["loadavg"] = f"{before} before, {loadavg()} after"
        summary["iptables_restore_s"] = control_plane.iptables_restore_seconds(size)
        progress(f"  {size} services: iptables-nft-restore of the same cluster {summary['iptables_restore_s']:.2f} s")
        figures.append(summary)
    return figures


if __name__ == "__main__":
    sys.exit(main())
