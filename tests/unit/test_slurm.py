"""Slurm launch without a cluster: sbatch rendering (and the script's requeue logic run with fake srun and
scontrol), option validation, submit with a fake sbatch, the job registry, and the sacct/squeue/scontrol
parsers on outputs recorded from Debian's Slurm 22.05 (tests/unit/fixtures/slurm)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusterlm.cluster import slurm
from clusterlm.cluster.slurm import SbatchOptions, query_states, read_registry, record_job, registry_path, render_sbatch
from clusterlm.cluster.slurm_text import JobState, parse_sacct, parse_scontrol_show_job, parse_squeue, parse_time_limit
from clusterlm.errors import ClusterlmError, ConfigError
from tests.helpers import BLOCK_TORCH

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"
RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "shakespeare_char_cpu.toml")


def _sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_render_header_and_srun_line():
    """The header asks for the nodes, tasks, CPUs, time, partition, account, USR2 120 s before the limit,
    requeue and an appended log; the srun line runs the absolute python on the absolute recipe with
    resume=auto before the user's overrides (quoted for the shell)."""
    opts = SbatchOptions(nodes=2, ntasks_per_node=4, gpus_per_node=4, cpus_per_task=8, time="1-02:00:00",
                         partition="gpu", account="proj1", job_name="gpt", extra=("--exclusive",))
    script = render_sbatch(opts, "/abs/r.toml", ["--train.max_steps=10", "--data.dir=/d/my data"],
                           output_dir="/runs/x", workdir="/home/u", python="/venv/bin/python")
    assert _sbatch_lines(script) == [
        "--job-name=gpt", "--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=8", "--gpus-per-node=4",
        "--time=1-02:00:00", "--partition=gpu", "--account=proj1", "--signal=USR2@120", "--requeue",
        "--open-mode=append", "--output=/runs/x/slurm-%j.out", "--chdir=/home/u", "--exclusive"]
    assert ("/venv/bin/python -m clusterlm train /abs/r.toml --train.resume=auto --train.max_steps=10 "
            "'--data.dir=/d/my data'") in script
    assert "srun --cpus-per-task=8" in script
    assert "export OMP_NUM_THREADS=8" in script  # torch's threads per task: its CPUs, not the node's
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in script
    cpu = render_sbatch(SbatchOptions(time="", signal_seconds=300), None, [], output_dir="/o", workdir="/w")
    lines = _sbatch_lines(cpu)
    assert not any(x.startswith(("--gpus", "--gres", "--time", "--partition", "--account")) for x in lines)
    assert "--signal=USR2@300" in lines
    assert f"{sys.executable} -m clusterlm train --train.resume=auto" in cpu


def test_directive_values_with_spaces_hash_or_quotes_are_quoted_for_sbatch():
    """sbatch reads `#SBATCH` lines with its own parser (src/sbatch/opt.c, _get_argument): whitespace splits
    arguments and an unquoted `#` starts a comment. Checked with Debian's sbatch 22.05 (`sbatch -v` against
    an unreachable controller): an unquoted `--output=/tmp/my dir/...` is refused with "Invalid directive
    found in batch script: dir/slurm-%j.out", `/tmp/a#b/...` becomes `/tmp/a`; the double-quoted forms
    below read back verbatim (`it"s` included)."""
    opts = SbatchOptions(extra=('--comment=it"s a \\ b', "--exclusive"))
    script = render_sbatch(opts, "/r.toml", [], output_dir="/runs/a#b/my runs", workdir="/home/u/my dir")
    assert _sbatch_lines(script)[-4:] == [
        '--output="/runs/a#b/my runs/slurm-%j.out"', '--chdir="/home/u/my dir"', '--comment="it\\"s a \\\\ b"',
        "--exclusive"]
    assert "--output=/runs/x/slurm-%j.out" in _sbatch_lines(render_sbatch(SbatchOptions(), None, [],
                                                                          output_dir="/runs/x", workdir="/w"))


def _run_script(tmp_path: Path, srun_codes: list[int], job_id: str = "1234", restart: str = "0"):
    """Run a rendered script under bash with fake srun/scontrol/getent that log their calls; srun exits
    with srun_codes[i] on its i-th call."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    calls = tmp_path / "calls.log"
    (tmp_path / "codes").write_text(" ".join(map(str, srun_codes)))
    (bin_ / "srun").write_text(f"""#!/bin/bash
echo "srun $* MASTER=$MASTER_ADDR:$MASTER_PORT" >> {calls}
read -r -a codes < {tmp_path}/codes; exit "${{codes[0]}}"
""")
    (bin_ / "scontrol").write_text(f"""#!/bin/bash
