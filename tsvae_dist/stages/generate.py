"""Generate: N samples from a finished run, as PNG files or WebDataset image shards.

`python -m tsvae_dist.generate run_dir=runs/synthetic generate.num=1000 [generate.mode=stage1]`
(under torchrun or srun the ranks share the work). Sample i is keyed by (seed, i) and decoded in
the same fixed chunk of `generate.batch_size` samples whichever rank does it, so the output is
byte-identical for any world size; another batch size draws the same noise, and the images differ
at most by float rounding (batched kernels pick their summation order by shape). With
`generate.format=shards` each finished shard gets a done marker, and a re-run skips the shards
made from the same models and settings.
"""

from __future__ import annotations

import json

from tsvae_dist import records, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.data.shardformat import encode_image
from tsvae_dist.data.writer import finish_dataset, write_shard
from tsvae_dist.layout import TRAINING_STAGES
from tsvae_dist.models.sampling import png_bytes, sample_images, to_uint8_hwc
from tsvae_dist.runtime import dist
from tsvae_dist.stages._common import load_trained


def output_url(cfg: RunConfig) -> str:
    return cfg.generate.out or cfg.layout.samples(cfg.generate.mode)


def _is_done(done_url: str, source: dict, count: int) -> bool:
    if not storage.exists(done_url):
        return False
    marker = json.loads(storage.read_text(done_url))
    return marker.get("source") == source and marker.get("count") == count


def run(cfg: RunConfig) -> str:
    """Write cfg.generate.num samples; returns the output URL."""
    g = cfg.generate
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0, timeout_s=cfg.cluster.init_timeout_s)
    stage1 = load_trained(cfg, "stage1").to(info.device)
    stage2 = load_trained(cfg, "stage2").to(info.device) if g.mode == "stage2" else None
    out = output_url(cfg)

    def images(indices: list[int]):
        batch = sample_images(g.mode, stage1, stage2, indices, cfg.model.latent_dim, cfg.seed, "generate",
                              info.device)
        return to_uint8_hwc(batch)

    if g.format == "png":  # chunk c holds samples [c * batch, (c + 1) * batch), chunk c on rank c mod world
        for start in range(info.rank * g.batch_size, g.num, info.world_size * g.batch_size):
            indices = list(range(start, min(start + g.batch_size, g.num)))
            for i, pixels in zip(indices, images(indices), strict=True):
                storage.write_bytes_atomic(storage.join(out, f"{i:06d}.png"), png_bytes(pixels))
    else:  # shards: shard s holds samples [s * per_shard, (s + 1) * per_shard), shard s on rank s mod world
        n_shards = -(-g.num // g.samples_per_shard)
        # What a shard depends on: a finished shard made from the same models and settings is skipped.
        source = {"mode": g.mode, "seed": cfg.seed, "samples_per_shard": g.samples_per_shard,
                  "models": [records.sha256_of(cfg.layout.model(s))
                             for s in (TRAINING_STAGES if g.mode == "stage2" else ("stage1",))]}
        for s in range(info.rank, n_shards, info.world_size):
            indices = list(range(s * g.samples_per_shard, min((s + 1) * g.samples_per_shard, g.num)))
            done_url = storage.join(out, "samples", f"shard-{s:06d}.tar.done")
            if _is_done(done_url, source, len(indices)):
                continue
            samples = []
            for start in range(0, len(indices), g.batch_size):
                chunk = indices[start:start + g.batch_size]
                pixels = images(chunk)
                samples += [(f"sample-{i:08d}", {"png": encode_image(p)}) for i, p in zip(chunk, pixels, strict=True)]
            count, sha = write_shard(storage.join(out, "samples", f"shard-{s:06d}.tar"), samples)
            storage.write_text_atomic(done_url, json.dumps({"count": count, "sha256": sha, "source": source}))
        dist.barrier()
        if info.is_main:
            shards = []
            for s in range(n_shards):
                marker = json.loads(storage.read_text(storage.join(out, "samples", f"shard-{s:06d}.tar.done")))
                shards.append({"name": f"samples/shard-{s:06d}.tar", "count": marker["count"],
                               "sha256": marker["sha256"]})
            finish_dataset(out, name=f"{cfg.dataset.name}-{g.mode}-samples", kind="image",
                           shape=[cfg.dataset.channels, cfg.dataset.resolution, cfg.dataset.resolution],
                           splits={"samples": {"count": g.num, "shards": shards}},
                           source={"run_dir": cfg.run_dir, "mode": g.mode, "seed": cfg.seed,
                                   "model": records.artifact(cfg.layout.model("stage1"))})
    dist.barrier()
    return out
