"""Launch environment parsing and layout validation: no processes spawned, so these are fast."""

from __future__ import annotations

import dataclasses
import os

import pytest

from clusterlm.parallel.dims import ParallelDims
from clusterlm.errors import ConfigError
from clusterlm.models.config import get_preset
from clusterlm.cluster.slurm_text import expand_nodelist
from clusterlm.parallel.launch import DistEnv, read_env, torchrun_command
from clusterlm.parallel.dims import validate_layout


def test_expand_nodelist():
    """Slurm's compressed host lists expand as `scontrol show hostnames` prints them."""
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("gpu5,node[9-10],x") == ["gpu5", "node9", "node10", "x"]
    assert expand_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    for bad in ("node[01-", "node[3-1]", ""):
        with pytest.raises(ValueError):
            expand_nodelist(bad)


def test_read_env_torchrun_slurm_and_none():
    """torchrun's variables win over Slurm's; srun alone gives rank/size/local rank and the first host
    of the node list as master; no variables: one process."""
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NODELIST": "n[1-2]", "SLURM_STEP_ID": "0"}
    assert read_env(env) == DistEnv(3, 4, 1, "h0", 1234, "torchrun")
    slurm = {k: v for k, v in env.items() if k.startswith("SLURM")} | {"SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert read_env(slurm) == DistEnv(5, 8, 1, "n1", 29500, "slurm")
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}) == DistEnv()
    # an sbatch batch script: the job's SLURM_PROCID/NTASKS but no step id, one process (not rank 0 of 8)
    batch = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}
    assert read_env(batch) == DistEnv()
    assert read_env({}) == DistEnv() and not read_env({}).distributed
    with pytest.raises(ValueError, match="rank=4"):
        read_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="RANK='x'"):
        read_env({"RANK": "x", "WORLD_SIZE": "4"})


def test_read_env_ranks_on_this_node():
    """Processes sharing this node (its RAM, for the memory check): torchrun's LOCAL_WORLD_SIZE; under srun
    the largest count of SLURM_STEP_TASKS_PER_NODE ("2(x2),3" = 2, 2, 3 -> 3); 1 when not said."""
    assert read_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}).local_world_size == 2
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "7", "SLURM_STEP_ID": "0", "SLURM_NODELIST": "n[1-3]"}
    assert read_env(srun | {"SLURM_STEP_TASKS_PER_NODE": "2(x2),3"}).local_world_size == 3
    assert read_env(srun | {"SLURM_TASKS_PER_NODE": "4"}).local_world_size == 4
    assert read_env(srun).local_world_size == 1
    with pytest.raises(ValueError, match="local_world_size=5"):
        read_env({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "5"})


def test_threads_env_shares_the_cores_unless_set():
    """`clusterlm launch` gives each of N workers cores/N intra-op threads (torchrun alone would give 1),
    never fewer than 1, and leaves a user's OMP_NUM_THREADS alone."""
    from clusterlm.parallel.launch import threads_env

    cores = len(os.sched_getaffinity(0))
    assert threads_env(1, {}) == {"OMP_NUM_THREADS": str(cores)}
    assert threads_env(2, {}) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    assert threads_env(cores * 4, {}) == {"OMP_NUM_THREADS": "1"}
    assert threads_env(2, {"OMP_NUM_THREADS": "3"}) == {}
    assert threads_env(2, {"OMP_NUM_THREADS": ""}) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}  # unset $VAR


def test_torchrun_command():
    """`clusterlm launch` runs torchrun's module with the node layout, then `clusterlm train`."""
    cmd = torchrun_command("r.toml", ["--train.max_steps=5"], nproc_per_node=4, nnodes=2, node_rank=1,
                           master_addr="n01", master_port=2000, python="py")
    assert cmd == ["py", "-m", "clusterlm.parallel.torchrun", "--nproc-per-node=4", "--nnodes=2", "--node-rank=1",
                   "--rdzv-backend=c10d", "--rdzv-endpoint=n01:2000", "--rdzv-id=clusterlm", "--max-restarts=0",
                   "-m", "clusterlm", "train",
                   "r.toml", "--train.max_steps=5"]
    with pytest.raises(ValueError, match="node-rank=2 must be < --nnodes=2"):
        torchrun_command("r", [], nproc_per_node=1, nnodes=2, node_rank=2)


