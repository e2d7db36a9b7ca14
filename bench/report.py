"""Write a run's results: ``<name>.json``, ``<name>.md`` and PNG plots (matplotlib)."""

from __future__ import annotations

import json
import math
from pathlib import Path

# key -> (what, target text, check(value) -> bool)
TARGETS = {
    "p1_throughput_ratio": ("replay -> 1 subscriber, wqd / raw dbus-fast", ">= 0.9", lambda v: v >= 0.9),
    "p2_fanout100_ratio": ("100 subscribers, wqd / raw dbus-fast", ">= 0.8", lambda v: v >= 0.8),
    "p3_added_latency_p50_ms": ("uevent -> DeviceChanged minus pyudev, p50 (ms)", "<= 0.3", lambda v: v <= 0.3),
    "p3_added_latency_p99_ms": ("uevent -> DeviceChanged minus pyudev, p99 (ms)", "<= 1.0", lambda v: v <= 1.0),
    "p4_idle_wakeups_per_s": ("idle wakeups/s with subscriptions", "0 (event-driven)",
                              lambda v: all(rate == 0 for label, rate in v.items() if "proc-keys" not in label)),
    "p5_bytes_per_subscription": ("RSS growth per subscription (bytes)", "<= 2048", lambda v: v <= 2048),
    "p5_start_to_ready_s": ("exec -> name owned, median of 5 (s)", "<= 0.3", lambda v: v <= 0.3),
    "p6_call_p99_ms_under_storm": ("ListSubscriptions p99 during 10,000 events (ms)", "<= 50", lambda v: v <= 50),
    "p7_call_p99_ms_attacked": ("root's ListSubscriptions p99, a stopped uid at its cap + mount storm (ms)", "<= 50",
                                lambda v: v <= 50),
    "p7_call_p99_ratio": ("... the same / without the attacker, same run", "<= 3", lambda v: v <= 3),
    "p7_event_p99_ms_attacked": ("another uid's mount event latency p99, the same attack (ms)", "<= 50",
                                 lambda v: v <= 50),
    "p7_event_p99_ratio": ("... the same / without the attacker, same run", "<= 3", lambda v: v <= 3),
}
INFORMATIVE = {
    "bus_ceiling_signals_per_s": "bus ceiling: raw dbus-fast unicast signals/s, this run",
    "p5_start_floor_s": "exec -> name owned for a bare dbus-fast service (s), same run",
    "p3_bridge_added_latency_p50_ms": "added by a minimal pyudev -> dbus-fast bridge, p50 (ms), same run",
    "p6_call_p99_ms_under_bus_storm": "ListSubscriptions p99 while a raw sender storms the bus (ms), same run",
    "p7_call_p99_ms_quiet": "p7 root's ListSubscriptions p99 without the attacker (ms), same run",
    "p7_event_p99_ms_quiet": "p7 the victim's event latency p99 without the attacker (ms), same run",
}


def verdicts(values: dict) -> dict:
    out = {}
    for key, (_what, target, check) in TARGETS.items():
        value = values.get(key)
        out[key] = {"target": target, "met": None if value is None else bool(check(value))}
    return out


