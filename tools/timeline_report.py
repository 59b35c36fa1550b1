"""Summarise a step timeline written by `minisgl bench offline --time-device --timeline FILE`.

    python tools/timeline_report.py q06.json --kv-bytes-per-token 114688 --weight-bytes 1.2e9

Prints wall and device time by step kind, the time the device waited for the host, decode steps by
batch size, and a least-squares fit of decode device time = fixed + per_kv_token * kv_tokens, whose slope
gives the bandwidth at which attention reads the KV cache (given its bytes per token).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def report(steps: list[dict[str, Any]], kv_bytes_per_token: float | None, weight_bytes: float | None) -> None:
    for name, decode in (("prefill", False), ("decode", True)):
        rows = [s for s in steps if s["is_decode"] == decode]
        wall = sum(s["wall_seconds"] for s in rows)
        device = sum(s["device_seconds"] or 0.0 for s in rows)
        tokens = sum(s["num_tokens"] for s in rows)
        waited = sum(s.get("host_wait_seconds", 0.0) for s in rows)
        print(
            f"{name}: {len(rows)} steps, {tokens} tokens, wall {wall:.2f} s, device {device:.2f} s, "
            f"host busy {wall - waited:.2f} s"
        )
    wall = sum(s["wall_seconds"] for s in steps)
    device = sum(s["device_seconds"] or 0.0 for s in steps)
    print(f"all: wall {wall:.2f} s, device {device:.2f} s, device waited for the host {wall - device:.2f} s")

    decode_steps = [s for s in steps if s["is_decode"] and s["device_seconds"] is not None]
    if not decode_steps:
        return
    by_bin: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in decode_steps:
        by_bin[(s["num_chunks"] - 1) // 32].append(s)
    print("decode batch | steps | wall ms | device ms | host busy ms | mean kv tokens")
    for b in sorted(by_bin):
        rows = by_bin[b]
        n = len(rows)
        print(
            f"{32 * b + 1:>4}-{32 * b + 32:<4} | {n:>5} | {1000 * sum(r['wall_seconds'] for r in rows) / n:7.2f} | "
            f"{1000 * sum(r['device_seconds'] for r in rows) / n:9.2f} | "
            f"{1000 * sum(r['wall_seconds'] - r.get('host_wait_seconds', 0.0) for r in rows) / n:12.2f} | "
            f"{sum(r['kv_tokens'] for r in rows) / n:10.0f}"
        )
    fixed, per_token = fit_line(
        [s["kv_tokens"] for s in decode_steps], [s["device_seconds"] for s in decode_steps]
    )
    print(f"decode device time ~ {1000 * fixed:.3f} ms + {1e6 * per_token:.4f} us per kv token")
    if kv_bytes_per_token and per_token > 0:
        print(f"  KV read at {kv_bytes_per_token / per_token / 1e12:.2f} TB/s (slope)")
    if weight_bytes and fixed > 0:
        print(f"  fixed part = weights at {weight_bytes / fixed / 1e12:.2f} TB/s, if nothing else")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("timeline")
    parser.add_argument("--kv-bytes-per-token", type=float, default=None)
    parser.add_argument("--weight-bytes", type=float, default=None)
    args = parser.parse_args()
    with open(args.timeline) as file:
        report(json.load(file), args.kv_bytes_per_token, args.weight_bytes)


if __name__ == "__main__":
    main()
