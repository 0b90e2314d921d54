"""Plots bench_rpc.py's sweeps from its JSON (bench_rpc.py calls plot() itself).

    python benchmarks/plot_rpc.py [benchmarks/results/rpc.json [out.png]]

Left: rpc_sync echo p50 against payload size (log-log), with the 64-byte
ping-pong floors as dashed lines. Right: rpc_async calls/s against the number
of calls kept outstanding.
"""

import json
import os
import sys


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep, labels = doc["sweep"], doc["labels"]
    fig, (lat_ax, thr_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (backend, label) in enumerate(labels.items()):
        color = f"C{i}"
        for ax, xs, ys in (
            (lat_ax, sweep["sizes_bytes"], sweep["p50_us"].get(backend, [])),
            (thr_ax, sweep["outstanding"], sweep["calls_per_s"].get(backend, [])),
        ):
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=label)
    for key, name, style in (("unix_pingpong_us", "Unix socket", "--"),
                             ("tcp_pingpong_us", "TCP", ":")):
        if key in doc["floors"]:
            lat_ax.axhline(doc["floors"][key], color="gray", linestyle=style,
                           label=f"floor: {name} ping-pong, 64 B")

    lat_ax.set_xscale("log", base=2)
    lat_ax.set_yscale("log")
    lat_ax.set_xticks(sweep["sizes_bytes"], sweep["size_labels"])
    lat_ax.set_xlabel("payload (float32 tensor)")
    lat_ax.set_ylabel("rpc_sync(echo) p50, µs")
    lat_ax.set_title("latency against payload size")
    thr_ax.set_xscale("log", base=2)
    thr_ax.set_xticks(sweep["outstanding"], [str(n) for n in sweep["outstanding"]])
    thr_ax.set_ylim(bottom=0)
    thr_ax.set_xlabel("rpc_async calls outstanding")
    thr_ax.set_ylabel("calls/s (median)")
    thr_ax.set_title("throughput against calls in flight (4 floats, add_one)")
    for ax in (lat_ax, thr_ax):
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"bench_rpc ({doc['mode']} run, {doc['time']}, "
                 f"{doc['environment']['cpus']} CPUs, torch {doc['environment']['torch']})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "results", "rpc.json")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.splitext(src)[0] + ".png"
    with open(src) as f:
        plot(json.load(f), out)
    print(f"wrote {out}")