def _fmt(value) -> str:
    if value is None:
        return "unavailable"
    if isinstance(value, dict):
        return "<br>".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "none measured"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def markdown(name: str, run: dict) -> str:
    values, checks, details = run["values"], run["targets"], run["details"]
    lines = [f"# wqd benchmarks: `{name}`", "",
             f"{run['meta']['date']}, commit `{run['meta']['commit'][:12]}`, {run['meta']['machine']}", "",
             "| figure | key | value | target | met |", "|---|---|---|---|---|"]
    for key, (what, target, _check) in TARGETS.items():
        met = checks[key]["met"]
        mark = "—" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {what} | `{key}` | {_fmt(values.get(key))} | {target} | {mark} |")
    for key, what in INFORMATIVE.items():
        if key in values:
            lines.append(f"| {what} | `{key}` | {_fmt(values[key])} | — | — |")
    lines.append("")
    p1, p2 = details.get("p1", {}), details.get("p2", {})
    if "wqd_signals_per_s" in p1:
        lines.append(f"- p1: wqd {p1['wqd_signals_per_s']:,.0f} signals/s, raw dbus-fast {p1['raw_signals_per_s']:,.0f}"
                     f" ({p1['signals_per_round']:,} signals x {p1['rounds']} interleaved pairs of rounds, medians;"
                     f" lost: {p1['wqd_lost']}); CPU per signal: wqd {p1['wqd_cpu_us_per_signal']:.2f} us,"
                     f" raw sender {p1['raw_cpu_us_per_signal']:.2f} us, bus daemon {p1['bus_cpu_us_per_signal']:.2f} us"
                     f" (all rounds' run time / their signals; clock: {p1.get('cpu_clock', 'clock ticks')})")
    if "wqd_messages_per_s" in p2:
        lines.append(f"- p2: wqd {p2['wqd_messages_per_s']:,.0f} messages/s, raw {p2['raw_messages_per_s']:,.0f}"
                     f" ({p2['messages_per_round']:,} messages to {p2['subscribers']} connections per round);"
                     f" CPU per message: wqd {p2['wqd_cpu_us_per_message']:.2f} us,"
                     f" raw sender {p2['raw_cpu_us_per_message']:.2f} us, bus daemon {p2['bus_cpu_us_per_message']:.2f} us")
    p3 = details.get("p3", {})
    if "unavailable" in p3:
        lines.append(f"- p3: unavailable: {p3['unavailable']}")
    elif "wqd_p50_ms" in p3:
        lines.append(f"- p3: backend {p3['backend']}; uevent written -> received: wqd p50 {p3['wqd_p50_ms']:.3f} ms,"
                     f" pyudev p50 {p3['pyudev_p50_ms']:.3f} ms ({p3['measured']} events, {p3['missed']} missed);"
                     f" a minimal pyudev -> dbus-fast bridge adds p50 {p3['minimal_bridge_added_p50_ms']:.3f} ms,"
                     f" p99 {p3['minimal_bridge_added_p99_ms']:.3f} ms (the floor for any bridge over this bus)")
    for run4 in details.get("p4", {}).get("runs", []):
        skipped = "; ".join(f"{k}: {v}" for k, v in run4["not_watched"].items())
        lines.append(f"- p4 {run4['label'] or '(nothing watched)'}: windows {run4['windows_per_s']}"
                     + (f"; not watched: {skipped}" if skipped else ""))
    p6 = details.get("p6", {})
    if "storm_p50_ms" in p6:
        lines.append(f"- p6: {p6['calls_during_storms']} calls during {len(p6['storms'])} storms; p50"
                     f" {p6['storm_p50_ms']:.2f} ms, max {p6['storm_max_ms']:.1f} ms; idle p50 {p6['idle_p50_ms']:.2f} ms;"
                     f" during as many raw-sender storms on the bus (wqd idle): p50 {p6['bus_storm_p50_ms']:.2f} ms,"
                     f" p99 {p6['bus_storm_p99_ms']:.1f} ms")
    p7 = details.get("p7", {})
    if "unavailable" in p7:
        lines.append(f"- p7: unavailable: {p7['unavailable']}")
    elif "attacked_call_p50_ms" in p7:
        lines.append(f"- p7: uid 1000 stopped with {p7['attacked_attacker_subscriptions']:,} subscriptions (its cap"
                     f" {p7['cap']:,}); {p7['storms_per_phase']} storm(s) of {p7['mounts_per_storm']} mounts at"
                     f" {p7['rate_per_s']:.0f}/s per phase; root's calls p50 {p7['quiet_call_p50_ms']:.2f} ->"
                     f" {p7['attacked_call_p50_ms']:.2f} ms, p99 {p7['quiet_call_p99_ms']:.1f} ->"
                     f" {p7['attacked_call_p99_ms']:.1f} ms; uid 1001's events p50 {p7['quiet_event_p50_ms']:.2f} ->"
                     f" {p7['attacked_event_p50_ms']:.2f} ms, p99 {p7['quiet_event_p99_ms']:.1f} ->"
                     f" {p7['attacked_event_p99_ms']:.1f} ms (missing {p7['quiet_missing']} / {p7['attacked_missing']},"
                     f" lost {p7['quiet_lost']} / {p7['attacked_lost']})")
    for bench, error in run.get("errors", {}).items():
        lines.append(f"- {bench}: **failed**: {error.strip().splitlines()[-1]}")
    lines += ["", f"Load average at start / end: {run['meta']['loadavg_start']} / {run['meta']['loadavg_end']}", ""]
    for png in run.get("plots", []):
        lines.append(f"![{png}]({png})")
    return "\n".join(lines) + "\n"


def plots(name: str, series: dict, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    throughput = series.get("throughput", {})
    if throughput:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        labels = list(throughput)
        xs = range(len(labels))
        wqd = [throughput[label][0] for label in labels]
        raw = [throughput[label][1] for label in labels]
        ax.bar([x - 0.2 for x in xs], raw, 0.4, label="raw dbus-fast sender (baseline)", color="#999999")
        ax.bar([x + 0.2 for x in xs], wqd, 0.4, label="wqd", color="#1f77b4")
        for x, w, r in zip(xs, wqd, raw):
            ax.text(x + 0.2, w, f"x{w / r:.2f}", ha="center", va="bottom")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("signals delivered per second")
        ax.set_title(f"Throughput, same bus, same run ({name})")
        ax.set_ylim(0, max(wqd + raw) * 1.25)
        ax.legend(loc="upper center", ncol=2, fontsize="small")
        fig.tight_layout()
        path = directory / f"{name}-throughput.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    latency = {k: v for k, v in series.get("latency", {}).items() if v}
    if latency:
        groups = sorted({k.split()[0] for k in latency})
        fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
        for ax, group in zip(axes[0], groups):
            for label, values in latency.items():
                if not label.startswith(group + " "):
                    continue
                ordered = sorted(values)
                ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
                ax.step(ordered, ys, where="post", label=f"{label[len(group) + 1:]} (n={len(ordered)})")
            ax.set_xscale("symlog", linthresh=0.1)
            ax.set_xlabel("milliseconds")
            ax.set_ylabel("fraction of events / calls")
            ax.set_title({"p3": "Device event latency", "p6": "ListSubscriptions round trip",
                          "p7": "Hostile uid at its cap: calls and another uid's events"}.get(group, group))
            ax.grid(True, alpha=0.3)
            ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        path = directory / f"{name}-latency.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def write(name: str, run: dict, series: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        run["plots"] = plots(name, series, directory)
    except ImportError as exc:  # matplotlib is the `bench` extra
        run["plots"] = []
        run.setdefault("errors", {})["plots"] = f"no plots: {exc} (pip install -e '.[bench]')"
    out = directory / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    document = {**run["values"], "targets": run["targets"], "details": run["details"], "meta": run["meta"],
                "plots": run["plots"], "errors": run.get("errors", {})}
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    tmp.replace(out)
    (directory / f"{name}.md").write_text(markdown(name, run))
    return out
