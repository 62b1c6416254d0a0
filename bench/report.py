"""results (the dict written as results.json) -> results.md. Pure: no I/O.

Every latency is in microseconds; every ratio is to a reference measured in
the same run (direct for latency, kernel mode for userspace, the
iptables-reference load for syncs), with the spread of per-round ratios in
brackets. Goals come from issues 2 and 6; a goal that is missed says so.
"""

from __future__ import annotations

from .loadgen import MODE_TEXT

HEADLINE_MODE = "tcp-crr"


def _find(results: dict, path: str, services: int | None, mode: str) -> dict | None:
    for record in results.get("latency", {}).get("records", []):
        if record["path"] == path and record["services"] == services and record["mode"] == mode:
            return record
    return None


def _ratio(ratio: dict | None, which: str = "p50") -> str:
    if not ratio or ratio.get(which) is None:
        return "–"
    text = f"{ratio[which]:.3f}×"
    rounds = ratio.get(f"rounds_{which}")
    if rounds:
        text += f" [{rounds['min']:.2f}–{rounds['max']:.2f}]"
    return text


def _us(record: dict | None, which: str) -> str:
    if not record or not record["latency_us"]:
        return "–"
    return f"{record['latency_us'][which]:.1f}"


def _largest(results: dict, path: str) -> int | None:
    sizes = [r["services"] for r in results.get("latency", {}).get("records", []) if r["path"] == path]
    return max(sizes) if sizes else None


def _verdict(value: float | None, goal: float, rounds: dict | None = None) -> str:
    if value is None:
        return "not measured"
    verdict = "met" if value <= goal else "**missed**"
    if rounds and rounds.get("min", goal) <= goal < rounds.get("max", goal):
        verdict += " (per-round ratios straddle the goal)"
    return verdict


