"""Table and plots for bench/trace.py results.

    python bench/report_trace.py OUT_DIR trace.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(r: dict) -> str:
    lines = [f"# Trace — {r.get('gpu', '?')} × {r.get('gpus', '?')}, {r.get('date', '')}", "",
             f"{r.get('duration_s')} s of trace per point, seed {r.get('seed')}, SLO = max(10 ms, 3 × (native graph + "
             f"floor)) of each fp16 model ({r.get('slo_source', '')}). Attainment = fraction of called functions whose "
             "P98 ≤ SLO (refused or failed = miss); requests in SLO = share of all requests answered within their "
             "function's SLO." + _settings(r) + _link(r.get("link_profile")), "",
             "| policy | N | attainment | requests in SLO | P50 ms | P99 ms | req/s | swaps/s | busy | loop late "
             "| CPU steal | canary ms | longest run ms | wrong answers | requests | codes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, p in r["policies"].items():
        for pt in p["sweep"]:
            fmt = (lambda v: f"{v:.1f}" if v is not None else "-")
            lines.append(f"| {label} | {pt['n']} | {_attainment(pt)} | {_in_slo(pt)} | {fmt(pt['p50_ms'])} "
                         f"| {fmt(pt['p99_ms'])} "
                         f"| {pt['throughput_rps']:.1f} | {pt['swaps_per_s']:.1f} | {pt['busy_fraction']:.2f} "
                         f"| {_lag(pt.get('loop_lag'))}{_front_lag(pt.get('front_loop_lag'))} "
                         f"| {_steal(pt.get('cpu_steal'))} | {_canary(pt.get('cpu_canary'))} "
                         f"| {fmt(pt.get('longest_run_ms'))} | {_wrong(pt.get('answers'))} | {pt['requests']} "
                         f"| {pt['status_codes']} |")
    if any("attainment_runs" in pt for p in r["policies"].values() for pt in p["sweep"]):
        lines += ["", "Replayed points: the run of median attainment, every run's in brackets (same trace, same node)."]
    lines += ["", "max_functions (largest N with ≥ 98 % attainment): "
              + ", ".join(f"{k} {v['max_functions']}" for k, v in r["policies"].items())]
    lines += _host_bound(r.get("host_memory"))
    lines += ["", "loop late: share of the node's 10 ms event-loop probe ticks that ran over 2.5 ms late (CPU work or "
              "collection pauses holding the gateway and controller; '-' where the run predates the probe); with HTTP "
              "fronts, the fronts' own in brackets. CPU steal: share of the machine's CPU time the hypervisor took "
              "while the point was measured, and in its worst second (bench/steal.py; '-' where not recorded). canary ms: "
              "the median time of a fixed piece of Python run every 0.1 s in a process of its own meanwhile, its p90 "
              "in brackets (bench/canary.py; '-' where not recorded): a replay slower throughout with a slower canary "
              "ran on a slower machine. longest run ms: the longest run (its swap included) of an answered request: a "
              "stall of the GPU or a worker shows here as hundreds of ms ('-' where not recorded; one H200 replay of "
              "session 18 had 519 ms and 37 refusals after it). wrong answers: answers whose first output values are "
              "not their model's, of those checked (the functions of one model share its weights and input; "
              "trace.wrong_answers; '-' where the client did not keep them, before the nineteenth session)."]
    lines += device_table(r)
    lines += breakdown_table(r)
    lines += phases_table(r)
    lines += causes_table(r)
    lines += refusals_table(r)
    return "\n".join(lines) + "\n"


def _wrong(answers: dict | None) -> str:
    """Wrong answers of those checked, and the models they came from."""
    if not answers:
        return "-"
    models = ", ".join(f"{m} {k}" for m, k in sorted(answers["by_model"].items()))
    return f"{answers['wrong']} / {answers['checked']}" + (f" ({models})" if models else "")


def _host_bound(host: dict | None) -> list[str]:
    """The points the sweep left out because their models would not fit the machine's host memory."""
    if not host or not host.get("not_run"):
        return []
    need = host["needed_bytes"]
    return ["", "Not run, for host memory (every model stays in page-locked host memory): "
            + ", ".join(f"N={n} (a host store of {need[str(n)] / 1e9:.1f} GB)" for n in host["not_run"])
            + f"; this machine had room for {host['available_bytes'] / 1e9:.1f} GB."]


def _link(profile: dict | None) -> str:
    """The host→GPU bandwidth the node measured at its start, where the result records it: beside the SLOs'
    source (whose floors are some machine's bandwidth), whether this machine copies as fast as that one did."""
    if not profile or "h2d_GBps" not in profile:
        return ""
    return f" The node's host→GPU link measured {profile['h2d_GBps']:.1f} GB/s at its start (its first GPU)."


