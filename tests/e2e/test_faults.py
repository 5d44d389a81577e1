"""The fault catalogue (docs/reliability.md), each fault made on purpose: a full disk during a save,
a corrupted shard of a distributed (DCP) checkpoint, a NaN on one rank only.
Reference: FIELD_NOTES "Reliability practice": atomic checkpoints (the manifest written last, a
damaged folder never trusted), all ranks taking the same decision; errors.py's contract for OS errors
(one line naming the path, nothing half-written)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from clusterlm.checkpoint.layout import read_latest, step_folders
from clusterlm.checkpoint.manager import Checkpointer
from clusterlm.checkpoint.store import verify_checkpoint
from clusterlm.config import CheckpointConfig
from tests.distributed.helpers import run_ranks


class Loader:
    pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def _steps(ckpt: Checkpointer, model, opt, state, loader, n: int) -> None:
    for _ in range(n):
        model(torch.randn(2, model.in_features)).sum().backward()
        opt.step()
        state.step += 1
        ckpt.save(state, model, opt, loader, reason="periodic")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 6 MB tmpfs (root only), or None when it cannot be mounted."""
    target = tmp_path / "disk"
    target.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(target)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, small_disk, monkeypatch):
    """On a 6 MB tmpfs a ~3 MB checkpoint (512x512 weights, AdamW moments) fits once: the second save
    fails with one OSError line naming a file of the staging folder and "No space left on device"; no
    step folder or staging folder is left half-written, step 1 still verifies and `latest` names it,
    and a resume loads it. (Without root, ENOSPC is raised by the tensor writer instead.)"""
    from clusterlm.checkpoint import store

    root = (small_disk or tmp_path) / "checkpoints"
    if small_disk is None:
        write = store.write_tensors

        def full(path, *a, **k):
            if "step-00000002" in str(path):
                raise OSError(28, "No space left on device")
            return write(path, *a, **k)

        monkeypatch.setattr(store, "write_tensors", full)
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(root, CheckpointConfig(keep_last=3), config_toml="")
    state, loader = ckpt.load_into(model, opt, Loader()), Loader()
    _steps(ckpt, model, opt, state, loader, 1)
    with pytest.raises(OSError) as err:
        _steps(ckpt, model, opt, state, loader, 1)
    line = str(err.value)
    # named as the file of the step folder it would have been, not the hidden staging folder's
    assert "\n" not in line and "No space left on device" in line and "checkpoints/step-00000002/" in line, line
    assert ".partial-" not in line, line
    assert [p.name for p in step_folders(root)] == ["step-00000001"] and read_latest(root) == "step-00000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    assert verify_checkpoint(root / "step-00000001") == []
    resumed = Checkpointer(root, CheckpointConfig(), config_toml="", resume="auto")
    assert resumed.load_into(torch.nn.Linear(512, 512), torch.optim.AdamW(model.parameters()), Loader()).step == 1


@pytest.mark.parametrize("async_save, failing", [(False, "shards"), (True, "shards"), (False, "model.safetensors")])
def test_disk_full_during_a_distributed_save_is_one_os_error(tmp_path, small_disk, monkeypatch, async_save, failing):
    """Reference: the single-process save above. A DCP save (1 gloo rank, synchronous or in the
    background) on a 6 MB tmpfs that holds one ~4 MB checkpoint: the second save ends with one OSError,
    errno ENOSPC, naming the step folder (not the hidden partial one), which the CLI reports with exit 74;
    step 1 and `latest` intact, nothing hidden left, and a resume loads step 1. (DCP gathers the ranks'
    errors into a CheckpointException, a BaseException the CLI printed as a traceback with exit 1, and
    on a full disk its error is torch.save's "unexpected pos" RuntimeError, without errno. Without root,
    DCP's item writer raises ENOSPC instead; `failing="model.safetensors"`: rank 0's full-weights file,
    whose writer says "os error 28" without the file.)"""
    import errno

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        root = ((small_disk if failing == "shards" else None) or tmp_path) / "checkpoints"
        torch.manual_seed(0)
        model = torch.nn.Linear(512, 512)
        opt = torch.optim.AdamW(model.parameters())
        ckpt = Checkpointer(root, CheckpointConfig(keep_last=3, async_save=async_save), config_toml="",
                            distributed=True)
        state, loader = ckpt.load_into(model, opt, Loader()), Loader()
        _steps(ckpt, model, opt, state, loader, 1)
        ckpt.wait()
        if failing == "model.safetensors":
            import safetensors.torch
            from safetensors import SafetensorError

            def full_weights(*a, **k):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

            monkeypatch.setattr(safetensors.torch, "save_file", full_weights)
        elif small_disk is None:
            import torch.distributed.checkpoint.filesystem as fs

            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(fs, "_write_item", full)
        with pytest.raises(OSError) as err:
            _steps(ckpt, model, opt, state, loader, 1)
            ckpt.wait()
        assert type(err.value) is OSError and err.value.errno == errno.ENOSPC, repr(err.value)
        assert err.value.filename.startswith(str(root / "step-00000002")), err.value.filename
        if failing == "model.safetensors":
            assert err.value.filename == str(root / "step-00000002" / "model.safetensors")
        assert [p.name for p in step_folders(root)] == ["step-00000001"] and read_latest(root) == "step-00000001"
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
        assert verify_checkpoint(root / "step-00000001") == []
        monkeypatch.undo()
        fresh = torch.nn.Linear(512, 512)
        resumed = Checkpointer(root, CheckpointConfig(), config_toml="", resume="auto", distributed=True)
        assert resumed.load_into(fresh, torch.optim.AdamW(fresh.parameters()), Loader()).step == 1
    finally:
        dist.destroy_process_group()