echo "scontrol $*" >> {calls}
if [ "$1 $2" = "show hostnames" ]; then echo node07; echo node08; fi
if [ "$1 $2" = "show node" ]; then echo "   NodeAddr=10.0.0.7 NodeHostName=node07"; fi
exit 0
""")
    (bin_ / "getent").write_text("#!/bin/bash\nexit 2\n")  # node07 does not resolve: NodeAddr is used
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = render_sbatch(SbatchOptions(nodes=2, ntasks_per_node=2), "/r.toml", ["--train.max_steps=3"],
                           output_dir=tmp_path, workdir=tmp_path, python="/py")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "node[07-08]",
           "SLURM_NTASKS": "4", "SLURM_RESTART_COUNT": restart}
    r = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30)
    return r, calls.read_text() if calls.exists() else ""


@pytest.mark.parametrize("srun_rc, script_rc, requeued", [(75, 0, True), (0, 0, False), (1, 1, False)])
def test_script_requeues_only_on_exit_75(tmp_path, srun_rc, script_rc, requeued):
    """Run as Slurm runs it (fake srun/scontrol): exit 75 from srun -> `scontrol requeue $SLURM_JOB_ID` and
    exit 0; 0 and 1 pass through without a requeue. MASTER_ADDR is the first host's NodeAddr (the host
    name does not resolve here) and MASTER_PORT = 20000 + (job id * 8 + restarts % 8) % 40000."""
    r, calls = _run_script(tmp_path, [srun_rc], job_id="1234", restart="1")
    assert r.returncode == script_rc, r.stderr
    assert f"MASTER=10.0.0.7:{20000 + (1234 * 8 + 1) % 40000}" in calls
    assert "srun --cpus-per-task=1 --wait=120 /py -m clusterlm train /r.toml --train.resume=auto" in calls
    assert ("scontrol requeue 1234" in calls) == requeued


def test_script_takes_the_next_port_when_the_derived_one_is_in_use(tmp_path):
    """The derived port repeats every 5,000 job ids: a job whose port something already listens on (an
    older job on the same first node) used to fail its rendezvous with EADDRINUSE; it takes the next
    free port instead."""
    import socket

    with contextlib.ExitStack() as stack:
        while True:  # a listening port P in the derived range, and the job id / restart count that give it
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if 20000 <= port < 59999:
                break
        s.listen()
        job, restart = (port - 20000) // 8, (port - 20000) % 8
        assert 20000 + (job * 8 + restart) % 40000 == port
        r, calls = _run_script(tmp_path, [0], job_id=str(job), restart=str(restart))
    assert r.returncode == 0, r.stderr
    assert f"MASTER=10.0.0.7:{port + 1}" in calls, calls


def test_bash_syntax_of_rendered_script(tmp_path):
    """`bash -n` accepts the script (quoting of odd override values included)."""
    script = render_sbatch(SbatchOptions(), "/r.toml", ["--train.out_dir=it's here", '--data.dir="x"'],
                           output_dir="/o", workdir="/w")
    (tmp_path / "s.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0


def test_time_limits_and_option_errors():
    """Time limits parse as [D-]HH:MM:SS; bad counts, names, times and extra options name the option and
    what would be valid."""
    assert parse_time_limit("04:00:00") == 14400
    assert parse_time_limit("1-12:30:05") == 86400 + 12 * 3600 + 30 * 60 + 5
    for bad in ("1:00", "4h", "00:61:00", "00:00:00", "-1:00:00"):
        with pytest.raises(ConfigError, match="--time"):
            parse_time_limit(bad)
    cases = [(dict(nodes=0), "--nodes=0 must be an integer >= 1"),
             (dict(ntasks_per_node=-1), "--ntasks-per-node=-1"),
             (dict(gpus_per_node=-2), "--gpus-per-node=-2 must be >= 0"),
             (dict(time="00:03:00"), "(180 s) must be longer than --signal-seconds=120 + 60 s"),
             (dict(signal_seconds=0), "--signal-seconds=0 must be in [1, 65535]"),
             (dict(partition="gpu debug"), "--partition='gpu debug'"),
             # a final line break passed ("$" matches before it) and split the #SBATCH line
             (dict(partition="gpu\n"), "--partition='gpu\\n'"), (dict(account="proj\n"), "--account='proj\\n'"),
             (dict(job_name="x\n"), "--job-name='x\\n'"),
             (dict(job_name=""), "--job-name must not be empty"),
             (dict(extra=("exclusive",)), "must be one sbatch option starting with '--'"),
             # sbatch takes the last of a repeated option: these replaced the script's own (a --signal=USR1
             # never reached the trainer, --no-requeue undid the requeue on preemption)
             (dict(extra=("--signal=USR1@60",)), "the script sets --signal itself; use clusterlm launch's "
                                                 "--signal-seconds instead"),
             (dict(extra=("--no-requeue",)), "the preemption, requeue and log handling depend on it"),
             (dict(extra=("--time=01:00:00",)), "use clusterlm launch's --time instead"),
             (dict(extra=("--output=/tmp/x.out",)), "use clusterlm launch's --output instead"),
             # the value after a space: sbatch splits the directive there, so this was --signal too
             (dict(extra=("--signal USR1@10",)), "the script sets --signal itself"),
             (dict(extra=("--time\t00:05:00",)), "the script sets --time itself")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as e:
            SbatchOptions(**kwargs)
        assert message in str(e.value), (kwargs, str(e.value))
    assert SbatchOptions(nodes=2, ntasks_per_node=4).world_size == 8
    assert SbatchOptions(time="00:03:01").time == "00:03:01"


def _launch_args(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    """Parse `clusterlm launch` arguments with launch.py's own parser options."""
    from clusterlm.config import split_overrides

    overrides, rest = split_overrides(list(argv))
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("--dry-run", action="store_true")
    slurm.add_arguments(parser)
    return parser.parse_args(rest), overrides


