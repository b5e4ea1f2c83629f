"""The run configuration: typed dataclasses, registered as hydra structured configs.

Each component owns its dataclass (`ModelConfig` in `models.config`, `DatasetConfig` and `LoaderConfig`
in `data.config`); this module composes them into `RunConfig` and validates the whole before any job
is submitted. The yaml files in `conf/` carry values only. Importing it loads no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from tsvae_dist import storage
from tsvae_dist.data.config import DatasetConfig, LoaderConfig
from tsvae_dist.errors import ConfigError
from tsvae_dist.layout import AGGREGATE, STAGES, RunLayout
from tsvae_dist.models.config import GAMMA_MODES, ModelConfig

DATASETS = ("synthetic", "mnist", "fashion", "cifar10", "celeba64", "celeba128", "celeba256", "celebahq128", "folder")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
LR_SCALINGS = ("none", "linear", "sqrt")


@dataclass
class TrainConfig:
    """One training stage (stage 1 or stage 2): optimisation, schedule, precision, checkpoints."""

    batch_size: int = 64  # the *global* batch (the paper's); each rank gets batch_size / world_size
    epochs: int = 400  # passes over the training split (the paper: 400 stage 1, 800 stage 2)
    lr: float = 1e-4  # Adam learning rate at the start
    batch_gpu: int = 0  # samples per forward pass on each rank (EDM2's batch_gpu); 0 = batch_size / world. Below
    # that, each step accumulates gradients over batch_size / (batch_gpu x world) rounds: the same update
    lr_scaling: str = "none"  # none | linear | sqrt: lr is scaled by (batch_size / lr_reference_batch)^{1, 1/2}
    lr_reference_batch: int = 64  # the batch `lr` is tuned for (the paper's 64)
    warmup_steps: int = 0  # linear lr warmup over this many optimizer steps (0 = none, as in the paper)
    lr_halve_every_epochs: int = 150  # step schedule: lr halves every this many epochs (paper: 150 / 300)
    adam_beta1: float = 0.9  # Adam's beta1 (TF default, as in the paper's code)
    adam_beta2: float = 0.999  # Adam's beta2
    adam_eps: float = 1e-8  # Adam's epsilon
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto (bf16 on CUDA, fp32 on CPU) autocast; loss terms with
    # γ are always fp32. Checkpoints record the resolved value, so a resume on another device kind is refused
    memory_format: str = "auto"  # auto (channels_last for conv models on CUDA, else contiguous) | channels_last |
    # contiguous: the layout of the model's weights and image batches; checkpoints record the resolved value
    compile: bool = False  # opt-in: torch.compile the model's forward (faster steps after a compile per shape;
    # off by default because the compile time and compiler availability vary by machine)
    gamma: str = "learned"  # decoder std γ (γ_x / γ_z): learned (the paper: trained log γ, from 0) | optimal
    # (σ-VAE's closed form: γ² = the batch's MSE per dimension, no gradient through γ; log_gamma then
    # holds the bias-corrected EMA of it, for the report and stage-2 sampling; see models/gamma.py)
    gamma_lr: float = 0.0  # learned γ only: Adam learning rate of log γ, its own param group, on the same
    # halving schedule (0 = lr). A learned log γ moves about one learning rate per step.
    sync_bn: str = "auto"  # on | off | auto (on when the per-rank batch is below 64 and world > 1)
    deterministic: bool = False  # GPU: deterministic kernels, no cuDNN autotuning (bit-exact resume on CUDA;
    # slower convolutions). CPU training is deterministic either way
    tf32: bool = False  # GPU: TF32 matmuls and convolutions (faster on Ampere+, ~1e-3 relative rounding)
    checkpoint_every_steps: int = 500  # save a resumable checkpoint every this many optimizer steps
    checkpoint_every_min: float = 0.0  # also save when this many minutes passed since the last save (0 = off);
    # rank 0's clock decides, shared at the stop checks, so every rank saves the same step
    keep_checkpoints: int = 2  # committed checkpoints kept (>= 2: the previous survives a bad write)
    log_every_steps: int = 50  # metrics line (JSON + TensorBoard) every this many steps
    stop_check_every_steps: int = 10  # ranks agree on a stop signal (and the checkpoint timer) every this many
    # steps: one host sync each time. A stop lands on the same step on every rank, so results do not change;
    # a preempted job stops at most this many steps after the signal
    progress_bar: bool = True  # tqdm bar on rank 0 (off in batch jobs that log to files)
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # streaming data loader settings


@dataclass
class EvalConfig:
    """The encode and evaluate stages: how much to measure, FID, and how the work is chunked."""

    batch_size: int = 256  # images per forward pass on each rank (encoding, evaluation, sampling); fixes the
    # chunks work is done in, so results do not depend on the world size
    num_samples: int = 10_000  # generated samples per FID set (the paper: 10,000)
    num_test: int = 10_000  # test images for reconstructions / reference statistics (capped by the split)
    grid_images: int = 64  # images in each PNG sample grid
    active_var_threshold: float = 0.1  # a latent dim is active when its mean posterior variance is below this
    fid: str = "auto"  # auto (FID when weights are available, else say why in the report) | required | off
    inception_weights: str = ""  # path or URL of pt_inception-2015-12-05-6726825d.pth ("" = none)
    inception_sha256: str = ""  # expected SHA-256 of the weights ("" = taken from the file name's suffix)
    cache_dir: str = ".cache/tsvae"  # where downloaded weights and reference statistics are cached
    workers: int = 2  # processes per rank decoding image shards ahead of the encoder/evaluator (0 = inline)
    checkpoint_every_s: float = 300.0  # evaluation saves its partial sums at most this often (0 = every unit)


@dataclass
class GenerateConfig:
    """`python -m tsvae_dist.generate`: samples from a finished run, on their own."""

    mode: str = "stage2"  # stage2 (the Two-Stage VAE) | stage1 (z ~ N(0, I) into the decoder: the baseline)
    num: int = 64  # number of samples; sample i is the same whatever the world or batch size
    format: str = "png"  # png (one file per sample) | shards (WebDataset tar shards + manifest)
    out: str = ""  # output URL; "" = <run_dir>/generate/<mode>
    batch_size: int = 256  # samples decoded at once per rank
    samples_per_shard: int = 1000  # format=shards: samples per tar shard


@dataclass
class ClusterConfig:
    """Where the stage jobs run. Cluster facts (partitions, accounts) live in conf/cluster/*.yaml."""

    name: str = "local"  # local (submitit's local executor) | slurm
    nodes: int = 1  # nodes per distributed stage
    tasks_per_node: int = 2  # processes per node (one per GPU when gpus_per_node > 0)
    gpus_per_node: int = 0  # GPUs per node; 0 = CPU training with gloo
    cpus_per_task: int = 1  # CPU cores per process (data loader workers run inside)
    partition: str = ""  # Slurm partition ("" = the cluster default)
    account: str = ""  # Slurm account ("" = none)
    qos: str = ""  # Slurm QOS ("" = none)
    constraint: str = ""  # Slurm --constraint ("" = none)
    mem_gb: int = 0  # memory per node in GB (0 = the cluster default)
    time_min: int = 60  # wall-clock limit per job in minutes; a job that reaches it is requeued
    signal_delay_s: int = 120  # the preemption/time-limit signal comes this many seconds early
    max_requeues: int = 20  # give up after this many requeues of one stage
    extra_sbatch: dict[str, Any] = field(default_factory=dict)  # further sbatch options, key -> value
    stage_overrides: dict[str, Any] = field(default_factory=dict)  # per stage: {evaluate: {nodes: 1}}
    poll_s: float = 1.0  # how often the launcher polls job states
    init_timeout_s: float = 1800.0  # collective timeout from process-group start until training's first step
    # (which compiles, warms up and starts the loaders, at each rank's own pace) and in the other stages
    collective_timeout_s: float = 300.0  # collective timeout after training's first step: a rank waiting
    # this long for a dead or stuck peer fails, ending the job (0 = keep init_timeout_s)
    wait: bool = True  # slurm: follow the jobs to the end, printing progress; false: submit and return
    node_gpus: int = -1  # GPUs per node of this cluster: 0 = a CPU-only cluster, -1 = unknown (unchecked)
    setup: list[str] = field(default_factory=list)  # slurm: shell lines each job runs first (module load...)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"  # URL of the run directory: configs, checkpoints, artifacts, report
    data_root: str = ".cache/data"  # URL under which datasets without an explicit root live
    seed: int = 0  # seeds initialisation, data order and every noise draw
    seeds: int = 1  # runs of the pipeline, reported as the paper does (mean ± std): N > 1 runs <run_dir>/seed-<k>/
    # with seed + k (k < N), then the aggregate job (<run_dir>/aggregate/report.json, report.md); 1 = run_dir itself
    action: str = "run"  # run | dry_run | status | cancel
    nodes: int = 1  # shorthand for cluster.nodes (`nodes=4` on the command line)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: TrainConfig = field(default_factory=lambda: TrainConfig(precision="auto"))
    # Stage 2 is fp32: dense layers on 64-sample batches gain nothing from autocast, and γ_z → 0 fast.
    stage2: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=800, lr_halve_every_epochs=300, batch_size=64, precision="fp32")
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def layout(self) -> RunLayout:
        """Every path of the run."""
        return RunLayout(self.run_dir)

    def for_seed(self, k: int) -> RunConfig:
        """The k-th run of a `seeds` > 1 run: its own run directory `<run_dir>/seed-<k>`, seed `seed + k`."""
        return dataclasses.replace(self, run_dir=self.layout.seed_dir(k), seed=self.seed + k, seeds=1)

    @property
    def dataset_root(self) -> str:
        return self.dataset.root or storage.join(self.data_root, self.dataset.name)

    def world_size(self, stage: str) -> int:
        """Processes of a stage's job: nodes x tasks per node, after per-stage overrides."""
        c = stage_cluster(self.cluster, stage)
        return c.nodes * c.tasks_per_node


def stage_cluster(cluster: ClusterConfig, stage: str) -> ClusterConfig:
    """The cluster settings of one stage: the defaults with `stage_overrides[stage]` applied. The aggregate
    job (reading a few report.json files) is always one process on one node, without GPUs."""
    overrides = dict(cluster.stage_overrides.get(stage, {}) or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ClusterConfig)}
    if unknown:
        raise ConfigError(f"cluster.stage_overrides.{stage}: unknown keys {sorted(unknown)}")
    if stage == AGGREGATE:
        overrides.update(nodes=1, tasks_per_node=1, gpus_per_node=0)
    return dataclasses.replace(cluster, stage_overrides={}, **overrides)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_train(cfg: TrainConfig, name: str, world: int) -> None:
    _check(cfg.batch_size > 0, f"{name}.batch_size: must be positive, got {cfg.batch_size}")
    _check(
        cfg.batch_size % world == 0,
        f"{name}.batch_size: {cfg.batch_size} is not divisible by the world size {world} "
        "(cluster.nodes x cluster.tasks_per_node)",
    )
    _check(cfg.batch_gpu >= 0, f"{name}.batch_gpu: must be >= 0 (0 = batch_size / world), got {cfg.batch_gpu}")
    _check(cfg.batch_gpu == 0 or cfg.batch_size % (cfg.batch_gpu * world) == 0,
           f"{name}.batch_gpu: batch_size {cfg.batch_size} is not batch_gpu {cfg.batch_gpu} x world {world} "
           "x a whole number of accumulation rounds")
    _check(cfg.lr_scaling in LR_SCALINGS, f"{name}.lr_scaling: {cfg.lr_scaling!r} is not one of {LR_SCALINGS}")
    _check(cfg.lr_reference_batch > 0, f"{name}.lr_reference_batch: must be positive, got {cfg.lr_reference_batch}")
    _check(cfg.warmup_steps >= 0, f"{name}.warmup_steps: must be >= 0, got {cfg.warmup_steps}")
    _check(cfg.epochs > 0, f"{name}.epochs: must be positive, got {cfg.epochs}")
    _check(cfg.lr > 0, f"{name}.lr: must be positive, got {cfg.lr}")
    _check(cfg.lr_halve_every_epochs > 0, f"{name}.lr_halve_every_epochs: must be positive")
    _check(cfg.precision in PRECISIONS, f"{name}.precision: {cfg.precision!r} is not one of {PRECISIONS}")
    _check(cfg.memory_format in MEMORY_FORMATS,
           f"{name}.memory_format: {cfg.memory_format!r} is not one of {MEMORY_FORMATS}")
    _check(cfg.gamma in GAMMA_MODES, f"{name}.gamma: {cfg.gamma!r} is not one of {GAMMA_MODES}")
    _check(cfg.gamma_lr >= 0, f"{name}.gamma_lr: must be >= 0 (0 = lr), got {cfg.gamma_lr}")
    _check(cfg.gamma_lr == 0 or cfg.gamma == "learned",
           f"{name}.gamma_lr: {cfg.gamma_lr} is set but {name}.gamma is {cfg.gamma!r}: only a learned γ has a rate")
    _check(cfg.sync_bn in ("on", "off", "auto"), f"{name}.sync_bn: {cfg.sync_bn!r} is not on|off|auto")
    _check(cfg.checkpoint_every_steps > 0, f"{name}.checkpoint_every_steps: must be positive")
    _check(cfg.keep_checkpoints >= 2, f"{name}.keep_checkpoints: must be >= 2 so a bad write loses nothing")
    _check(cfg.log_every_steps > 0, f"{name}.log_every_steps: must be positive")
    _check(cfg.stop_check_every_steps > 0, f"{name}.stop_check_every_steps: must be positive")
    _check(cfg.checkpoint_every_min >= 0, f"{name}.checkpoint_every_min: must be >= 0 (0 = off)")
    try:
        cfg.loader.validate(cfg.batch_size, world)
    except ConfigError as e:
        raise ConfigError(f"{name}.loader.{e}") from None


def validate(cfg: RunConfig) -> None:
    """Check the whole configuration; raise ConfigError naming the first bad setting."""
    _check(cfg.dataset.name in DATASETS, f"dataset.name: unknown dataset {cfg.dataset.name!r}; one of {DATASETS}")
    _check(cfg.dataset.channels in (1, 3), f"dataset.channels: must be 1 or 3, got {cfg.dataset.channels}")
    _check(cfg.action in ("run", "dry_run", "status", "cancel"), f"action: unknown action {cfg.action!r}")
    _check(bool(cfg.run_dir), "run_dir: must be set")
    _check(isinstance(cfg.seeds, int) and cfg.seeds >= 1, f"seeds: must be an integer >= 1, got {cfg.seeds}")
    cfg.model.validate(cfg.dataset.channels, cfg.dataset.resolution)

    c = cfg.cluster
    _check(c.name in ("local", "slurm"), f"cluster.name: {c.name!r} is not local|slurm")
    for stage in STAGES:
        sc = stage_cluster(c, stage)
        where = f"cluster.stage_overrides.{stage}" if stage in c.stage_overrides else "cluster"
        _check(sc.nodes >= 1, f"{where}.nodes: must be >= 1, got {sc.nodes}")
        _check(sc.tasks_per_node >= 1, f"{where}.tasks_per_node: must be >= 1, got {sc.tasks_per_node}")
        _check(sc.gpus_per_node >= 0, f"{where}.gpus_per_node: must be >= 0")
        _check(
            sc.gpus_per_node == 0 or sc.tasks_per_node == sc.gpus_per_node,
            f"{where}.tasks_per_node: must equal gpus_per_node ({sc.gpus_per_node}): one task per GPU",
        )
        _check(c.name == "slurm" or sc.nodes == 1, f"{where}.nodes: cluster=local runs on one node")
        _check(
            c.node_gpus < 0 or sc.gpus_per_node <= c.node_gpus,
            f"{where}.gpus_per_node: {sc.gpus_per_node} GPU(s) requested but cluster.node_gpus is "
            f"{c.node_gpus}"
            + (" (a CPU-only cluster config: use gpus_per_node=0)" if c.node_gpus == 0 else ""),
        )
        _check(sc.cpus_per_task >= 1, f"{where}.cpus_per_task: must be >= 1, got {sc.cpus_per_task}")
        _check(sc.mem_gb >= 0, f"{where}.mem_gb: must be >= 0 (0 = the cluster default), got {sc.mem_gb}")
        _check(sc.time_min >= 1, f"{where}.time_min: must be >= 1 minute, got {sc.time_min}")
        _check(
            0 <= sc.signal_delay_s < sc.time_min * 60,
            f"{where}.signal_delay_s: must be in [0, time_min x 60 = {sc.time_min * 60}), "
            f"got {sc.signal_delay_s}",
        )
        _check(sc.max_requeues >= 0, f"{where}.max_requeues: must be >= 0, got {sc.max_requeues}")
        _check("dependency" not in sc.extra_sbatch,
               f"{where}.extra_sbatch.dependency: the launcher sets the dependencies between stages")
    _check(c.poll_s > 0, f"cluster.poll_s: must be positive, got {c.poll_s}")
    _check(c.init_timeout_s > 0, f"cluster.init_timeout_s: must be positive, got {c.init_timeout_s}")
    _check(c.collective_timeout_s >= 0,
           f"cluster.collective_timeout_s: must be >= 0 (0 = keep init_timeout_s), got {c.collective_timeout_s}")
    validate_train(cfg.stage1, "stage1", cfg.world_size("stage1"))
    validate_train(cfg.stage2, "stage2", cfg.world_size("stage2"))
    _check(cfg.stage1.gamma == "learned" or cfg.model.decoder == "gaussian",
           f"stage1.gamma: {cfg.stage1.gamma!r} needs model.decoder=gaussian (cross-entropy has no γ_x)")

    e = cfg.eval
    _check(e.fid in ("auto", "required", "off"), f"eval.fid: {e.fid!r} is not auto|required|off")
    _check(e.num_samples > 0, "eval.num_samples: must be positive")
    _check(e.num_test > 0, "eval.num_test: must be positive")
    _check(e.batch_size > 0, "eval.batch_size: must be positive")
    _check(e.grid_images > 0, "eval.grid_images: must be positive")
    _check(e.workers >= 0, f"eval.workers: must be >= 0 (0 = decode in the main process), got {e.workers}")
    _check(e.checkpoint_every_s >= 0, f"eval.checkpoint_every_s: must be >= 0, got {e.checkpoint_every_s}")
    g = cfg.generate
    _check(g.mode in ("stage1", "stage2"), f"generate.mode: {g.mode!r} is not stage1|stage2")
    _check(g.format in ("png", "shards"), f"generate.format: {g.format!r} is not png|shards")
    _check(g.num > 0, "generate.num: must be positive")
    _check(g.batch_size > 0, "generate.batch_size: must be positive")
    _check(g.samples_per_shard > 0, "generate.samples_per_shard: must be positive")


def to_container(cfg: RunConfig) -> dict[str, Any]:
    """A plain dict of primitives (for manifests, checkpoints and job pickles)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def schema_keys(schema: type = RunConfig, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of the schema -> whether it is open (a dict whose keys are free, e.g. extra_sbatch)."""
    out: dict[str, bool] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            out[key] = False
            out.update(schema_keys(hint, key + "."))
        else:
            out[key] = typing.get_origin(hint) is dict or hint is dict
    return out


def unknown_key_error(key: str) -> ConfigError:
    """`key` is not a setting: the error names it and the nearest valid one."""
    known = schema_keys()
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not near:  # a typo in the last part only: compare with the siblings
        parent, _, leaf = key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
        near = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)]
    hint = f"; did you mean {near[0]}?" if near else "; `python launch/submit.py --cfg job` lists the settings"
    return ConfigError(f"{key}: unknown setting{hint}")


def _check_known(data: Any, known: dict[str, bool], prefix: str = "") -> None:
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key == "hydra":
            continue
        if key not in known:
            raise unknown_key_error(key)
        if isinstance(v, dict) and not known[key]:
            _check_known(v, known, key + ".")


def from_container(data: Any) -> RunConfig:
    """Rebuild a typed RunConfig from a dict or DictConfig, with type checks from the schema.

    A key the schema does not have (`+stage1.epoch=3`) is a ConfigError naming it and the nearest
    valid key: OmegaConf would drop it silently.
    """
    plain = OmegaConf.to_container(data, resolve=False) if OmegaConf.is_config(data) else data
    _check_known(plain, schema_keys())
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: for naming the keys that differ between two configs."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}: the inverse of `flatten`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def register() -> None:
    """Register RunConfig with hydra's ConfigStore as the schema `base_config`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=RunConfig)
