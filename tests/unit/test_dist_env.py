"""How `dist` reads its launcher from the environment: plain process, torchrun/submitit, Slurm's srun.

Every test starts from an environment with no launcher variables (monkeypatch restores the real one,
including what `_read_environment` exports), and `scontrol` is faked: nothing here needs Slurm or a
process group.
"""

from __future__ import annotations

import datetime
import os
import subprocess

import pytest
import torch

from tsvae_dist.errors import ConfigError
from tsvae_dist.runtime import RENDEZVOUS_FILE_VAR, dist
from tsvae_dist.runtime.dist import DistInfo, _env_int, _read_environment, _slurm_master_addr

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID", RENDEZVOUS_FILE_VAR)


@pytest.fixture(autouse=True)
def bare_environment(monkeypatch):
    """No launcher or Slurm variables; undone after the test, whatever the code under test exported."""
    for name in LAUNCHER_VARS:
        # setenv first, so monkeypatch records the variable's state and removes what the code exports
        # (a MASTER_ADDR left behind breaks later tests' submitit jobs); delenv of an absent one records nothing.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


class FakeScontrol:
    """Stands in for `subprocess.run` in dist: records the commands, answers `scontrol show hostnames`."""

    def __init__(self, hostnames: list[str] | None = None, error: BaseException | None = None):
        self.hostnames = hostnames or ["node-a", "node-b"]
        self.error = error
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        if self.error is not None:
            raise self.error
        assert kwargs.get("check") is True  # a failing scontrol must not give an empty master address
        return subprocess.CompletedProcess(cmd, 0, stdout="".join(h + "\n" for h in self.hostnames), stderr="")


@pytest.fixture
def scontrol(monkeypatch) -> FakeScontrol:
    fake = FakeScontrol()
    monkeypatch.setattr(dist.subprocess, "run", fake)
    return fake