LLAMA = get_preset("llama-nano", vocab_size=64)  # 4 layers, 4 heads, 2 kv heads, max_seq_len 256


@pytest.mark.parametrize("layout, world, model, message", [
    (dict(tp=3), 3, LLAMA, "tp=3 must divide model.n_heads=4 (4 % 3 = 1)"),
    (dict(tp=4), 4, LLAMA, "tp=4 must divide model.kv_heads=2 (2 % 4 = 2)"),
    (dict(dp_shard=2), 4, LLAMA, "dp_replicate*dp_shard*tp*pp = 1*2*1*1 = 2 != world size 4"),
    (dict(pp=8), 8, dataclasses.replace(LLAMA, tie_embeddings=False), "pp=8 > model.n_layers=4"),
    (dict(pp=2), 2, LLAMA, "pp=2 with model.tie_embeddings=true"),
    (dict(dp_shard=2), 2, get_preset("lstm-small", vocab_size=64), "trains with data parallel replication only"),
    (dict(dp_shard=3), 3, LLAMA, "global_batch_tokens=1024 is not divisible by micro_batch*seq_len*dp = 4*64*3 = 768"),
])
def test_invalid_layouts_fail_with_numbers(layout, world, model, message):
    """Invalid layouts raise ConfigError whose message carries the arithmetic."""
    with pytest.raises(ConfigError) as e:
        validate_layout(ParallelDims(**layout), model, world, global_batch_tokens=1024, micro_batch=4, seq_len=64)
    assert message in str(e.value)


