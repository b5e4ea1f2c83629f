"""γ modes on the embedded synthetic set: the whole pipeline in one process, plus a factor yardstick.

Runs stage 1 → encode → stage 2 → evaluate through each stage's `run(cfg)` (single process, one
thread), then measures samples without Inception weights:

- **factor FD**: each disc image's generative factors (centre x, y, radius, hue) are estimated from
  colour moments (coverage α of each pixel from its colour's departure from the background, then
  area, centroid and the core colour's hue); the Fréchet distance between the Gaussian fits of
  those 4-d factors, standardised by the test set's, of a set of images and of the test images.
  It needs no learned features and measures what the task is about: whether samples cover the
  true 4-d manifold with the right distribution. A floor (training vs test images) is reported.
- **NN RMSE**: mean pixel RMSE from each sample to its nearest test image (precision-like) and from
  each test image to its nearest sample (recall-like).

    OMP_NUM_THREADS=1 python benchmarks/science_gamma.py --run-dir /tmp/sci/learned [--reuse-stage1 DIR] \\
        stage1.gamma=learned stage2.gamma=learned
"""

from __future__ import annotations

import argparse
import colorsys
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tsvae_dist.cli import compose
from tsvae_dist.data.prefetch import decode_image_shard
from tsvae_dist.data.synthetic import BACKGROUND, HUE_MAX
from tsvae_dist.fid.stats import frechet_distance
from tsvae_dist.models.sampling import sample_images
from tsvae_dist.stages import encode, evaluate, stage1, stage2
from tsvae_dist.stages._common import load_trained as load_model


def estimate_factors(images: np.ndarray) -> np.ndarray:
    """[n, 4] (x, y, radius, hue) estimated from float images [n, H, W, 3] in [0, 1]."""
    n, h, w, _ = images.shape
    dev = images - np.asarray(BACKGROUND)[None, None, None, :]
    norm = np.linalg.norm(dev, axis=-1).reshape(n, -1)
    flat = dev.reshape(n, -1, 3)
    core = norm >= 0.9 * norm.max(axis=1, keepdims=True)
    colour_dev = (flat * core[..., None]).sum(1) / np.maximum(core.sum(1, keepdims=True), 1)  # [n, 3]
    alpha = np.clip((flat @ colour_dev[..., None])[..., 0] / np.maximum((colour_dev ** 2).sum(1, keepdims=True), 1e-8),
                    0.0, 1.0)  # [n, H·W] coverage
    area = np.maximum(alpha.sum(1), 1e-8)
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    x = (alpha * cols.reshape(1, -1)).sum(1) / area
    y = (alpha * rows.reshape(1, -1)).sum(1) / area
    radius = np.sqrt(area / np.pi)
    colour = np.clip(colour_dev + np.asarray(BACKGROUND), 0, 1)
    hue = np.array([colorsys.rgb_to_hsv(*c)[0] for c in colour])
    hue = np.where(hue > (1 + HUE_MAX) / 2, hue - 1, hue)  # just below red wraps round to ~1: unwrap
    return np.stack([x, y, radius, hue], axis=1)


def factor_fd(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> float:
    a, b = a / scale, b / scale
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def nn_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over a of the pixel RMSE to its nearest neighbour in b (both [n, D])."""
    return float((torch.cdist(a.double(), b.double()).min(1).values ** 2 / a.shape[1]).sqrt().mean())


def images_of(cfg, split: str, n: int) -> np.ndarray:
    data = json.loads(Path(cfg.dataset_root, "manifest.json").read_text())
    out = []
    for entry in data["splits"][split]["shards"]:
        out.append(decode_image_shard(cfg.dataset_root, entry, list(data["shape"]))[1])
        if sum(len(o) for o in out) >= n:
            break
    return np.concatenate(out)[:n].transpose(0, 2, 3, 1).astype(np.float64) / 255.0  # [n, H, W, C]


def yardstick(cfg) -> dict:
    n = cfg.eval.num_test
    test, train = images_of(cfg, "test", n), images_of(cfg, "train", n)
    m1, m2 = load_model(cfg, "stage1"), load_model(cfg, "stage2")
    with torch.no_grad():
        x = torch.from_numpy(test).permute(0, 3, 1, 2).float()
        recon = m1.decode(m1.encode(x)[0]).clamp(0, 1)
    sets = {"train_images(floor)": train, "reconstructions": recon.permute(0, 2, 3, 1).double().numpy()}
    for mode in ("stage1", "stage2"):
        s = sample_images(mode, m1, m2, range(n), cfg.model.latent_dim, cfg.seed, "science", torch.device("cpu"))
        sets[f"{mode}_samples"] = s.permute(0, 2, 3, 1).double().numpy()
    f_test = estimate_factors(test)
    scale = f_test.std(0)
    flat_test = torch.from_numpy(test.reshape(n, -1))
    out = {}
    for name, imgs in sets.items():
        flat = torch.from_numpy(imgs.reshape(len(imgs), -1))
        out[name] = {"factor_fd": factor_fd(estimate_factors(imgs), f_test, scale),
                     "nn_rmse_to_test": nn_rmse(flat, flat_test), "nn_rmse_from_test": nn_rmse(flat_test, flat)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data-root", default="/tmp/sci/data")
    parser.add_argument("--reuse-stage1", default="", help="copy stage1/ and encode/ from this run dir")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    if args.reuse_stage1:
        for sub in ("stage1", "encode"):
            shutil.copytree(Path(args.reuse_stage1) / sub, run_dir / sub, dirs_exist_ok=True)
    cfg = compose([f"run_dir={run_dir}", f"dataset.root={args.data_root}", "stage1.progress_bar=false",
                   "stage2.progress_bar=false", "eval.fid=off", "eval.workers=0", *args.overrides])
    times = run_stages(cfg, STAGES[2:] if args.reuse_stage1 else STAGES)  # reused: stage 1 and latents done
    result = {"overrides": args.overrides, "seconds": times, **diagnostics(run_dir), "yardstick": yardstick(cfg)}
    (run_dir / "science.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


STAGES = (("stage1", stage1), ("encode", encode), ("stage2", stage2), ("evaluate", evaluate))


def run_stages(cfg, stages=STAGES) -> dict[str, float]:
    """Run the stages in this process, in order; seconds per stage."""
    times = {}
    for name, mod in stages:
        start = time.perf_counter()
        mod.run(cfg)
        times[name] = round(time.perf_counter() - start, 1)
    return times


def diagnostics(run_dir: Path) -> dict:
    """The report's γ, active dims and distances to N(0, I), and stage 2's last logged terms."""
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    rows = [json.loads(ln) for ln in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    return {
        "gamma_x": report["gamma_x"], "sqrt_mse": report["reconstruction_mse"] ** 0.5,
        "active_dims": report["active_dims"]["count"], "frechet_z": report["frechet_to_prior"]["z"],
        "frechet_u": report["frechet_to_prior"]["u"], "gamma_z": report["gamma_z"],
        "stage2_kl": rows[-1]["kl"], "stage2_mse": rows[-1].get("mse"),
        "posterior_variance": [round(v, 4) for v in report["active_dims"]["posterior_variance"]],
        "convergence_warning": (report.get("stage1_convergence") or {}).get("warning"),
    }


if __name__ == "__main__":
    main()