def set_env(monkeypatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def torchrun_env(monkeypatch, rank: int, world: int, local: int | None = None) -> None:
    set_env(monkeypatch, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    if local is not None:
        monkeypatch.setenv("LOCAL_RANK", str(local))


def slurm_env(monkeypatch, procid: int, ntasks: int, localid: int = 0, job_id: str = "123456",
              nodelist: str = "gpu[01-02]") -> None:
    set_env(monkeypatch, SLURM_PROCID=str(procid), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(localid),
            SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist)


# ---------------------------------------------------------------------------------------------
# _env_int


def test_env_int_unset_and_empty_are_none(monkeypatch):
    """Unset and empty variables both mean "not given" (a launcher may export RANK= empty)."""
    assert _env_int("RANK") is None
    monkeypatch.setenv("RANK", "")
    assert _env_int("RANK") is None


@pytest.mark.parametrize(("raw", "value"), [("0", 0), ("7", 7), ("12345", 12345)])
def test_env_int_parses_decimal(monkeypatch, raw, value):
    monkeypatch.setenv("LOCAL_RANK", raw)
    assert _env_int("LOCAL_RANK") == value


# ---------------------------------------------------------------------------------------------
# Plain process and torchrun


def test_plain_process_is_rank_0_of_1(scontrol):
    """Nothing set: a single process, rank 0 of 1, nothing exported and no scontrol call."""
    assert _read_environment() == (0, 1, 0)
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert scontrol.calls == []


def test_empty_variables_are_a_plain_process(monkeypatch):
    """RANK and WORLD_SIZE exported empty count as unset, not as half a torchrun environment."""
    set_env(monkeypatch, RANK="", WORLD_SIZE="", LOCAL_RANK="")
    assert _read_environment() == (0, 1, 0)


def test_torchrun_environment(monkeypatch):
    """RANK, WORLD_SIZE and LOCAL_RANK are taken as they are when the rendezvous is given."""
    torchrun_env(monkeypatch, rank=3, world=8, local=1)
    assert _read_environment() == (3, 8, 1)


def test_torchrun_without_local_rank_is_local_rank_0(monkeypatch):
    torchrun_env(monkeypatch, rank=2, world=4)
    assert _read_environment() == (2, 4, 0)


def test_single_process_torchrun_needs_no_rendezvous(monkeypatch):
    """WORLD_SIZE=1 is a single process: no MASTER_ADDR/MASTER_PORT needed."""
    set_env(monkeypatch, RANK="0", WORLD_SIZE="1")
    assert _read_environment() == (0, 1, 0)


def test_torchrun_variables_win_over_slurm(monkeypatch, scontrol):
    """torchrun started inside a Slurm allocation: its variables decide, Slurm's are not consulted."""
    slurm_env(monkeypatch, procid=0, ntasks=2)
    torchrun_env(monkeypatch, rank=5, world=8, local=1)
    assert _read_environment() == (5, 8, 1)
    assert scontrol.calls == []
    assert os.environ["RANK"] == "5" and os.environ["MASTER_ADDR"] == "10.0.0.1"


@pytest.mark.parametrize(("given", "missing"), [("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")])
def test_rank_and_world_size_come_together(monkeypatch, given, missing):
    """Half a torchrun environment is a ConfigError naming the missing variable, not a single process."""
    set_env(monkeypatch, MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    monkeypatch.setenv(given, "2")
    with pytest.raises(ConfigError, match=missing):
        _read_environment()


def test_empty_world_size_beside_rank_is_half_set(monkeypatch):
    """WORLD_SIZE exported empty next to a RANK is still half a torchrun environment."""
    set_env(monkeypatch, RANK="1", WORLD_SIZE="")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        _read_environment()


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_several_processes_need_the_rendezvous(monkeypatch, missing):
    """WORLD_SIZE > 1 without MASTER_ADDR or MASTER_PORT is a ConfigError naming it."""
    torchrun_env(monkeypatch, rank=0, world=2)
    monkeypatch.delenv(missing)
    with pytest.raises(ConfigError, match=missing):
        _read_environment()


def test_empty_master_addr_is_missing(monkeypatch):
    torchrun_env(monkeypatch, rank=0, world=2)
    monkeypatch.setenv("MASTER_ADDR", "")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        _read_environment()


@pytest.mark.parametrize("name", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_non_integer_variable_is_a_config_error_naming_it(monkeypatch, name):
    """RANK=one (or WORLD_SIZE, LOCAL_RANK) is a ConfigError naming the variable."""
    torchrun_env(monkeypatch, rank=0, world=2, local=0)
    monkeypatch.setenv(name, "one")
    with pytest.raises(ConfigError, match=name):
        _read_environment()


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (5, 4), (-1, 2), (0, 0)])
def test_rank_outside_the_world_is_a_config_error(monkeypatch, rank, world):
    """0 <= RANK < WORLD_SIZE, WORLD_SIZE >= 1; anything else is a ConfigError naming RANK or WORLD_SIZE."""
    torchrun_env(monkeypatch, rank=rank, world=world)
    with pytest.raises(ConfigError, match="RANK|WORLD_SIZE"):
        _read_environment()


def test_negative_local_rank_is_a_config_error(monkeypatch):
    torchrun_env(monkeypatch, rank=0, world=2, local=-1)
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        _read_environment()


# ---------------------------------------------------------------------------------------------
# Slurm (srun without submitit)


def test_slurm_single_task(monkeypatch, scontrol):
    """One Slurm task: rank 0 of 1, RANK/WORLD_SIZE exported for loader workers, no rendezvous looked up."""
    slurm_env(monkeypatch, procid=0, ntasks=1)
    assert _read_environment() == (0, 1, 0)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1")
    assert "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ
    assert scontrol.calls == []


def test_slurm_tasks_derive_the_rendezvous(monkeypatch, scontrol):
    """srun tasks: rank from SLURM_PROCID, world from SLURM_NTASKS, local rank from SLURM_LOCALID; the
    master is the first host of the job's node list and the port 20000 + job id mod 20000."""
    slurm_env(monkeypatch, procid=5, ntasks=8, localid=1, job_id="123456", nodelist="gpu[01-02]")
    scontrol.hostnames = ["gpu01", "gpu02"]
    assert _read_environment() == (5, 8, 1)
    assert scontrol.calls == [["scontrol", "show", "hostnames", "gpu[01-02]"]]
    assert os.environ["MASTER_ADDR"] == "gpu01"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000) == "23456"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("5", "8")


def test_every_slurm_task_agrees_on_the_rendezvous(monkeypatch, scontrol):
    """Each task computes the master address and port by itself: all must get the same ones."""
    seen = set()
    for procid in range(4):
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)
        slurm_env(monkeypatch, procid=procid, ntasks=4, localid=procid % 2, job_id="77")
        assert _read_environment() == (procid, 4, procid % 2)
        seen.add((os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]))
    assert seen == {("node-a", "20077")}