def test_world_size_must_match_the_recipe_layout(capsys):
    """nodes * ntasks-per-node must equal the recipe's dp_replicate*dp_shard*tp*pp (checked as `launch`
    checks it, before anything is queued); a recipe without a layout gets DDP over the tasks, the
    default task count follows the layout (world / nodes), and a layout the model cannot take (tp not
    dividing the heads) is refused here, not hours later on every rank of the allocation."""
    args, ov = _launch_args(RECIPE, "--slurm", "--ntasks-per-node=2", "--dry-run", "--parallel.dp_shard=4")
    with pytest.raises(ConfigError, match=r"--nodes=1 x --ntasks-per-node=2 = 2 tasks, but .* = 1\*4\*1\*1 = 4; "
                                          r"change the task counts or .*--parallel.dp_shard=2"):
        slurm.submit(args, ov)
    args, ov = _launch_args(RECIPE, "--slurm", "--ntasks-per-node=2", "--dry-run")
    assert slurm.submit(args, ov) == 0
    assert f"train {RECIPE} --train.resume=auto --parallel.dp_replicate=2\n" in capsys.readouterr().out
    args, ov = _launch_args(RECIPE, "--slurm", "--ntasks-per-node=3", "--dry-run", "--parallel.tp=3",
                            "--model.vocab_size=65")
    with pytest.raises(ConfigError, match="tp=3 must divide"):
        slurm.submit(args, ov)
    args, ov = _launch_args(RECIPE, "--slurm", "--nodes=2", "--dry-run", "--parallel.dp_replicate=2",
                            "--parallel.dp_shard=2")
    assert slurm.submit(args, ov) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n" in out
    assert f"train {RECIPE} --train.resume=auto --parallel.dp_replicate=2 --parallel.dp_shard=2" in out


def test_elastic_layout_is_checked_on_every_node_count(capsys):
    """An elastic job (--min-nodes) whose batch fits the full node count but not a smaller one is refused at
    submit: it was queued, and after a node loss its requeued run stopped with that error (exit 2)."""
    args, ov = _launch_args(RECIPE, "--slurm", "--nodes=3", "--min-nodes=2", "--ntasks-per-node=1",
                            "--parallel.dp_replicate=3", "--train.micro_batch_size=12", "--train.seq_len=64",
                            "--train.global_batch_tokens=2304", "--dry-run")  # 2304 = 3 x 12 x 64; 2 nodes: 1536
    with pytest.raises(ConfigError, match=r"^--min-nodes=2: after a node loss the job goes on with 2 node\(s\) "
                                          r"\(dp_replicate=2\), where global_batch_tokens=2304 is not divisible"):
        slurm.submit(args, ov)
    assert capsys.readouterr().out == ""  # no script shown
    args, ov = _launch_args(RECIPE, "--slurm", "--nodes=3", "--min-nodes=2", "--ntasks-per-node=1",
                            "--parallel.dp_replicate=3", "--train.micro_batch_size=12", "--train.seq_len=64",
                            "--train.global_batch_tokens=4608", "--dry-run")  # 2 x 2304, 3 x 1536
    assert slurm.submit(args, ov) == 0


def test_negative_gpus_per_node_is_named():
    """--gpus-per-node=-1 is refused naming --gpus-per-node (it became the default --ntasks-per-node and the
    message named that option, which was not given)."""
    args, ov = _launch_args(RECIPE, "--slurm", "--gpus-per-node=-1", "--dry-run")
    with pytest.raises(ConfigError, match=r"^--gpus-per-node=-1 must be >= 0"):
        slurm.submit(args, ov)


def test_output_folder_that_is_a_file_is_named(tmp_path):
    """--output (or train.out_dir) naming a file is refused naming the option (it was "File exists: PATH")."""
    (tmp_path / "f").write_text("")
    args, ov = _launch_args(RECIPE, "--slurm", f"--output={tmp_path / 'f'}", "--dry-run")
    with pytest.raises(ConfigError, match=r"^--output .*/f is a file; the script and slurm-JOBID.out go in a folder"):
        slurm.submit(args, ov)
    args, ov = _launch_args(RECIPE, "--slurm", f"--train.out_dir={tmp_path / 'f'}", "--dry-run")
    with pytest.raises(ConfigError, match=r"^train.out_dir .*/f is a file"):
        slurm.submit(args, ov)


