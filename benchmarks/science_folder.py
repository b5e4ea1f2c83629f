"""A short schedule on a small real image folder: scikit-learn's handwritten digits through `shards folder`.

The 1,797 digits (8 × 8, 17 grey levels, bundled with scikit-learn: nothing is downloaded) are
written as PNGs into `train/` and `test/` folders (every fifth image of each class is a test
image), built with `python -m shards folder --resolution 32 --channels 1` (so the folder split is
kept), then trained stage 1 → encode → stage 2 → evaluate in one process, one thread, with the
synthetic presets' schedule scaled to this set's steps. Samples are measured without Inception
weights, in the feature space of a digit classifier (an MLP trained here on the training images'
labels, as a Fréchet distance in a classifier's features is what we would use for FID on digits):

- **classifier FD**: Fréchet distance of the hidden-layer features of a set of images to the test
  images'; floor: training images vs test images (same count);
- **NN RMSE**: mean pixel RMSE from each test image to its nearest sample (recall-like);
- the report's γ_x, active dims and Fréchet distances of q(z) and q(u) to N(0, I).

    pip install scikit-learn    # for the data and the classifier; not a dependency of the project
    OMP_NUM_THREADS=1 python benchmarks/science_folder.py --run-dir /tmp/digits/optimal-s0 seed=0 \\
        stage1.gamma=optimal stage2.gamma=optimal
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from science_gamma import diagnostics, run_stages  # this folder's sibling: one way to run and read a pipeline

from tsvae_dist.cli import compose
from tsvae_dist.fid.stats import frechet_distance
from tsvae_dist.models.sampling import sample_images
from tsvae_dist.stages._common import load_trained as load_model

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 32
# The synthetic presets' model and schedule (benchmarks/RESULTS.md), in epochs of this set's 22 steps:
# stage 1 770 steps (the preset's 768), stage 2 2,552 (its 2,560), the learning rate halved at the
# same points.
SCHEDULE = ["model.width=0.5", "model.latent_dim=16", "model.stage2_hidden=256",
            "stage1=synthetic", "stage2=synthetic", "eval=synthetic",
            "stage1.epochs=35", "stage1.lr_halve_every_epochs=17",
            "stage2.epochs=116", "stage2.lr_halve_every_epochs=46"]


def build_digits(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The digits as PNG folders and shards under `root`; labels per split in the shards' key order."""
    from sklearn.datasets import load_digits  # optional: only this benchmark needs scikit-learn

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    folders, shards = root / "images", root / "shards"
    labels: dict[str, list[int]] = {"train": [], "test": []}
    seen = np.zeros(10, dtype=int)
    names = []
    for img, label in zip(images, digits.target, strict=True):
        split = "test" if seen[label] % 5 == 4 else "train"
        seen[label] += 1
        names.append((f"{split}/{label}_{seen[label]:04d}.png", img, split, int(label)))
    for rel, img, split, label in sorted(names):  # the builder keys a split's files in sorted path order
        labels[split].append(label)
        if not (folders / rel).exists():
            (folders / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(folders / rel)
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "shards", "folder", "--src", str(folders), "--out", str(shards),
                        "--resolution", str(RESOLUTION), "--channels", "1", "--name", "digits"],
                       cwd=REPO, check=True)
    return shards, {k: np.asarray(v) for k, v in labels.items()}


def split_images(cfg, split: str) -> np.ndarray:
    """All images of a split, float [n, H·W] in [0, 1], in key order."""
    from tsvae_dist.data.prefetch import decode_image_shard

    manifest = json.loads(Path(cfg.dataset.root, "manifest.json").read_text())
    parts = [decode_image_shard(cfg.dataset.root, entry, list(manifest["shape"]))[1]
             for entry in manifest["splits"][split]["shards"]]
    return np.concatenate(parts).reshape(-1, RESOLUTION * RESOLUTION).astype(np.float64) / 255.0


def nn_rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over a of the pixel RMSE to its nearest neighbour in b."""
    d = torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).min(1).values
    return float((d ** 2 / a.shape[1]).sqrt().mean())


def yardstick(cfg, labels: dict[str, np.ndarray]) -> dict:
    from sklearn.neural_network import MLPClassifier

    train, test = split_images(cfg, "train"), split_images(cfg, "test")
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=400, random_state=0).fit(train, labels["train"])

    def features(x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)

    def fd(x: np.ndarray) -> float:
        a, b = features(x), features(test)
        return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))

    n = len(test)
    m1, m2 = load_model(cfg, "stage1"), load_model(cfg, "stage2")
    with torch.no_grad():
        x = torch.from_numpy(test).float().view(n, 1, RESOLUTION, RESOLUTION)
        recon = m1.decode(m1.encode(x)[0]).clamp(0, 1).reshape(n, -1).double().numpy()
    rng = np.random.default_rng(0)
    sets = {"train_images(floor)": train[rng.choice(len(train), n, replace=False)], "reconstructions": recon}
    for mode in ("stage1", "stage2"):
        s = sample_images(mode, m1, m2, range(n), cfg.model.latent_dim, cfg.seed, "science", torch.device("cpu"))
        sets[f"{mode}_samples"] = s.reshape(n, -1).double().numpy()
    out = {"classifier_test_accuracy": float(clf.score(test, labels["test"]))}
    for name, imgs in sets.items():
        out[name] = {"classifier_fd": fd(imgs), "nn_rmse_from_test": nn_rmse(test, imgs)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--data", default="/tmp/digits/data", help="where the PNG folders and shards go")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards, labels = build_digits(Path(args.data))
    run_dir = Path(args.run_dir)
    cfg = compose([f"run_dir={run_dir}", "dataset=folder", f"dataset.root={shards}", "dataset.channels=1",
                   f"dataset.resolution={RESOLUTION}", *SCHEDULE, f"eval.num_test={len(labels['test'])}",
                   f"eval.num_samples={len(labels['test'])}", "stage1.progress_bar=false", "stage2.progress_bar=false",
                   "eval.fid=off", "eval.workers=0", *args.overrides])
    times = run_stages(cfg)
    result = {"overrides": args.overrides, "seconds": times, "images": {k: len(v) for k, v in labels.items()},
              **diagnostics(run_dir), "yardstick": yardstick(cfg, labels)}
    (run_dir / "science.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