def test_slurm_keeps_a_given_rendezvous(monkeypatch, scontrol):
    """MASTER_ADDR/MASTER_PORT already exported (by a wrapper script) are kept, not overwritten."""
    slurm_env(monkeypatch, procid=1, ntasks=2)
    set_env(monkeypatch, MASTER_ADDR="10.1.2.3", MASTER_PORT="31000")
    assert _read_environment() == (1, 2, 0)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.1.2.3", "31000")


def test_slurm_without_job_id_uses_port_20000(monkeypatch, scontrol):
    slurm_env(monkeypatch, procid=0, ntasks=2)
    monkeypatch.delenv("SLURM_JOB_ID")
    _read_environment()
    assert os.environ["MASTER_PORT"] == "20000"


def test_slurm_without_localid_is_local_rank_0(monkeypatch, scontrol):
    slurm_env(monkeypatch, procid=3, ntasks=4)
    monkeypatch.delenv("SLURM_LOCALID")
    assert _read_environment() == (3, 4, 0)


def test_half_set_slurm_ntasks_alone_is_a_plain_process(monkeypatch, scontrol):
    """SLURM_NTASKS without SLURM_PROCID (a batch script's environment, outside srun) is not a task:
    a plain single process."""
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert _read_environment() == (0, 1, 0)
    assert scontrol.calls == []


def test_a_batch_script_without_ntasks_is_a_plain_process(monkeypatch, scontrol):
    """sbatch without --ntasks sets SLURM_PROCID=0 and no SLURM_NTASKS in the batch script: one process."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _read_environment() == (0, 1, 0)
    assert scontrol.calls == []


def test_slurm_procid_without_ntasks_is_a_config_error(monkeypatch, scontrol):
    """Slurm task 3 without a task count cannot be placed: a ConfigError naming SLURM_NTASKS."""
    monkeypatch.setenv("SLURM_PROCID", "3")
    with pytest.raises(ConfigError, match="SLURM_NTASKS"):
        _read_environment()


def test_slurm_procid_outside_ntasks_is_a_config_error(monkeypatch, scontrol):
    slurm_env(monkeypatch, procid=4, ntasks=4)
    with pytest.raises(ConfigError, match="SLURM_PROCID|SLURM_NTASKS"):
        _read_environment()


@pytest.mark.parametrize("name", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"])
def test_non_integer_slurm_variable_is_a_config_error_naming_it(monkeypatch, scontrol, name):
    slurm_env(monkeypatch, procid=1, ntasks=2)
    monkeypatch.setenv(name, "x1")
    with pytest.raises(ConfigError, match=name):
        _read_environment()
    assert scontrol.calls == []


def test_given_master_addr_needs_no_scontrol(monkeypatch):
    """With MASTER_ADDR exported, Slurm detection must not need `scontrol` (absent in many containers)."""
    monkeypatch.setattr(dist.subprocess, "run", FakeScontrol(error=FileNotFoundError("scontrol")))
    slurm_env(monkeypatch, procid=1, ntasks=2)
    set_env(monkeypatch, MASTER_ADDR="10.1.2.3", MASTER_PORT="31000")
    assert _read_environment() == (1, 2, 0)


def test_slurm_detection_read_twice_gives_the_same_answer(monkeypatch, scontrol):
    """Reading the environment again after Slurm detection (what exported variables feed) agrees."""
    slurm_env(monkeypatch, procid=5, ntasks=8, localid=1)
    first = _read_environment()
    assert first == (5, 8, 1)
    assert _read_environment() == first


# ---------------------------------------------------------------------------------------------
# _slurm_master_addr


def test_master_addr_is_the_first_host_of_the_job_node_list(monkeypatch, scontrol):
    """SLURM_JOB_NODELIST (preferred over SLURM_NODELIST) is expanded by scontrol; the first host wins."""
    set_env(monkeypatch, SLURM_JOB_NODELIST="cn[7-9]", SLURM_NODELIST="other[1-2]")
    scontrol.hostnames = ["cn7", "cn8", "cn9"]
    assert _slurm_master_addr() == "cn7"
    assert scontrol.calls == [["scontrol", "show", "hostnames", "cn[7-9]"]]


def test_master_addr_falls_back_to_slurm_nodelist(monkeypatch, scontrol):
    monkeypatch.setenv("SLURM_NODELIST", "n[1-2]")
    scontrol.hostnames = ["n1", "n2"]
    assert _slurm_master_addr() == "n1"
    assert scontrol.calls == [["scontrol", "show", "hostnames", "n[1-2]"]]


def test_master_addr_without_a_node_list_is_loopback(monkeypatch, scontrol):
    """No node list (srun on a login node, a test): loopback, without calling scontrol."""
    monkeypatch.setenv("SLURM_JOB_NODELIST", "")
    assert _slurm_master_addr() == "127.0.0.1"
    assert scontrol.calls == []


def test_failing_scontrol_is_not_an_empty_address(monkeypatch):
    """A failing scontrol raises (check=True) rather than yielding an empty or made-up master address."""
    monkeypatch.setattr(dist.subprocess, "run",
                        FakeScontrol(error=subprocess.CalledProcessError(1, ["scontrol"], stderr="no")))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    with pytest.raises(subprocess.CalledProcessError):
        _slurm_master_addr()


# ---------------------------------------------------------------------------------------------
# init


@pytest.fixture
def no_process_group(monkeypatch) -> list[dict]:
    """Records init_process_group calls instead of making a process group; none is initialised."""
    calls: list[dict] = []
    monkeypatch.setattr(dist.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.torch_dist, "init_process_group", lambda **kw: calls.append(kw))
    return calls


def test_init_single_process_on_cpu(no_process_group):
    """A plain process: DistInfo(rank 0 of 1, local 0, cpu), main, not distributed, no process group."""
    info = dist.init(use_gpu=False)
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.distributed
    assert no_process_group == []


def test_init_detects_cpu_when_no_gpu(monkeypatch, no_process_group):
    """use_gpu=None asks torch whether CUDA is there; without it the device is the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.init().device == torch.device("cpu")