def test_output_folder_with_a_line_break_is_refused(tmp_path, capsys):
    """A line break in --output (or train.out_dir) is refused naming the option: it split the #SBATCH --output
    line, so the rest ran as a shell command and the #SBATCH lines after it (--chdir) were dropped."""
    for option, name in ((f"--output={tmp_path}/x\ntouch {tmp_path}/ran #", "--output"),
                         (f"--train.out_dir={tmp_path}/y\rz", "train.out_dir")):
        args, ov = _launch_args(RECIPE, "--slurm", option, "--dry-run")
        with pytest.raises(ConfigError, match=rf"^{name} .* holds a line break"):
            slurm.submit(args, ov)
        assert capsys.readouterr().out == ""  # no script shown


def test_recipe_path_with_a_line_break_stays_in_the_comment():
    """A recipe path holding a line break ended the script's first comment: the rest of the path ran as a
    command, and sbatch, which reads #SBATCH lines only up to the first command, dropped all of them."""
    script = render_sbatch(SbatchOptions(nodes=2, time="01:00:00"), "/r/a\necho hi.toml", [], output_dir="/o",
                           workdir="/w", python="/p")
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line and not line.startswith("#"))
    assert [line for line in lines[:first_command] if line.startswith("#SBATCH ")] == \
        [line for line in lines if line.startswith("#SBATCH ")]
    assert lines[1] == "# rendered by `clusterlm launch --slurm` for /r/a\\necho hi.toml"
    assert "'/r/a\necho hi.toml'" in script  # the srun line keeps the real path, quoted


def test_percent_in_the_output_folder_is_kept():
    """sbatch expands %-patterns in all of --output: a folder named "lr%a" (array index) sent slurm-JOBID.out
    somewhere else than the folder the script went to, and than the log `clusterlm jobs` shows."""
    script = render_sbatch(SbatchOptions(), "/r.toml", [], output_dir="/runs/lr%a_50%", workdir="/w", python="/p")
    assert "--output=/runs/lr%%a_50%%/slurm-%j.out" in _sbatch_lines(script)


def test_time_limit_is_rendered_as_read():
    """--time is read with the white space around it ignored, and rendered so: "\n04:00:00" (a command
    substitution's stray line) split the #SBATCH --time line, and sbatch read none of the directives after it."""
    script = render_sbatch(SbatchOptions(time="\n04:00:00 "), "/r.toml", [], output_dir="/o", workdir="/w", python="/p")
    assert "--time=04:00:00" in _sbatch_lines(script) and "--requeue" in _sbatch_lines(script)
    assert not any(line.startswith("04:00:00") for line in script.splitlines())


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    """Without sbatch on PATH, submitting says Slurm is not installed (and writes no script); --dry-run
    still shows the script."""
    monkeypatch.setenv("PATH", str(tmp_path))
    args, ov = _launch_args(RECIPE, "--slurm", f"--output={tmp_path / 'o'}")
    with pytest.raises(ClusterlmError, match="Slurm is not installed here: `sbatch` is not on PATH"):
        slurm.submit(args, ov)
    assert not (tmp_path / "o").exists()


