"""Short runs of the long-haul scripts (`make soak`, `make fuzz`), so that
they keep working: each must exit 0, in well under a minute here."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180


def run_script(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_soak_short_run():
    result = run_script("benchmarks/soak.py", "--calls", "5000")
    assert result.returncode == 0, (
        f"soak.py exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    assert "debug_info at end" in result.stdout and "OK" in result.stdout


def test_fuzz_short_run():
    result = run_script("benchmarks/fuzz_frames.py", "--frames", "20000")
    assert result.returncode == 0, (
        f"fuzz_frames.py exited {result.returncode}:\n{result.stdout[-4000:]}\n"
        f"{result.stderr[-2000:]}")
    assert "frames checked    20,000 of 20,000" in result.stdout
