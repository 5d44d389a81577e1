"""Slurm's text, read: every parser of what Slurm prints or is given, as pure functions.

    sinfo -h -o "%P|%a|%l|%D|%N|%G|%c|%m"           -> parse_sinfo             -> [PartitionSpec]
    sinfo -h -N -o "%P|%N|%t"                       -> parse_sinfo_node_states -> {partition: {host: state}}
    scontrol show partition -o                      -> parse_scontrol_show_partition -> {partition: MaxNodes}
    scontrol --version                              -> parse_scontrol_version  -> "23.11.4"
    GRES strings ("gpu:h100:8(S:0-1)")              -> parse_gres              -> [(name, type, count)]
    sacct --parsable2 -X -D ... / squeue ... / scontrol show job -> parse_sacct / parse_squeue /
                                                       parse_scontrol_show_job -> {job id: JobState}
    SLURM_JOB_NODELIST ("node[01-03,07]")           -> expand_nodelist         -> [host]
    --time ("[D-]HH:MM:SS")                         -> parse_time_limit        -> seconds

None runs a command or reads the environment: the probe (probe.py), `clusterlm jobs` (slurm.py)
and the launcher (parallel/launch.py) pass the text in, so each parser is tested on recorded
outputs (tests/unit/fixtures/). Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clusterlm.cluster.spec import PartitionSpec
from clusterlm.errors import ConfigError

SINFO_FORMAT = "%P|%a|%l|%D|%N|%G|%c|%m"
SINFO_NODE_STATE_FORMAT = "%P|%N|%t"  # with -N: one line per node and partition
# compact node states (sinfo %t) in which a node takes no new job: down, drained or draining, failed,
# not yet part of the cluster, unknown; a trailing "*" (not responding) makes any state unusable
UNUSABLE_NODE_STATES = frozenset({"down", "drain", "drained", "drng", "draining", "fail", "failg", "failing",
                                  "futr", "future", "inval", "unk", "unknown"})
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")  # [D-]HH:MM:SS
# Slurm job states that will not change any more (squeue/sacct/scontrol spell them the same)
TERMINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "REVOKED"})


# ---- cluster and version ------------------------------------------------------------------------------
def parse_sinfo(text: str) -> list[PartitionSpec]:
    """`sinfo -h -o "%P|%a|%l|%D|%N|%G|%c|%m"`. A partition on several lines (node groups with
    different GRES or CPUs) is merged: nodes added, other fields joined."""
    parts: dict[str, dict] = {}
    for line in text.strip().splitlines():
        cols = line.split("|")
        if len(cols) < 8:
            continue
        name, avail, limit, nodes, nodelist, gres, cpus, mem = (c.strip() for c in cols[:8])
        default = name.endswith("*")
        name = name.rstrip("*")
        p = parts.setdefault(name, dict(name=name, default=default, avail=avail, timelimit=limit, nodes=0,
                                        nodelist=[], gres=[], cpus=[], memory_mb=[]))
        m = re.match(r"\s*(\d+)", nodes)  # sinfo may print "4+"
        p["nodes"] += int(m.group(1)) if m else 0
        for key, val in (("nodelist", nodelist), ("gres", gres), ("cpus", cpus), ("memory_mb", mem)):
            if val not in p[key]:
                p[key].append(val)
    return [PartitionSpec(name=p["name"], default=p["default"], avail=p["avail"], timelimit=p["timelimit"],
                          nodes=p["nodes"], nodelist=",".join(p["nodelist"]), gres=",".join(p["gres"]),
                          cpus=",".join(p["cpus"]), memory_mb=",".join(p["memory_mb"])) for p in parts.values()]


def parse_sinfo_node_states(text: str) -> dict[str, dict[str, str]]:
    """`sinfo -h -N -o "%P|%N|%t"` -> {partition: {host: compact state}}; the default partition's
    trailing "*" is dropped. Lines of another shape are skipped."""
    out: dict[str, dict[str, str]] = {}
    for line in text.strip().splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) != 3 or not cols[0] or not cols[1]:
            continue
        out.setdefault(cols[0].rstrip("*"), {})[cols[1]] = cols[2].lower()
    return out


def node_state_usable(state: str) -> bool:
    """Whether a node in compact state `state` (sinfo %t: "idle", "mix", "down*", "drng", ...) can
    take a new job: not down/drained/failed and responding ("*")."""
    return not state.endswith("*") and state.rstrip("~#!%$@^-") not in UNUSABLE_NODE_STATES


def parse_scontrol_show_partition(text: str) -> dict[str, int | None]:
    """`scontrol show partition -o` (or its multi-line form) -> {partition: MaxNodes per job}, None
    for UNLIMITED or a value that is not a count."""
    out: dict[str, int | None] = {}
    for block in re.split(r"(?m)^(?=\s*PartitionName=)", text.strip()):
        fields = _key_values(block)
        if "PartitionName" in fields:
            value = fields.get("MaxNodes", "")
            out[fields["PartitionName"]] = int(value) if value.isdigit() else None
    return out


def parse_scontrol_version(text: str) -> str | None:
    """`scontrol --version` -> 'slurm 23.11.4' -> '23.11.4'."""
    m = re.search(r"slurm(?:-wlm)?\s+(\d+(?:\.\d+)+\S*)", text, re.IGNORECASE)
    return m.group(1) if m else None


def parse_gres(text: str) -> list[tuple[str, str, int]]:
    """'gpu:h100:8(S:0-1),shard:4' -> [('gpu', 'h100', 8), ('shard', '', 4)]."""
    out = []
    for item in re.split(r",(?![^(]*\))", text.strip()):
        item = re.sub(r"\(.*\)", "", item).strip()
        if not item or item == "(null)":
            continue
        bits = item.split(":")
        count = int(bits[-1]) if len(bits) > 1 and bits[-1].isdigit() else 1
        kind = bits[1] if len(bits) == 3 or (len(bits) == 2 and not bits[1].isdigit()) else ""
        out.append((bits[0], kind, count))
    return out


# ---- time limits and host lists -------------------------------------------------------------------------
def parse_time_limit(value: str) -> int:
    """Slurm time limit "[D-]HH:MM:SS" -> seconds; anything else raises with the valid forms."""
    m = _TIME_RE.match(value.strip())
    if m is None:
        raise ConfigError(f"--time={value!r} is not a time limit; use HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00, 1-12:00:00)")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    if minutes >= 60 or seconds >= 60:
        raise ConfigError(f"--time={value!r}: minutes and seconds must be < 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        raise ConfigError(f"--time={value!r} is zero; give a positive time limit")
    return total


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names: "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5.

    Zero padding of a range is kept (width of its first bound). Several bracket groups in one name
    ("r[1-2]n[1-2]") expand as a product, as `scontrol show hostnames` does.
    """
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    if not hosts:
        raise ValueError(f"SLURM_NODELIST={nodelist!r} names no hosts")
    return hosts


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {s!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unbalanced '[' in host list {s!r}")
    parts.append(cur)
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {rng!r} in host list item {item!r}")
            values = [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]
        else:
            if not rng:
                raise ValueError(f"empty range in host list item {item!r}")
            values = [rng]
        out.extend(head + v for v in values)
    return [h + t for h in out for t in _expand_one(tail)]


# ---- job state: parsers of recorded outputs, then the runner ------------------------------------
@dataclass
class JobState:
    job_id: str
    state: str = "UNKNOWN"
    restarts: int | None = None
    exit_code: str = ""
    elapsed: str = ""
    nodes: str = ""
    reason: str = ""
    source: str = ""  # sacct, squeue or scontrol


def parse_sacct(text: str) -> dict[str, JobState]:
    """`sacct --noheader --parsable2 -X -D --format=JobID,State,ExitCode,Elapsed,NodeList` -> states.

    With -D every requeued run of a job is its own line (State REQUEUED or PREEMPTED), so restarts =
    lines - 1; the last line is the current run. "CANCELLED by 0" keeps only the state word.
    """
    out: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 5 or not parts[0]:
            continue
        job_id, state, exit_code, elapsed, nodes = parts[:5]
        prev = out.get(job_id)
        out[job_id] = JobState(job_id, state.split()[0] if state else "UNKNOWN",
                               0 if prev is None else (prev.restarts or 0) + 1, exit_code, elapsed, nodes, "", "sacct")
    return out


def parse_squeue(text: str) -> dict[str, JobState]:
    """`squeue --noheader --states=all --format=%i|%T|%M|%N|%r` -> states (no restart count in squeue)."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 5 or not parts[0]:
            continue
        job_id, state, elapsed, nodes, reason = parts[:5]
        out[job_id] = JobState(job_id, state, None, "", elapsed, nodes, "" if reason == "None" else reason, "squeue")
    return out


def parse_scontrol_show_job(text: str) -> dict[str, JobState]:
    """`scontrol show job [-o]` (one or many jobs, one line each or multi-line blocks) -> states.

    "No jobs in the system" and "slurm_load_jobs error: Invalid job id specified" give no states."""
    out = {}
    # a job starts at "JobId=": one line each with -o, indented continuation lines without it
    for block in re.split(r"(?m)^(?=\s*JobId=)", text.strip()):
        fields = _key_values(block)
        if "JobId" not in fields:
            continue
        restarts = fields.get("Restarts", "")
        reason = fields.get("Reason", "")
        out[fields["JobId"]] = JobState(fields["JobId"], fields.get("JobState", "UNKNOWN"),
                                        int(restarts) if restarts.isdigit() else None, fields.get("ExitCode", ""),
                                        fields.get("RunTime", ""), fields.get("NodeList", ""),
                                        "" if reason == "None" else reason, "scontrol")
    if not out and text.strip() and "JobId=" in text:
        raise ValueError(f"cannot read `scontrol show job` output: {text[:200]!r}")
    return out


def _key_values(block: str) -> dict[str, str]:
    """Key=Value tokens separated by white space; a token without '=' continues the previous value
    (values such as Command= or Comment= may hold spaces)."""
    fields: dict[str, str] = {}
    last = None
    for token in block.split():
        key, eq, value = token.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][\w:/]*", key):
            fields[key] = value
            last = key
        elif last is not None:
            fields[last] += " " + token
    return fields
