"""benchmarks/gpu_check.py runs end to end (CPU, --quick) with webdataset, submitit and hydra unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A None entry in sys.modules makes `import X` raise ImportError: the script must not need these
# on a bare GPU node (omegaconf, which tsvae_dist.config uses, is a small pure-Python package).
RUNNER = """
import runpy, sys
for name in ("webdataset", "submitit", "hydra"):
    sys.modules[name] = None
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_check_quick_cpu_without_cluster_packages(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(ROOT / "benchmarks" / "gpu_check.py"),
         "--device", "cpu", "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for res in (64, 128, 256):
        for variant in ("fp32", "bf16", "bf16+cl"):
            assert f"| {res:4d} | {variant:16s} |" in text, (res, variant, text)
    assert "torch.compile is measured on CUDA only" in text  # the compile rows are skipped, saying why

    results = json.loads(out.read_text())
    assert {"machine", "training", "host_syncs", "transfer", "png_decode", "checkpoint_snapshot", "inception",
            "skipped"} <= results.keys()
    assert len(results["training"]) == 9
    fp32 = [r for r in results["training"] if r["variant"] == "fp32"]
    assert all(r["speed_vs_fp32"] == 1.0 and r["img_per_s"] > 0 for r in fp32)
    per_step = results["host_syncs"]["per_step"]
    assert set(per_step) == {"local_scalar_dense", "item", "cpu"}
    assert per_step["local_scalar_dense"] >= 0 and results["host_syncs"]["counts"][1]["local_scalar_dense"] > 0
    assert set(results["png_decode"]) == {"64px_img_per_s", "128px_img_per_s", "256px_img_per_s"}
    assert results["checkpoint_snapshot"]["mib"] > 0 and results["checkpoint_snapshot"]["seconds"] > 0
    assert results["inception"]["img_per_s"] > 0
    assert results["transfer"]["pinned_gbps"] is None and "transfer" in results["skipped"]
