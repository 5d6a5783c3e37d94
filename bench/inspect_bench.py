"""`describe` on an SD1.5-size checkpoint must read no tensor data.

    python bench/inspect_bench.py [CKPT]   (default: writes one with bench/make_sd15.py first)

Runs describe in a fresh process and reports wall time and peak RSS, without and with the sha256
(the hash reads the whole file once; its cache is disabled here so it is measured). The process's
baseline (Python + torch imported) is printed beside it, so the cost of describe itself shows.
Target: under 0.5 s and 300 MB without the sha256.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
from workbench.checkpoint.describe import describe
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
base = rss_mb()
t = time.perf_counter()
d = describe(sys.argv[1], with_hash=sys.argv[2] == "1")
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak, "baseline_rss_mb": base, "arch": d.architecture,
                  "keys": sum(c.keys for c in d.components.values())}))
"""


def run(path: Path, with_hash: bool) -> dict:
    env = {"WB_CACHE_DIR": tempfile.mkdtemp(prefix="wb-bench-cache-"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), "1" if with_hash else "0"],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    else:
        path = Path(tempfile.gettempdir()) / "wb-bench-sd15.safetensors"
        if not path.exists():
            subprocess.run(
                [sys.executable, str(Path(__file__).with_name("make_sd15.py")), str(path)], check=True
            )
    size_gb = path.stat().st_size / 1e9
    print(f"describe on {path} ({size_gb:.2f} GB)")
    print(f"{'':>14} {'wall s':>8} {'peak RSS MB':>12} {'baseline MB':>12}")
    for label, with_hash in (("header only", False), ("with sha256", True)):
        r = run(path, with_hash)
        print(f"{label:>14} {r['wall_s']:8.3f} {r['peak_rss_mb']:12.0f} {r['baseline_rss_mb']:12.0f}")
    print(f"architecture {r['arch']}, {r['keys']} keys")


if __name__ == "__main__":
    main()