def _settings(r: dict) -> str:
    """The node's settings that differ from its defaults, and whether its controller polled (``spin_ms``: the
    default depends on the machine), where the result records them."""
    said = [f"serve --fronts {r['fronts']}" if r.get("fronts") else "",
            "side fetches off" if r.get("side_fetch") is False else "",
            "placing ahead off" if r.get("place_ahead") is False else "",
            "the gateway's margin off" if r.get("gateway_margin") is False else "",
            "peer copies on" if r.get("peer_copies") else "",
            "eviction values in shares of SLOs" if r.get("slo_values") else "",
            f"lanes {r['lanes']}" if r.get("lanes", 2) != 2 else "",
            "no queue-ahead" if r.get("queue_ahead") is False else "",
            "" if r.get("spin_ms") is None else
            f"the controller polling {r['spin_ms']:g} ms" if r["spin_ms"] else "the controller not polling"]
    said = [s for s in said if s]
    return f" Node: {', '.join(said)}." if said else ""


def _in_slo(pt: dict) -> str:
    """The share of requests in their SLO, every replay's in brackets ('-' where the run predates it)."""
    if pt.get("requests_in_slo") is None:
        return "-"
    runs = [x for x in pt.get("requests_in_slo_runs") or () if x is not None]
    return f"{pt['requests_in_slo']:.3f}" + (f" ({', '.join(f'{x:.3f}' for x in runs)})" if len(runs) > 1 else "")


def _attainment(pt: dict) -> str:
    runs = pt.get("attainment_runs")
    return f"{pt['attainment']:.3f}" + (f" ({', '.join(f'{a:.3f}' for a in runs)})" if runs else "")


def _lag(lag: dict | None) -> str:
    return f"{lag['over_2.5ms'] / lag['ticks']:.1%}" if lag and lag.get("ticks") else "-"


def _steal(steal: dict | None) -> str:
    return f"{steal['fraction']:.1%} (max {steal['max_window']:.1%})" if steal else "-"


def _canary(c: dict | None) -> str:
    return f"{c['median_ms']:.2f} ({c['p90_ms']:.2f})" if c else "-"


def _front_lag(lag: dict | None) -> str:
    return f" (fronts {_lag(lag)})" if lag and lag.get("ticks") else ""


def device_table(r: dict) -> list[str]:
    """Where each point's answered requests ran, by device (points that recorded it)."""
    rows = [(label, pt) for label, p in r["policies"].items() for pt in p["sweep"] if len(pt.get("by_device") or ()) > 1]
    if not rows:
        return []
    lines = ["", "Where answered requests ran, by device: requests, of them swapped, their runs' seconds (swap and "
             "execution), and the 90th percentile of their time queued in the controller.", "",
             "| policy | N | device | requests | swapped | run s | queued p90 ms |", "|---|---:|---|---:|---:|---:|---:|"]
    for label, pt in rows:
        for device, d in pt["by_device"].items():
            lines.append(f"| {label} | {pt['n']} | {device} | {d['requests']} | {d['swapped']} | {d['compute_s']:.2f} "
                         f"| {d['p90_queue_ms']:.2f} |")
    return lines


def breakdown_table(r: dict) -> list[str]:
    """Where completed requests' time went (medians), per model, at each policy's largest N."""
    keys = ("latency_ms", "headers_ms", "server_ms", "node_ms", "queue_ms", "dispatch_ms", "decide_ms", "to_worker_ms",
            "worker_ms", "from_worker_ms", "compute_ms")
    lines = ["", "Medians of completed requests at each policy's largest N: client latency, until the response "
             "head, the gateway's handler, the node (admission to answer), queued, dispatching (decision to message "
             "sent), of it the decision ('-' where not recorded, before 2026-11-30's twenty-sixth session), the message's way to the worker, the worker (message to reply), the reply's way back, its run (swap + execution); late = completed after the SLO.", "",
             "| policy | N | model | SLO ms | requests | " + " | ".join(k.removesuffix("_ms") for k in keys)
             + " | swapped |", "|---|---:|---|---:|---:|" + "---:|" * (len(keys) + 1)]
    fmt = (lambda v: f"{v:.2f}" if isinstance(v, float | int) and v >= 0 else "-")
    for label, p in r["policies"].items():
        pt = p["sweep"][-1]
        rows = dict(pt.get("breakdown_by_model") or {})
        if pt.get("late_breakdown"):
            rows["(late, all models)"] = pt["late_breakdown"]
        for model, b in rows.items():
            if b is None:
                continue
            slo = r.get("slo_ms", {}).get(model)
            lines.append(f"| {label} | {pt['n']} | {model} | {fmt(slo) if slo else '-'} | {b.get('requests', '-')} | "
                         + " | ".join(fmt(b.get(k)) for k in keys) + f" | {b.get('swapped_fraction', 0):.2f} |")
    return lines