def test_a_failed_sbatch_leaves_nothing_and_says_so_in_one_line(tmp_path, monkeypatch):
    """sbatch refusing the job (no controller here): one line with its words, and neither the script
    nor the run folder made for it is left."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text('#!/bin/bash\necho "sbatch: error: Batch job submission failed:" >&2\n'
                                 'echo "  Unable to contact slurm controller (connect failure)" >&2\nexit 1\n')
    (bin_ / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    args, ov = _launch_args(RECIPE, "--slurm", f"--output={tmp_path / 'out'}")
    with pytest.raises(ClusterlmError) as e:
        slurm.submit(args, ov)
    assert "\n" not in str(e.value) and "nothing was submitted" in str(e.value)
    assert "Unable to contact slurm controller" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unwritable_registry_is_refused_before_sbatch(tmp_path, monkeypatch):
    """A job registry that cannot be written ($CLUSTERLM_HOME a file) is exit 2 before sbatch: the job was
    queued, then recording it failed ("File exists"), so `clusterlm jobs` never knew it."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f'#!/bin/bash\ntouch {tmp_path}/submitted\necho "42;clusterlm"\n')
    (bin_ / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    (tmp_path / "home").write_text("")
    args, ov = _launch_args(RECIPE, "--slurm", f"--output={tmp_path / 'out'}")
    with pytest.raises(ValueError, match=f"job registry {tmp_path / 'home' / 'jobs.jsonl'}: .*home is not a folder"):
        slurm.submit(args, ov, env={"CLUSTERLM_HOME": str(tmp_path / "home")})
    assert not (tmp_path / "submitted").exists()


def test_submit_with_fake_sbatch_writes_script_and_registry(tmp_path, monkeypatch, capsys):
    """Submit: the script is written into --output, `sbatch --parsable SCRIPT` is called, its job id
    ("42;cluster") printed and recorded in $CLUSTERLM_HOME/jobs.jsonl with recipe, script, time and cwd."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/sbatch_args\necho "42;clusterlm"\n')
    (bin_ / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.setenv("CLUSTERLM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    args, ov = _launch_args(RECIPE, "--slurm", "--output=out", "--job-name=sc", "--train.max_steps=7")
    assert slurm.submit(args, ov) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("submitted batch job 42 ")
    [script] = (tmp_path / "out").glob("sc-*.sbatch")
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", str(script)]
    assert f"--output={tmp_path / 'out' / 'slurm-%j.out'}" in script.read_text()
    [rec] = read_registry(tmp_path / "home" / "jobs.jsonl")
    assert rec["job_id"] == "42" and rec["recipe"] == RECIPE and rec["script"] == str(script)
    assert rec["cwd"] == str(tmp_path) and rec["overrides"] == ["--train.max_steps=7"] and rec["submit_time"]
    assert rec["log"] == str(tmp_path / "out" / "slurm-42.out")


def test_registry_location_and_torn_lines(tmp_path):
    """Registry path: $CLUSTERLM_HOME, else $XDG_CACHE_HOME/clusterlm, else ~/.cache/clusterlm; appended
    records read back in order, and a torn (half-written) line is skipped."""
    assert registry_path({"CLUSTERLM_HOME": "/h"}) == Path("/h/jobs.jsonl")
    assert registry_path({"XDG_CACHE_HOME": "/c"}) == Path("/c/clusterlm/jobs.jsonl")
    assert registry_path({}) == Path.home() / ".cache" / "clusterlm" / "jobs.jsonl"
    path = tmp_path / "deep" / "jobs.jsonl"
    record_job(path, {"job_id": "1"})
    with open(path, "a") as f:
        f.write('{"job_id": "2", "reci')
    with open(path, "a") as f:
        f.write("\n")
    record_job(path, {"job_id": "3"})
    assert [r["job_id"] for r in read_registry(path)] == ["1", "3"]
    assert read_registry(tmp_path / "none.jsonl") == []


def test_parse_scontrol_one_line_and_multi_line():
    """`scontrol show job -o` (one job per line) and the multi-line form of a requeued pending job give
    state, restart count, reason and run time; values with spaces stay whole."""
    jobs = parse_scontrol_show_job((FIXTURES / "scontrol_show_job_o.txt").read_text())
    assert {k: (v.state, v.restarts) for k, v in jobs.items()} == {
        "1": ("COMPLETED", 1), "2": ("COMPLETED", 1), "3": ("COMPLETED", 1), "4": ("CANCELLED", 0),
        "5": ("CANCELLED", 0), "6": ("PENDING", 1), "7": ("RUNNING", 0)}
    assert jobs["3"].elapsed == "00:00:39" and jobs["3"].nodes == "vm" and jobs["6"].reason == "BeginTime"
    [(job_id, job)] = parse_scontrol_show_job((FIXTURES / "scontrol_show_job_requeued.txt").read_text()).items()
    assert (job_id, job.state, job.restarts, job.reason, job.source) == ("6", "PENDING", 1, "BeginTime", "scontrol")
    assert parse_scontrol_show_job("No jobs in the system\n") == {}
    spaced = parse_scontrol_show_job("JobId=9 JobName=a b JobState=RUNNING Reason=None Restarts=2")
    assert spaced["9"].state == "RUNNING" and spaced["9"].restarts == 2


def test_parse_squeue_and_sacct():
    """squeue --states=all (recorded) gives states and reasons but no restart count; sacct -D lists each
    requeued run of a job (REQUEUED/PREEMPTED) before the current one, so restarts = lines - 1."""
    q = parse_squeue((FIXTURES / "squeue_states_all.txt").read_text())
    assert (q["6"].state, q["6"].reason, q["6"].restarts) == ("PENDING", "BeginTime", None)
    assert (q["3"].state, q["3"].elapsed, q["3"].nodes, q["3"].reason) == ("COMPLETED", "0:39", "vm", "")
    assert len(q) == 7
    # sacct's --parsable2 format (fields in --format order, '|' separated); written from sacct's manual,
    # as this machine keeps no accounting (see sacct_disabled.txt)
    text = ("100|REQUEUED|0:0|00:01:10|node[01-02]\n100|PREEMPTED|0:0|00:03:00|node[01-02]\n"
            "100|RUNNING|0:0|00:00:20|node[03-04]\n101|CANCELLED by 0|0:15|00:00:02|node05\n102|COMPLETED|0:0|00:10:00|n1\n")
    s = parse_sacct(text)
    assert (s["100"].state, s["100"].restarts, s["100"].nodes) == ("RUNNING", 2, "node[03-04]")
    assert (s["101"].state, s["101"].exit_code, s["101"].restarts) == ("CANCELLED", "0:15", 0)
    assert s["102"].source == "sacct"


def _fake_runner(outputs: dict[str, tuple[int, str]]):
    calls = []

    def run(cmd):
        calls.append(cmd[0])
        rc, text = outputs.get(cmd[0], (127, ""))
        return subprocess.CompletedProcess(cmd, rc, text if rc == 0 else "", "" if rc == 0 else text)
    return run, calls


def test_query_states_falls_back_from_sacct_to_squeue_to_scontrol():
    """Without accounting (sacct fails with the recorded message) states come from squeue and restart
    counts from scontrol; a job only scontrol knows still gets its state; an unknown id is UNKNOWN.
    With accounting, sacct's state wins and squeue is not asked."""
    scontrol = (FIXTURES / "scontrol_show_job_o.txt").read_text()
    run, calls = _fake_runner({"sacct": (1, (FIXTURES / "sacct_disabled.txt").read_text()),
                               "squeue": (0, "3|COMPLETED|0:39|vm|None\n6|PENDING|0:00||BeginTime\n"),
                               "scontrol": (0, scontrol)})
    st = query_states(["3", "6", "7", "999"], run)
    assert calls == ["sacct", "squeue", "scontrol"]
    assert (st["3"].state, st["3"].restarts, st["3"].source) == ("COMPLETED", 1, "squeue")
    assert (st["6"].state, st["6"].reason, st["6"].restarts) == ("PENDING", "BeginTime", 1)
    assert (st["7"].state, st["7"].source) == ("RUNNING", "scontrol")
    assert st["999"] == JobState("999", "UNKNOWN", source="")
    run, calls = _fake_runner({"sacct": (0, "3|REQUEUED|0:0|00:00:10|vm\n3|COMPLETED|0:0|00:00:29|vm\n"),
                               "scontrol": (1, "slurm_load_jobs error: Unable to contact slurm controller")})
    st = query_states(["3"], run)
    assert calls == ["sacct", "scontrol"] and (st["3"].state, st["3"].restarts, st["3"].source) == ("COMPLETED", 1, "sacct")
    run, _ = _fake_runner({})
    assert query_states(["5"], run)["5"].state == "UNKNOWN"  # no Slurm commands at all


def test_jobs_command_lists_registry_with_states(tmp_path, monkeypatch, capsys):
    """`clusterlm jobs` shows unfinished jobs and the 10 newest (--all: every one) with state and restarts;
    --json gives the registry record merged with the state."""
    reg = tmp_path / "jobs.jsonl"
    for i in range(1, 14):
        record_job(reg, {"job_id": str(i), "job_name": "j", "recipe": "/r/x.toml", "submit_time": "t",
                         "log": f"/o/slurm-{i}.out"})
    lines = "".join(f"{i}|{'RUNNING' if i == 2 else 'COMPLETED'}|0:10|vm|None\n" for i in range(1, 14))
    run, _ = _fake_runner({"sacct": (1, "Slurm accounting storage is disabled"), "squeue": (0, lines),
                           "scontrol": (0, "JobId=2 JobState=RUNNING Restarts=1 Reason=None")})
    monkeypatch.setattr(slurm, "_run", run)
    assert slurm.jobs_main(["--registry", str(reg)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["JOBID", "STATE", "RESTARTS", "ELAPSED", "SUBMITTED", "NAME", "RECIPE", "LOG"]
    assert [line.split()[0] for line in table[1:]] == ["2"] + [str(i) for i in range(4, 14)]
    assert table[1].split()[:3] == ["2", "RUNNING", "1"] and table[1].split()[-2:] == ["x.toml", "/o/slurm-2.out"]
    assert slurm.jobs_main(["--registry", str(reg), "--all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 13 and rows[1]["state"] == "RUNNING" and rows[1]["restarts"] == 1 and rows[0]["restarts"] is None
    with pytest.raises(FileNotFoundError, match="job registry"):
        slurm.jobs_main(["--registry", str(tmp_path / "missing.jsonl")])


def test_jobs_table_takes_hand_edited_records(tmp_path, monkeypatch, capsys):
    """A registry line whose fields are not text (hand-edited: a number, null) is shown, not a TypeError
    traceback (exit 1); --registry naming a folder says so instead of "does not exist"."""
    reg = tmp_path / "jobs.jsonl"
    reg.write_text('{"version": 1, "job_id": 7, "job_name": 3, "recipe": 5, "submit_time": 5, "log": null}\n')
    run, _ = _fake_runner({})
    monkeypatch.setattr(slurm, "_run", run)
    assert slurm.jobs_main(["--registry", str(reg)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["7", "UNKNOWN", "-", "-", "5", "3", "5", "-"]
    with pytest.raises(IsADirectoryError, match="is a directory"):
        slurm.jobs_main(["--registry", str(tmp_path)])
    (tmp_path / "home" / "jobs.jsonl").mkdir(parents=True)  # the default path too ("no jobs recorded" before)
    monkeypatch.setenv("CLUSTERLM_HOME", str(tmp_path / "home"))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        slurm.jobs_main([])




def test_jobs_refuses_an_empty_registry_flag_and_a_file_that_is_not_a_registry(tmp_path, monkeypatch, capsys):
    """`--registry ""` (an unset variable) is exit 2 naming the flag (it read the default registry); a JSON-lines
    file without any job_id (a run's metrics.jsonl) is exit 2 saying it is not a registry (it said "no jobs
    recorded"); a record whose job_id is null or empty is skipped with a warning (it was listed as job
    "None" and sent to sacct), the others are listed."""
    from clusterlm.cli import main as cli

    monkeypatch.setenv("CLUSTERLM_HOME", str(tmp_path / "home"))
    asked = []
    monkeypatch.setattr(slurm, "_run", lambda cmd: asked.append(cmd) or subprocess.CompletedProcess(cmd, 127, "", ""))
    assert cli(["jobs", "--registry", ""]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--registry='' is empty; give a jobs.jsonl file, or leave --registry out for the default "
        f"({tmp_path / 'home' / 'jobs.jsonl'})")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n')
    assert cli(["jobs", "--registry", str(metrics)]) == 2
    assert "holds 2 JSON record(s) but none with a job_id: it is not a job registry" in capsys.readouterr().err
    reg = tmp_path / "jobs.jsonl"
    reg.write_text('{"job_id": null}\n{"job_id": ""}\n{"job_id": "12", "job_name": "a"}\n')
    assert cli(["jobs", "--registry", str(reg), "--all"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == ["12"]
    assert asked[0][0] == "sacct" and "--jobs=12" in asked[0]  # not --jobs=None,,12


def test_jobs_warns_once_per_bad_registry_line(tmp_path, monkeypatch, capsys, caplog):
    """A torn or id-less registry line is one warning per `clusterlm jobs`: the registry was read up to three
    times, each read warning again about the same line."""
    monkeypatch.setattr(slurm, "_run", lambda cmd: subprocess.CompletedProcess(cmd, 127, "", ""))
    reg = tmp_path / "jobs.jsonl"
    for text in ('{"job_id": "12"}\n{"job_id": "1', '{"job_id": "12"}\n{"job_id": null}\n', '{"job_id": "1'):
        reg.write_text(text)
        caplog.clear()
        assert slurm.jobs_main(["--registry", str(reg)]) == 0
        assert len([r for r in caplog.records if r.levelname == "WARNING" and str(reg) in r.getMessage()]) == 1


def test_launch_slurm_dry_run_without_torch(tmp_path):
    """`clusterlm launch --slurm --dry-run` and `clusterlm jobs` run on a login node without torch."""
    code = BLOCK_TORCH + "from clusterlm.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = os.environ | {"CLUSTERLM_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code, "launch", RECIPE, "--slurm", "--dry-run", "--time=00:10:00"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --time=00:10:00" in r.stdout and "--train.resume=auto" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, "jobs"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "no jobs recorded" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-c", code, "launch", RECIPE, "--slurm", "--dry-run", "--time=5"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--time='5' is not a time limit" in r.stderr


# ---- elastic jobs: --on-node-loss ------------------------------------------------------------------------
def _run_elastic(tmp_path: Path, mode: str, node2_state: str = "idle", operator: bool = True, restarts: int = 0):
    """The script of `--nodes 2 --min-nodes 1 --ntasks-per-node 2 --on-node-loss MODE` with stand-ins: the
    first srun ends with a node failure, the probe step answers on n1 only, sinfo shows n2 in node2_state,
    scontrol logs requeue and updates (a node update fails unless operator). Returns (result, calls)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    calls = tmp_path / "calls.log"
    (bin_ / "srun").write_text(f"""#!/bin/bash
case "$*" in
  *" true") case "$*" in *--nodelist=n1*) exit 0 ;; *) exit 1 ;; esac ;;  # the probe: n2 does not answer
esac
echo "srun $*" >> {calls}
[ "$(grep -c '^srun' {calls})" -ge 2 ] && exit 0
echo "srun: error: Node failure on n2" >&2; exit 137
""")
    (bin_ / "scontrol").write_text(f"""#!/bin/bash
case "$1 $2" in
  "show hostnames") case "$3" in "n[1-2]") printf 'n1\\nn2\\n' ;; *) echo "$3" | tr , '\\n' ;; esac ;;
  "show job") echo "   NodeList=n[1-2] BatchHost=n1" ;;  # Slurm has not taken n2 out yet
  "show node") echo "   NodeAddr=10.0.0.1" ;;
  *) echo "scontrol $*" >> {calls}
     case "$*" in update\\ nodename=*) exit {0 if operator else 1} ;; esac ;;