def test_corrupt_dcp_shard_is_detected_before_loading(tmp_path, caplog):
    """A distributed checkpoint (DCP, 1 gloo rank) with one byte of its newest shard file flipped is
    rejected by the manifest check before DCP reads it (the warning names the shard), and resume=auto
    loads the previous checkpoint: weights equal those saved at step 1."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(model.parameters())
        root = tmp_path / "checkpoints"
        ckpt = Checkpointer(root, CheckpointConfig(keep_last=3), config_toml="", distributed=True)
        state, loader = ckpt.load_into(model, opt, Loader()), Loader()
        _steps(ckpt, model, opt, state, loader, 1)
        at_step1 = model.weight.detach().clone()
        _steps(ckpt, model, opt, state, loader, 1)
        [shard] = sorted((root / "step-00000002" / "dcp").glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        fresh = torch.nn.Linear(8, 8)
        resumed = Checkpointer(root, CheckpointConfig(), config_toml="", resume="auto", distributed=True)
        assert resumed.load_into(fresh, torch.optim.AdamW(fresh.parameters()), Loader()).step == 1
        assert torch.equal(fresh.weight, at_step1)
        assert f"dcp/{shard.name} sha256" in caplog.text and "skipping corrupt checkpoint" in caplog.text
    finally:
        dist.destroy_process_group()


def _nan_rank(rank: int, world: int, args: list[str]) -> dict:
    """`clusterlm train` on this rank; rank 1 alone gets a NaN loss at step 3"""
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    trainer = Trainer(load_run_config(None, args))
    fb, skipped = trainer.pm.forward_backward, []

    def forward_backward(*a, **k):
        loss = fb(*a, **k)
        return loss * float("nan") if rank == 1 and trainer.state.step == 2 else loss

    trainer.pm.forward_backward = forward_backward
    step = trainer.train_step

    def train_step():
        out = step()
        if trainer.state.bad_streak:
            skipped.append(trainer.state.step)
        return out

    trainer.train_step = train_step
    r = trainer.run()
    return {"exit": r.exit_code, "step": r.step, "skipped": skipped, "bad": trainer.state.bad_steps_total}


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_all(tmp_path):
    """2 ranks under FSDP, a NaN loss on rank 1 only at step 3: the loss is all-reduced before the
    check, so both ranks skip step 3's optimizer step (and only it) and finish all 6 steps."""
    from clusterlm.data.prepare import prepare

    (tmp_path / "t.txt").write_text("".join(f"To be or not to be {i}\n" * 20 for i in range(20)))
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", val_fraction=0.1)
    args = [f"--data.dir={tmp_path / 'data'}", f"--train.out_dir={tmp_path / 'run'}", "--model.preset=llama-nano",
            "--model.max_seq_len=32", "--train.seq_len=32", "--train.micro_batch_size=4", "--train.max_steps=6",
            "--train.device=cpu", "--train.threads=1", "--train.eval_interval=0", "--checkpoint.interval=0",
            "--train.tensorboard=false", "--parallel.dp_shard=2", "--train.skip_memory_check=true"]
    assert run_ranks(2, _nan_rank, args) == [{"exit": 0, "step": 6, "skipped": [3], "bad": 1}] * 2