def phases_table(r: dict) -> list[str]:
    """Where the worker's runs went (medians of each run's phases), per model, resident and swapped, at each
    policy's largest N (points measured before runs reported phases have none)."""
    keys = ("wait", "upload", "place", "device", "output")
    lines = []
    for label, p in r["policies"].items():
        pt = p["sweep"][-1]
        for model, kinds in (pt.get("phases_by_model") or {}).items():
            for kind, b in kinds.items():
                if b:
                    remaps = f"{b['place_remap']:.2f}" if "place_remap" in b else "-"
                    if b.get("place_remap_cpu"):
                        remaps += f" ({b['place_remap_cpu']:.2f} CPU)"
                    lines.append(f"| {label} | {pt['n']} | {model} | {kind} | {b['runs']} | "
                                 + " | ".join(f"{b[k]:.2f}" for k in keys) + f" | {remaps} |")
    if not lines:
        return []
    return ["", "Where the worker's runs went (medians, ms) at each policy's largest N: waiting for the lane or a "
            "capture, putting inputs up, pinning and pages (evictions, remaps; the remaps' driver calls alone in "
            "the last column, with the worker thread's CPU time in them where runs reported it), the device "
            "(launch to landed), writing outputs to the IO slab.", "",
            "| policy | N | model | run | runs | " + " | ".join(keys) + " | of place: remaps |",
            "|---|---:|---|---|---:|" + "---:|" * (len(keys) + 1), *lines]


def causes_table(r: dict) -> list[str]:
    """Why functions missed, at every point that says (runs before 2026-11-28 do not)."""
    parts = ("client", "gateway", "controller", "queue", "dispatch", "pipes", "lane", "place", "swap", "refused")
    lines = []
    for label, p in r["policies"].items():
        for pt in p["sweep"]:
            mc = pt.get("miss_causes")
            if mc:
                lines.append(f"| {label} | {pt['n']} | {mc['missed']} of {pt['functions_called']} | "
                             + " | ".join(str(mc["worst_part"].get(k, 0)) for k in parts)
                             + f" | {mc['attainment_without_queueing']:.3f} | {_followers(mc.get('followers'))} |")
    if not lines:
        return []
    return ["", "Why functions missed: the largest part of each missing function's worst request (client side "
            "= client latency − the gateway handler; controller = node − worker − queue − dispatch − pipes; queue = in "
            "the controller; dispatch = decision to message sent; pipes = the messages' way to the worker and "
            "back (runs before 2026-11-28's ninth session count dispatch and pipes under controller); lane = in the worker's lane, behind a run queued ahead (runs before 2026-11-28's seventh "
            "session count it under queue); place = the worker's pages phase; swap = a swapped run's device "
            "phase), and the attainment with every request's queueing (both kinds) removed. Burst followers: requests "
            "within 10 ms of the one before of their function, batched with it / run alone, and of those alone "
            "the late or refused against all late or refused requests ('-' where the records have no arrival "
            "times).", "",
            "| policy | N | missed | " + " | ".join(parts) + " | attainment without queueing | burst followers |",
            "|---|---:|---:|" + "---:|" * (len(parts) + 1) + "---|", *lines]


def refusals_table(r: dict) -> list[str]:
    """How late the node expected the requests it refused (503 "expected X ms late"), at every point that
    recorded it (``refused_late_ms``, since session 38) and refused any."""
    lines = []
    for label, p in r["policies"].items():
        for pt in p["sweep"]:
            late = pt.get("refused_late_ms")
            if late:
                within = sum(1 for x in late if x <= 1.0)
                lines.append(f"| {label} | {pt['n']} | {len(late)} | {late[0]:.1f} | {late[len(late) // 2]:.1f} "
                             f"| {late[-1]:.1f} | {within} |")
    if not lines:
        return []
    return ["", "Refusals: the lateness the node expected of each request it refused for its deadline (its finish "
            "less the deadline, by the scheduler's plan, in ms; cold-start grace not counted), the smallest, the "
            "median and the largest, and how many by 1 ms or less.", "",
            "| policy | N | refused | least | median | most | ≤ 1 ms |", "|---|---:|---:|---:|---:|---:|---:|", *lines]


def _followers(f: dict | None) -> str:
    if not f or not f["requests"]:
        return "-"
    return f"{f['batched']} / {f['requests'] - f['batched']}, late {f['late_alone']} of {f['late']}"


def plots(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, p in r["policies"].items():
        a.plot([pt["n"] for pt in p["sweep"]], [pt["attainment"] for pt in p["sweep"]], marker="o", label=label)
        last = p["sweep"][-1]
        xs = np.sort(np.array(last["latencies_ms"]))
        if len(xs):
            b.plot(xs, np.linspace(0, 1, len(xs)), label=f"{label} (N={last['n']})")
    a.axhline(0.98, color="grey", ls="--", lw=0.8)
    a.set_xlabel("functions (N)")
    a.set_ylabel("fraction of functions with P98 ≤ SLO")
    a.set_ylim(0, 1.02)
    a.legend()
    a.grid(alpha=0.3)
    b.set_xscale("log")
    b.set_xlabel("latency of completed requests (ms)")
    b.set_ylabel("CDF")
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(f"{r.get('gpu', '?')} × {r.get('gpus', '?')}")
    fig.tight_layout()
    fig.savefig(out / "trace.png", dpi=110)
    plt.close(fig)


def render(result: dict, out: Path) -> None:
    (out / "trace.json").write_text(json.dumps(result, indent=1))
    (out / "trace.md").write_text(table(result))
    plots(result, out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    render(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[1]))