esac
""")
    (bin_ / "sinfo").write_text(f"#!/bin/bash\necho '{node2_state}'\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = render_sbatch(SbatchOptions(nodes=2, min_nodes=1, ntasks_per_node=2, on_node_loss=mode), None,
                           ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], output_dir=tmp_path,
                           workdir=tmp_path, python="python")
    (tmp_path / "job.sh").write_text(script)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_RESTART_COUNT": str(restarts)}
    r = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)
    return r, calls.read_text().splitlines() if calls.exists() else []


def test_node_loss_requeue_sets_the_node_down_and_requeues_at_the_submitted_task_count(tmp_path):
    """--on-node-loss=requeue (the default): srun ends with n2's failure, the probe finds n2 silent while
    Slurm still shows it idle: the script names it, sets it DOWN (so the requeued job is not given it),
    requeues the job and sets its task count back to MIN x tasks per node (2), exit 0; no second srun."""
    assert SbatchOptions(nodes=2, min_nodes=1).on_node_loss == "requeue"
    r, calls = _run_elastic(tmp_path, "requeue")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [c for c in calls if c.startswith("srun")] == [calls[0]] and "--nodelist=n[1-2]" in calls[0]
    rest = calls[1:]
    assert rest[0] == 'scontrol update nodename=n2 state=down reason=clusterlm: lost by job 7'
    assert rest[1] == "scontrol requeue 7"
    assert set(rest[2:]) == {"scontrol update jobid=7 NumTasks=2"}, rest  # both staggered tries, as Slurm takes them
    assert "clusterlm: srun exited with 137; node(s) lost: n2; 1 node(s) left (n1), " in r.stdout
    assert "clusterlm: set node n2 DOWN (it was idle to Slurm; reason: lost by job 7)" in r.stdout
    assert "clusterlm: requeueing job 7 (restart 1 of at most 3)" in r.stdout


def test_node_loss_requeue_leaves_a_down_node_alone_and_excludes_when_not_operator(tmp_path):
    """A node Slurm holds DOWN already keeps its state and reason (no node update); a user who may not set
    nodes DOWN excludes the lost node from the requeued job instead (ExcNodeList)."""
    (tmp_path / "a").mkdir()
    r, calls = _run_elastic(tmp_path / "a", "requeue", node2_state="down*")
    assert r.returncode == 0 and not any("nodename" in c for c in calls), calls
    assert "clusterlm: node n2 is down* to Slurm already" in r.stdout
    assert set(calls[2:]) == {"scontrol update jobid=7 NumTasks=2"}, calls
    (tmp_path / "b").mkdir()
    r, calls = _run_elastic(tmp_path / "b", "requeue", node2_state="alloc*", operator=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cannot set node n2 DOWN (not a Slurm operator); excluding it from the requeued job" in r.stdout
    assert set(calls[3:]) == {"scontrol update jobid=7 NumTasks=2 ExcNodeList=n2"}, calls


def test_node_loss_requeue_is_capped(tmp_path):
    """After MAX_RANK_LOST_REQUEUES requeues a lost node ends the job (srun's code) instead of another requeue."""
    r, calls = _run_elastic(tmp_path, "requeue", restarts=slurm.MAX_RANK_LOST_REQUEUES)
    assert r.returncode == 137, r.stdout + r.stderr
    assert not any("requeue" in c or "update" in c for c in calls), calls
    assert "not requeueing job 7: requeued 3 times already (at most 3)" in r.stdout


def test_node_loss_continue_restarts_in_the_allocation(tmp_path):
    """--on-node-loss=continue: no requeue, no node update; srun again on n1 alone (2 tasks, dp_replicate=1
    last, --overlap) in the same allocation, and the job ends with that round's 0."""
    r, calls = _run_elastic(tmp_path, "continue")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(calls) == 2 and all(c.startswith("srun") for c in calls), calls
    assert "--overlap --nodes=1 --ntasks=2 --nodelist=n1" in calls[1] and calls[1].endswith("--parallel.dp_replicate=1")
    assert "node(s) lost: n2; restarting on n1 (1 node(s))" in r.stdout


def test_on_node_loss_option(tmp_path):
    """Only requeue or continue; continue needs an elastic job; the CLI option reaches the script."""
    with pytest.raises(ConfigError, match="--on-node-loss='later' must be one of requeue, continue"):
        SbatchOptions(nodes=2, min_nodes=1, on_node_loss="later")
    with pytest.raises(ConfigError, match="--on-node-loss=continue needs an elastic job"):
        SbatchOptions(nodes=2, on_node_loss="continue")
    base = [sys.executable, "-m", "clusterlm", "launch", "--slurm", "--dry-run", "--nodes=2", "--min-nodes=1",
            "--ntasks-per-node=1", "--parallel.dp_replicate=2", f"--train.out_dir={tmp_path / 'run'}"]
    r = subprocess.run([*base, "--on-node-loss=continue"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "restarting on $left" in r.stdout and "scontrol requeue" in r.stdout, r.stderr
    assert "NumTasks=" not in r.stdout  # only the preemption/76 requeues
    r = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "NumTasks=1" in r.stdout and "restarting on $left" not in r.stdout, r.stderr


def test_docs_multi_node_example_passes_the_checks(tmp_path):
    """The first command of docs/slurm.md (2 nodes x 8 GPUs, FSDP over 16 ranks), run with --dry-run as
    written, renders its script: the recipe's global batch must split over the 16 ranks."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "slurm.md").read_text()
    start = doc.index("clusterlm launch recipes/gpt2_124m_1gpu.toml --slurm")
    argv = doc[start:].replace("\\\n", " ").split("\n", 1)[0].split()[1:]
    assert argv[:2] == ["launch", "recipes/gpt2_124m_1gpu.toml"] and "--parallel.dp_shard=16" in argv
    code = BLOCK_TORCH + "from clusterlm.cli import main\nsys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *argv, "--dry-run"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], env=os.environ | {"CLUSTERLM_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=8\n" in r.stdout and "--parallel.dp_shard=16" in r.stdout
