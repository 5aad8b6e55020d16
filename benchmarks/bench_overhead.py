"""A computed round's orchestration overhead: its wall time against its compute floor.

Runs the default campaign (``configs/tiny.yaml``) for one round with ``mpd run`` in a fresh
workspace, then reads the round's manifests: each stage records its wall time and its
``compute_s``, the seconds spent inside engine calls (generate, score) and optimizer steps
(``tasks.common.computing``). The round's wall time runs from its first stage's start to its
last stage's finish, so it includes what Prefect and the flow spend between stages. The ratio
is wall / compute; the target is <= 1.10. The rest is broken down per stage (model loads,
Parquet and DuckDB, Python joins, checkpoints) and between stages (Prefect, the flow).

    python benchmarks/bench_overhead.py [--config configs/tiny.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        cmd = [sys.executable, "-m", "flows.cli", "run", "-c", args.config, "-w", str(ws)]
        cmd += ["--rounds", "1", *(a for kv in args.overrides for a in ("--set", kv))]
        started = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        total = time.perf_counter() - started
        if out.returncode != 0:
            sys.exit(f"mpd run failed:\n{out.stderr[-3000:]}")
        stages = [json.loads(path.read_text()) for path in ws.glob("*/round=1/_manifest.json")]
    stages.sort(key=lambda m: m["started_at"])
    wall = max(m["finished_at"] for m in stages) - min(m["started_at"] for m in stages)
    compute = sum(m["extra"].get("compute_s", 0.0) for m in stages)
    inside = sum(m["duration_s"] for m in stages)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"mpd run --rounds 1 ({Path(args.config).name}): {total:.1f} s in all (round 0 included)")
    print(f"round 1, stage by stage:   {'wall':>8} {'compute':>8} {'rest':>8}")
    for m in stages:
        c = m["extra"].get("compute_s", 0.0)
        print(f"  {m['stage']:<22} {m['duration_s']:8.2f} {c:8.2f} {m['duration_s'] - c:8.2f}")
    print(f"  {'between stages':<22} {wall - inside:8.2f} {0:8.2f} {wall - inside:8.2f}")
    print(f"  {'round':<22} {wall:8.2f} {compute:8.2f} {wall - compute:8.2f}")
    print(f"ratio wall / compute floor: {wall / compute:.2f}x (target <= 1.10)")


if __name__ == "__main__":
    main()