def test_init_single_process_needs_no_real_process_group():
    """Unpatched: a single process never touches torch.distributed, so it leaves no group behind."""
    info = dist.init(use_gpu=False)
    assert (info.rank, info.world_size) == (0, 1)
    assert not torch.distributed.is_initialized()


def test_init_several_processes_make_a_gloo_group_on_cpu(monkeypatch, no_process_group):
    """WORLD_SIZE > 1 on CPU: one gloo group with this rank, the world size and the timeout."""
    torchrun_env(monkeypatch, rank=1, world=4, local=1)
    info = dist.init(use_gpu=False, timeout_s=42)
    assert info == DistInfo(rank=1, world_size=4, local_rank=1, device=torch.device("cpu"))
    assert info.distributed and not info.is_main
    assert no_process_group == [{"backend": "gloo", "init_method": None, "rank": 1, "world_size": 4,
                                 "timeout": datetime.timedelta(seconds=42)}]


def test_init_meets_through_the_rendezvous_file_when_one_is_given(monkeypatch, no_process_group, tmp_path):
    """The local launcher's jobs name a file to meet through; MASTER_ADDR/PORT are then not used."""
    torchrun_env(monkeypatch, rank=0, world=3)
    monkeypatch.setenv(RENDEZVOUS_FILE_VAR, str(tmp_path / "rendezvous-1"))
    dist.init(use_gpu=False, timeout_s=42)
    assert [call["init_method"] for call in no_process_group] == [f"file://{tmp_path / 'rendezvous-1'}"]


def test_init_is_idempotent_once_the_group_exists(monkeypatch, no_process_group):
    """A second init with the group already initialised makes no second group."""
    torchrun_env(monkeypatch, rank=0, world=2)
    monkeypatch.setattr(dist.torch_dist, "is_initialized", lambda: True)
    assert dist.init(use_gpu=False).world_size == 2
    assert no_process_group == []


def test_init_refuses_a_half_set_environment_before_any_group(monkeypatch, no_process_group):
    """A half-set environment fails in init with the ConfigError, before any process group is tried."""
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        dist.init(use_gpu=False)
    assert no_process_group == []


def test_dist_info_is_frozen():
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(AttributeError):
        info.rank = 1
