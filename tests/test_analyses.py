"""Smoke runs of the analysis scripts with tiny settings: they run and write HDF5 + figures."""

import subprocess
import sys
from pathlib import Path

import pytest

from curvlab.storage import read

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "spectrum_during_training": [
        "--steps",
        "10",
        "--every",
        "5",
        "--lrs",
        "0.1",
        "--examples",
        "64",
        "--hidden",
        "4",
    ],
    "fisher_vs_empirical_fisher": ["--grid", "4", "--steps", "3"],
    "ill_conditioning": ["--kappas", "10", "30", "--dim", "8"],
    "optimizer_benchmark": [
        "--task",
        "classifier",
        "--methods",
        "SGD",
        "KFAC",
        "KFAC (rescaled)",
        "ACP (fixed α)",
        "CenteredSGD",
    ]
    + ["--budget", "2", "--tune-seconds", "0.2", "--seconds", "0.4", "--curvature-every", "3"],
}


@pytest.mark.parametrize("script", list(RUNS))
def test_analysis_script_writes_results(script, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "analyses" / f"{script}.py"), "--out", str(tmp_path), *RUNS[script]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    files = list(tmp_path.glob("*.h5"))
    assert len(files) == 1 and read(files[0])
    assert list(tmp_path.glob("*.png"))