def goals(results: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows for the goals of issues 2 and 6."""
    rows = []
    at = 10000
    kernel = _find(results, "kernel", at, HEADLINE_MODE)
    if kernel is None:
        at = _largest(results, "kernel")
        kernel = _find(results, "kernel", at, HEADLINE_MODE) if at else None
    label = f"{at:,}" if at else "10,000"
    k = kernel.get("vs_direct") if kernel else None
    rows.append((f"kernel, new TCP connection, median ≤ 1.05× direct at {label} Services", _ratio(k, "p50"),
                 _verdict(k["p50"] if k else None, 1.05, k and k.get("rounds_p50"))))
    rows.append((f"kernel, new TCP connection, p99 ≤ 1.10× direct at {label} Services", _ratio(k, "p99"),
                 _verdict(k["p99"] if k else None, 1.10, k and k.get("rounds_p99"))))
    same_node = kernel.get("vs_pod_ip_same_node") if kernel else None
    if same_node:
        rows.append((f"(context) kernel ÷ the Pod IP through the same node at {label} Services: the Service "
                     "translation alone, conntrack and hooks on both", _ratio(same_node, "p50") + " median, "
                     + _ratio(same_node, "p99") + " p99", "for context"))
    smallest = _find(results, "kernel", 1, HEADLINE_MODE)
    top = _largest(results, "kernel")
    biggest = _find(results, "kernel", top, HEADLINE_MODE) if top else None
    if smallest and biggest and top != 1:
        growth = biggest["latency_us"]["p50"] / smallest["latency_us"]["p50"]
        rows.append((f"kernel, new TCP connection flat from 1 to {top:,} Services (median within 5%)",
                     f"{growth:.3f}× ({_us(smallest, 'p50')} → {_us(biggest, 'p50')} µs)", _verdict(growth, 1.05)))
    ipt = _find(results, "iptables-reference", at, HEADLINE_MODE)
    ipt1 = _find(results, "iptables-reference", 1, HEADLINE_MODE)
    if ipt:
        i = ipt.get("vs_direct")
        growth = (f"; {ipt['latency_us']['p50'] / ipt1['latency_us']['p50']:.2f}× its own 1-Service median"
                  if ipt1 and at != 1 else "")
        worse = kernel and ipt["latency_us"]["p50"] > kernel["latency_us"]["p50"]
        rows.append((f"iptables-reference at {label} Services: worse than kernel, growing with Services",
                     f"median {_ratio(i, 'p50')} direct, p99 {_ratio(i, 'p99')}{growth}",
                     "as expected" if worse else "**not worse than kernel mode here**"))
    unavailable = results.get("latency", {}).get("unavailable", {})
    user = _find(results, "userspace", at, HEADLINE_MODE)
    if user and user.get("vs_kernel"):
        u = user["vs_kernel"]
        rows.append((f"userspace, new TCP connection, median ≤ 1.25× kernel at {label} Services", _ratio(u, "p50"),
                     _verdict(u["p50"], 1.25, u.get("rounds_p50"))))
        established = _find(results, "userspace", at, "tcp-rr")
        e = established.get("vs_kernel") if established else None
        rows.append(("userspace, established TCP round trip 1.0× kernel (within 5%)", _ratio(e, "p50"),
                     _verdict(e["p50"] if e else None, 1.05, e and e.get("rounds_p50"))))
    else:
        why = unavailable.get("userspace", "not measured")
        rows.append(("userspace, new TCP connection, median ≤ 1.25× kernel", why, "not available"))
    for record in results.get("control_plane", []):
        if record["services"] == 10000:
            rows.append(("one change live with 10,000 Services < 50 ms (median)",
                         f"{record['change_latency_ms_median']} ms", _verdict(record["change_latency_ms_median"], 50)))
            rows.append(("full sync of 10,000 Services < 2 s", f"{record['full_sync_s']:.2f} s "
                         f"(cold start {record['cold_start_s']:.2f} s)", _verdict(record["full_sync_s"], 2.0)))
            rows.append(("daemon RSS with 10,000 Services < 200 MB", f"{record['peak_rss_mb']:.0f} MB",
                         _verdict(record["peak_rss_mb"], 200)))
        if record["services"] == 30000:
            rows.append(("full sync of 30,000 Services < 6 s", f"{record['full_sync_s']:.2f} s",
                         _verdict(record["full_sync_s"], 6.0)))
    return rows


def userspace_goals(results: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows for issue 11: userspace mode at the floor."""
    rows = []
    at = 10000 if _find(results, "userspace", 10000, "tcp-crr") else _largest(results, "userspace")
    if at is None:
        return rows
    label = f"{at:,}"
    user = {mode: _find(results, "userspace", at, mode) for mode in ("tcp-crr", "udp-crr", "tcp-rr", "udp-rr")}
    ratio = {mode: (r or {}).get("vs_kernel") for mode, r in user.items()}
    t, u = ratio["tcp-crr"], ratio["udp-crr"]
    rows.append((f"userspace ÷ kernel, TCP new connection at {label} Services: median ≤ 1.3×", _ratio(t, "p50"),
                 _verdict(t and t["p50"], 1.3, t and t.get("rounds_p50"))))
    rows.append((f"userspace ÷ kernel, TCP new connection at {label} Services: p99 ≤ 1.6×", _ratio(t, "p99"),
                 _verdict(t and t["p99"], 1.6, t and t.get("rounds_p99"))))
    rows.append(("userspace ÷ kernel, UDP first datagram: median ≤ 1.5×", _ratio(u, "p50"),
                 _verdict(u and u["p50"], 1.5, u and u.get("rounds_p50"))))
    for mode in ("tcp-rr", "udp-rr"):
        e = ratio[mode]
        rows.append((f"userspace ÷ kernel, established ({mode}): 1.0× (within 5%)", _ratio(e, "p50"),
                     _verdict(e and e["p50"], 1.05, e and e.get("rounds_p50"))))
    cap = results.get("userspace_capacity")
    if cap:
        bound = (f"; kernel mode held {cap['kernel_max_rate_held']:,}/s of the same floods, which reached at most "
                 f"{cap['max_rate_sent']:,}/s on these CPUs")
        rows.append(("new flows/s decided, none failed open, 2 CPUs: ≥ 200,000", f"{cap['max_rate_held']:,}/s{bound}",
                     _verdict(200000 / max(cap["max_rate_held"], 1), 1.0)
                     + (" (bounded by the flood: kernel mode holds no more)"
                        if cap["max_rate_held"] >= cap["kernel_max_rate_held"] else "")))
    cpu = [(mode, r.get("forwarder_cpu_us_per_flow")) for mode, r in user.items() if r and
           r.get("forwarder_cpu_us_per_flow") is not None]
    if cpu:
        rows.append(("forwarder CPU per decided flow: ≤ 10 µs", ", ".join(f"{m} {v} µs" for m, v in cpu),
                     _verdict(max(v for _, v in cpu), 10)))
    nfq = {mode: _find(results, "netfilterqueue", at, mode) for mode in ("tcp-crr", "udp-crr")}
    if all(nfq.values()):
        # vs_userspace: netfilterqueue ÷ userspace per round; above 1 is ours faster.
        versus = {m: r.get("vs_userspace") for m, r in nfq.items()}
        text = ", ".join(f"{m}: netfilterqueue {_ratio(r.get('vs_kernel'), 'p50')} kernel, "
                         f"{_ratio(versus[m], 'p50')} ours" for m, r in nfq.items())
        beaten = all(v and v["p50"] and v["p50"] > 1.0 for v in versus.values())
        rows.append(("the netfilterqueue binding, same lab: measured, and beaten", text,
                     "met" if beaten else "**missed**"))
    else:
        rows.append(("the netfilterqueue binding, same lab: measured, and beaten",
                     results.get("latency", {}).get("unavailable", {}).get("netfilterqueue", "not measured"),
                     "not measured"))
    return rows


def headline(results: dict) -> list[str]:
    """The new-connection table the README quotes."""
    latency = results.get("latency", {})
    records = [r for r in latency.get("records", []) if r["mode"] == HEADLINE_MODE]
    if not records:
        return ["(latency not measured)"]
    lines = [f"{MODE_TEXT[HEADLINE_MODE]}, client → Service; µs; ratio to `direct` measured in the same run "
             "[lowest–highest per-round ratio]:", "",
             "| path | Services | p50 | p50 ÷ direct | p99 | p99 ÷ direct | p99.9 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        services = "–" if r["services"] is None else f"{r['services']:,}"
        lines.append(f"| {r['path']} | {services} | {_us(r, 'p50')} | {_ratio(r.get('vs_direct'), 'p50')} | "
                     f"{_us(r, 'p99')} | {_ratio(r.get('vs_direct'), 'p99')} | {_us(r, 'p99.9')} |")
    for path, why in latency.get("unavailable", {}).items():
        lines.append(f"| {path} | – | {why} | | | | |")
    return lines


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = ["# dataplane benchmark", "",
             f"Command: `{results['command']}` ({results['date']}; {results.get('elapsed_s', 0):.0f} s; "
             f"commit {results.get('code', {}).get('commit', '?')}"
             + (f", {results['code']['uncommitted_dataplane_files']} files of dataplane/ uncommitted"
                if results.get("code", {}).get("uncommitted_dataplane_files") else "") + ")", "",
             f"Machine: {machine.get('cpu_model', '?')}, {machine['cpus']} CPUs, kernel {machine['kernel']}, "
             f"{machine.get('nft', '')}, {machine.get('iptables', '')}, Python {machine['python']}; "
             f"load average {machine.get('loadavg_start', '?')} at start, {machine.get('loadavg_end', '?')} at end "
             "(the machine is shared: other work runs beside the benchmark).", ""]
    latency = results.get("latency")
    if latency:
        s = latency["settings"]
        lines += ["## New connections (headline)", "", *headline(results), "",
                  f"{s['rounds']} rounds; per round and path {s['count']['tcp-crr']} new connections, "
                  f"{s['count']['udp-crr']} UDP first packets, {s['count']['tcp-rr']} round trips per established "
                  f"flow (each run capped at {s['seconds']} s); targets in rotated order each round; client pinned "
                  f"to CPU {s['client_cpu']}, the Pod's server to CPU {s['server_cpu']}. Ratios are the median over rounds of "
                  "(path ÷ direct in the same round). "
                  f"{latency.get('noise', '')}", ""]
    rows = goals(results)
    if rows:
        lines += ["## Goals (issues 2 and 6)", "", "| goal | measured | verdict |", "|---|---|---|"]
        lines += [f"| {g} | {m} | {v} |" for g, m, v in rows]
        lines.append("")
    rows = userspace_goals(results)
    if rows:
        lines += ["## Goals (issue 11: userspace mode at the floor)", "", "| goal | measured | verdict |",
                  "|---|---|---|"]
        lines += [f"| {g} | {m} | {v} |" for g, m, v in rows]
        lines.append("")
    if latency:
        lines += ["## Every path and mode", "",
                  "µs over all rounds; ratios to `direct` in the same run [lowest–highest per-round ratio]; "
                  "`rounds p50` is the lowest–highest per-round median.", ""]
        for mode in latency["settings"]["modes"]:
            lines += [f"### {mode}: {MODE_TEXT[mode]}", "",
                      "| path | Services | requests | failed | p50 | p90 | p99 | p99.9 | rounds p50 | p50 ÷ direct | "
                      "p99 ÷ direct | p50 ÷ kernel |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in latency["records"]:
                if r["mode"] != mode:
                    continue
                services = "–" if r["services"] is None else f"{r['services']:,}"
                spread = r["rounds_p50_us"]
                rounds = f"{spread['min']:.1f}–{spread['max']:.1f}" if spread else "–"
                count = r["latency_us"].get("count", 0) if r["latency_us"] else 0
                lines.append(f"| {r['path']} | {services} | {count} | {r['failed']} | {_us(r, 'p50')} | "
                             f"{_us(r, 'p90')} | {_us(r, 'p99')} | {_us(r, 'p99.9')} | {rounds} | "
                             f"{_ratio(r.get('vs_direct'), 'p50')} | {_ratio(r.get('vs_direct'), 'p99')} | "
                             f"{_ratio(r.get('vs_kernel'), 'p50')} |")
            lines.append("")
        lines += ["### Setting up the latency labs", "", "| path | Services | ready after | rules |",
                  "|---|---:|---:|---:|"]
        for s in latency["setup"]:
            if "daemon_ready_s" not in s and "iptables_restore_s" not in s:
                continue
            ready = s.get("daemon_ready_s", s.get("iptables_restore_s"))
            how = "daemon start to /healthz 200" if "daemon_ready_s" in s else "iptables-nft-restore"
            lines.append(f"| {s['path']} | {s['services']:,} | {ready:.2f} s ({how}) | {s.get('rules', '')} |")
        lines.append("")
    control = results.get("control_plane")
    if control:
        lines += ["## Control plane", "",
                  "10 endpoints per Service. Full sync is the daemon's own figure (render, plan, apply); cold start "
                  "is daemon start to the first full sync in the kernel (includes reading the YAML); "
                  "iptables-restore is kube-proxy's iptables layout for the same cluster loaded by "
                  "iptables-nft-restore; change live is a manifest write to the partial sync applied. Load "
                  "averages around each size: " + "; ".join(f"{r['services']:,}: {r['loadavg']}" for r in control
                                                           if r.get("loadavg")) + ".", "",
                  "| Services | cold start (s) | full sync (s) | iptables-restore (s) | full sync ÷ iptables-restore | "
                  "change live, median (ms) | p90 (ms) | partial sync, median (ms) | peak RSS (MB) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in control:
            restore = r.get("iptables_restore_s")
            ratio = f"{r['full_sync_s'] / restore:.3f}×" if restore else "–"
            restore_text = f"{restore:.2f}" if restore else "–"
            lines.append(f"| {r['services']:,} | {r['cold_start_s']:.2f} | {r['full_sync_s']:.2f} | {restore_text} | "
                         f"{ratio} | {r['change_latency_ms_median']} | {r['change_latency_ms_p90']} | "
                         f"{r['change_sync_ms_median']} | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    plots = results.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    elif results.get("plots_missing"):
        lines += [f"Plots: {results['plots_missing']}", ""]
    return "\n".join(lines)