def test_trainer_refuses_layout_before_building_a_model(tmp_path, monkeypatch):
    """`clusterlm train` with [parallel] asking for 2 ranks, started as one process, fails with the numbers
    before any model is built (build_model is made to explode)."""
    import clusterlm.models.build as build
    from clusterlm.config import load_run_config
    from clusterlm.data.prepare import prepare
    from clusterlm.train.loop import train

    (tmp_path / "t.txt").write_text("to be or not to be\n" * 200)
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", val_fraction=0.1)
    monkeypatch.setattr(build, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_run_config(None, [f"--data.dir={tmp_path / 'data'}", f"--train.out_dir={tmp_path / 'run'}",
                                 "--model.preset=llama-nano", "--parallel.dp_shard=2", "--train.device=cpu"])
    with pytest.raises(ConfigError, match=r"= 2 != world size 1"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_launch_checks_the_layout_before_torchrun_and_defaults_to_ddp(tmp_path):
    """`clusterlm launch` validates the run for its process count before torchrun starts (one line,
    exit 2, not an error per rank and torchrun's traceback), gives a recipe without a [parallel]
    layout data parallel replication, and refuses a rendezvous port that is taken (exit 69)."""
    import socket

    from clusterlm.errors import ResourceBusyError
    from clusterlm.parallel.launch import check_port_free
    from clusterlm.parallel.layout import check_layout

    model = ["--model.preset=llama-nano", "--model.vocab_size=64"]
    assert check_layout(None, model, 2) == [*model, "--parallel.dp_replicate=2"]
    assert check_layout(None, [*model, "--parallel.dp_shard=2"], 2) == [*model, "--parallel.dp_shard=2"]
    with pytest.raises(ConfigError, match=r"2 processes, but .* = 1\*4\*1\*1 = 4; .*--parallel.dp_shard=2"):
        check_layout(None, [*model, "--parallel.dp_shard=4"], 2)
    # the suggestion keeps the other sizes: with tp=2 on 4 processes dp_shard=4 would make 8 ranks
    with pytest.raises(ConfigError, match=r"= 1\*1\*2\*1 = 2; .*e.g. --parallel.dp_shard=2 \(FSDP\) or "
                                          r"--parallel.dp_replicate=2 \(replicas\)$"):
        check_layout(None, [*model, "--parallel.tp=2"], 4)
    with pytest.raises(ConfigError, match=r"e.g. --parallel.dp_replicate=1 --parallel.dp_shard=3 "):
        check_layout(None, [*model, "--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.tp=2"], 6)
    with pytest.raises(ConfigError, match=r"e.g. a multiple of tp\*pp = 2 ranks \(--nproc-per-node\)"):
        check_layout(None, [*model, "--parallel.tp=2"], 3)
    with pytest.raises(ConfigError, match="tp=3 must divide"):
        check_layout(None, [*model, "--parallel.tp=3"], 3)
    with pytest.raises(FileNotFoundError, match="bundled recipe: "):
        check_layout("no_such_recipe", [], 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ResourceBusyError, match=f"port {s.getsockname()[1]} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", s.getsockname()[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    check_port_free("127.0.0.1", free)


def test_launch_refuses_the_other_modes_options(capsys):
    """An option of the mode not chosen is exit 2 naming it, not ignored: `--nodes 2` without --slurm ran
    torchrun on this one node, `--slurm --nproc-per-node 2` submitted one task per node."""
    import argparse

    from clusterlm.cluster import slurm
    from clusterlm.parallel.launch import main

    group = argparse.ArgumentParser()
    slurm.add_arguments(group)
    assert {a.dest for a in group._actions} - {"help", "slurm"} == set(slurm.SLURM_OPTIONS)
    for argv, said in ((["--nproc-per-node=2", "--nodes=2", "--time=01:00:00"],
                        "--nodes, --time: used with --slurm only"),
                       (["--slurm", "--nproc-per-node=2", "--max-restarts=1"],
                        "--nproc-per-node, --max-restarts: torchrun's, not used with --slurm")):
        with pytest.raises(SystemExit) as e:
            main(["llama_shakespeare_cpu", *argv, "--dry-run"])
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert main(["llama_shakespeare_cpu", "--nproc-per-node=2", "--dry-run"]) == 0
    assert main(["llama_shakespeare_cpu", "--slurm", "--nodes=2", "--dry-run"]) == 0
    for argv, said in ((["--nproc-per-node=0"], "--nproc-per-node=0 must be >= 1"),
                       (["--nproc-per-node=2", "--nnodes=-1"], "--nnodes=-1 must be >= 1")):  # one message named neither value
        with pytest.raises(SystemExit) as e:
            main(["llama_shakespeare_cpu", *argv, "--dry-run"])
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_launch_on_several_nodes_needs_the_master_address(capsys):
    """--nnodes 2 without --master-addr or --rdzv-endpoint is exit 2 (it rendezvoused at 127.0.0.1, so the
    other node waited on its own loopback); one node keeps the 127.0.0.1 default."""
    from clusterlm.parallel.launch import main

    with pytest.raises(SystemExit) as e:
        main(["llama_shakespeare_cpu", "--nproc-per-node=2", "--nnodes=2", "--node-rank=1", "--dry-run"])
    assert e.value.code == 2 and "--nnodes=2 needs node 0's address" in capsys.readouterr().err
    assert main(["llama_shakespeare_cpu", "--nproc-per-node=2", "--nnodes=2", "--node-rank=1", "--master-addr=n01",
                 "--dry-run"]) == 0
    assert "--rdzv-endpoint=n01:29500 " in capsys.readouterr().out
    assert main(["llama_shakespeare_cpu", "--nproc-per-node=2", "--dry-run"]) == 0
    assert "--rdzv-endpoint=127.0.0.1:29500 " in capsys.readouterr().out
    # an empty address (`--master-addr "$HEAD"` with HEAD unset) was taken for 127.0.0.1: node 1 waited on itself
    # both an endpoint and an address or port: the endpoint won without a word
    for given, said in ((["--master-addr=n02"], "--master-addr=n02"), (["--master-port=2000"], "--master-port=2000")):
        with pytest.raises(SystemExit) as e:
            main(["llama_shakespeare_cpu", "--nproc-per-node=2", "--rdzv-endpoint=n01:29500", *given, "--dry-run"])
        assert e.value.code == 2 and f"--rdzv-endpoint=n01:29500 and {said}: give one of them" in capsys.readouterr().err
    for given in (["--master-addr="], ["--master-addr= "], ["--rdzv-endpoint=[]:29500"]):
        with pytest.raises(SystemExit) as e:
            main(["llama_shakespeare_cpu", "--nproc-per-node=2", "--nnodes=2", "--node-rank=1", *given, "--dry-run"])
        assert e.value.code == 2 and "is empty; give node 0's host name" in capsys.readouterr().err


def test_dry_run_prints_a_command_the_shell_runs_as_launch_would(tmp_path, capsys):
    """The dry run's torchrun line is shell-quoted: read back by the shell (shlex.split) it is the very
    argument list launch runs (a path with a space was two arguments, a "$(...)" in it a command)."""
    import shlex

    from clusterlm.parallel.launch import main

    out = str(tmp_path / "my run $(touch pwned)")
    assert main(["llama_shakespeare_cpu", "--nproc-per-node=2", f"--train.out_dir={out}", "--dry-run"]) == 0
    words = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert words[0].startswith("OMP_NUM_THREADS=")
    assert words[words.index("train") + 1:] == ["llama_shakespeare_cpu", f"--train.out_dir={out}",
                                                "--parallel.dp_replicate=2"]


def test_torchrun_killed_by_a_signal_is_128_plus_the_signal():
    """torchrun itself SIGKILLed (the OOM killer) is exit 137, as a shell reports it: Popen's -9 was
    returned as is, and the process then exited 247."""
    import signal
    import sys

    from clusterlm.parallel.launch import run_torchrun

    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert run_torchrun(killed) == 128 + signal.SIGKILL
    assert run_torchrun([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_each_nodes_launch_gets_the_trainers_exit_code(tmp_path):
    """On two nodes each `clusterlm launch` has its own exit file; the first worker of each node (LOCAL_RANK 0)
    records the trainer's code there. Only global rank 0 did: node 1's launch exited torchrun's 1 after a
    preemption (75) that node 0's reported."""
    from clusterlm.parallel.launch import EXIT_FILE_ENV, record_exit_code

    for rank, local_rank, written in ((0, 0, True), (1, 1, False), (2, 0, True), (3, 1, False)):
        path = tmp_path / f"rank{rank}"
        record_exit_code(75, {"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(local_rank),
                              "LOCAL_WORLD_SIZE": "2", EXIT_FILE_ENV: str(path)})
        assert (path.read_text() if path.exists() else None) == ("75\n" if written else None)


def test_layout_is_checked_before_the_data_is_prepared(tmp_path):
    """With no prepared data (vocab_size unknown, as on a first run) the model's layout rules still apply
    before any process starts: an LSTM recipe under FSDP and a tp that does not divide the heads were let
    through to fail on every rank."""
    from clusterlm.parallel.layout import check_layout

    nodata = [f"--data.dir={tmp_path / 'none'}"]
    with pytest.raises(ConfigError, match="model.arch='lstm' trains with data parallel replication only"):
        check_layout("lstm_shakespeare_cpu", [*nodata, "--parallel.dp_shard=2"], 2)
    with pytest.raises(ConfigError, match="tp=3 must divide model.n_heads=4"):
        check_layout("llama_shakespeare_cpu", [*nodata, "--parallel.tp=3"], 3)
    assert check_layout("llama_shakespeare_cpu", nodata, 2) == [*nodata, "--parallel.dp_replicate=2"]
    # each failed on every rank after the spawn: torch's 1F1B refusal, gloo's abort on an uneven sequence split
    with pytest.raises(ConfigError, match=r"pp=2 with pp_schedule='1f1b' .*train.micro_batch_size=1 splits into 1"):
        check_layout("llama_shakespeare_cpu", [*nodata, "--parallel.pp=2", "--model.tie_embeddings=false",
                                               "--train.micro_batch_size=1"], 2)
    with pytest.raises(ConfigError, match=r"train.seq_len=63 is not a multiple of 2"):
        check_layout("llama_shakespeare_cpu", [*nodata, "--parallel.tp=2", "--train.seq_len=63"], 2)


def test_launch_refuses_cuda_without_a_gpu_before_torchrun(monkeypatch, capsys):
    """--train.device=cuda on a node where torch sees no GPU is exit 2 with that one line last, before
    torchrun starts (every rank printed it, then torchrun's failure report buried it); cpu goes on to
    torchrun, and a dry run (which may print the command for GPU nodes) is not refused."""
    import torch

    from clusterlm import cli
    from clusterlm.parallel import launch

    started = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch, "check_port_free", lambda addr, port: None)
    monkeypatch.setattr(launch, "run_torchrun", lambda cmd, extra=None: started.append(cmd) or 0)
    argv = ["launch", "llama_shakespeare_cpu", "--nproc-per-node=2"]
    assert cli.main([*argv, "--train.device=cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "clusterlm launch: error: train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'"
    assert started == []
    assert cli.main([*argv, "--train.device=cuda", "--dry-run"]) == 0 and started == []
    assert cli.main([*argv, "--train.device=cpu"]) == 0 and len(started) == 1
