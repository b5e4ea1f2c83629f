"""Every conf/ variant composes and validates; bad values fail before any job, naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tsvae_dist.cli import CONF_DIR, compose
from tsvae_dist.config import RunConfig, stage_cluster, validate
from tsvae_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def group_options() -> list[tuple[str, str]]:
    return [(group.name, f.stem) for group in sorted(CONF_DIR.iterdir()) if group.is_dir()
            for f in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_conf_variant_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "model" and option == "wae":
        overrides.append("dataset=celeba64")  # WAE's networks are the paper's 64-px CelebA ones
    if group == "cluster" and option != "local":
        overrides += ["cluster.gpus_per_node=0"]
    cfg = compose(overrides)
    assert isinstance(cfg, RunConfig)


def test_dataset_presets_pick_the_papers_settings() -> None:
    cfg = compose(["dataset=celeba128"])
    assert (cfg.dataset.resolution, cfg.model.family, cfg.model.latent_dim) == (128, "resnet", 128)
    assert cfg.eval.fid == "required"
    cifar = compose(["dataset=cifar10"])
    assert (cifar.stage1.epochs, cifar.stage2.epochs) == (1000, 2000)
    mnist = compose(["dataset=mnist"])
    assert (mnist.dataset.channels, mnist.dataset.resolution, mnist.stage1.epochs) == (1, 28, 400)
    # The command line wins over a preset's choices.
    assert compose(["dataset=celeba128", "model=infogan"]).model.family == "infogan"


def test_nodes_shorthand_sets_cluster_nodes() -> None:
    assert compose(["nodes=1"]).cluster.nodes == 1
    with pytest.raises(ConfigError, match="nodes"):
        compose(["nodes=0"])


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        (["dataset.name=imagenet"], "dataset.name"),
        (["model=wae", "dataset.resolution=28", "dataset.channels=1"], "resolution"),
        (["stage1.batch_size=63"], "stage1.batch_size"),
        (["stage2.precision=fp8"], "stage2.precision"),
        (["stage1.stop_check_every_steps=0"], "stage1.stop_check_every_steps"),
        (["stage2.checkpoint_every_min=-1"], "stage2.checkpoint_every_min"),
        (["eval.fid=sometimes"], "eval.fid"),
        (["cluster.tasks_per_node=0"], "tasks_per_node"),
    ],
)
def test_bad_values_are_named(overrides: list[str], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        compose(overrides)


def test_stage_overrides_apply_per_stage() -> None:
    cfg = compose(["+cluster.stage_overrides={evaluate: {tasks_per_node: 1}}"])
    assert stage_cluster(cfg.cluster, "evaluate").tasks_per_node == 1
    assert stage_cluster(cfg.cluster, "stage1").tasks_per_node == 2
    cfg.cluster.stage_overrides = {"evaluate": {"gpus": 1}}
    with pytest.raises(ConfigError, match="cluster.stage_overrides.evaluate"):
        validate(cfg)


@pytest.mark.integration  # starts processes
def test_submit_refuses_bad_config_before_anything_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch/submit.py", f"run_dir={run_dir}", "stage1.batch_size=63"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stage1.batch_size" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert not run_dir.exists()


@pytest.mark.integration  # starts processes
def test_dry_run_shows_the_plan(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "launch/submit.py", f"run_dir={tmp_path / 'run'}", "action=dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for stage in ("stage1", "encode", "stage2", "evaluate"):
        assert stage in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("report: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration  # starts processes
def test_cfg_job_prints_the_composed_config() -> None:
    proc = subprocess.run([sys.executable, "launch/submit.py", "--cfg", "job", "dataset=celeba64"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resolution: 64" in proc.stdout and "stage1:" in proc.stdout and "cluster:" in proc.stdout
