"""Runs that end early end well: a SIGKILLed run resumes to the exact weights of an uninterrupted
one, 2 DDP processes train as 1 at the same global batch, a checkpoint is whole or not written."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_lit.callbacks.checkpoint import AtomicCheckpointIO
from dpo_lit.errors import OutputError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/dpo/tiny.yaml", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=-1"]
EVERY_5_STEPS = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.every_n_train_steps=5", "--trainer.callbacks.save_top_k=-1"]  # fmt: skip
KILLER = '''
import os, signal
from lightning import Callback

class KillAt(Callback):
    """SIGKILL this process (no cleanup, no final checkpoint) once training reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def dpo_lit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``dpo-lit`` in a fresh process, offline, one thread per process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DPO_LIT_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dpo_lit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def policy_weights(root: Path, version: int = 0) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt",
                            weights_only=True)  # fmt: skip
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")} | {
        "global_step": torch.tensor(checkpoint["global_step"])
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tiny config's 48 steps (8 epochs of 6 batches) without interruption: its final weights."""
    root = tmp_path_factory.mktemp("straight")
    done = dpo_lit("fit", *TINY, "--trainer.max_steps=48", f"--trainer.default_root_dir={root}")
    assert done.returncode == 0, done.stderr[-2000:]
    return policy_weights(root)


@pytest.mark.parametrize(
    "checkpoints, kill_at, resumed_from",
    [([], 9, 6), (EVERY_5_STEPS, 13, 10)],  # first checkpoint at the end of epoch 0 (6 batches); or every 5 steps
    ids=["epoch-end", "every-5-steps"],
)
def test_a_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path, straight, checkpoints, kill_at, resumed_from):
    """The 48 steps straight through, against the same run SIGKILLed mid-epoch and resumed with
    --ckpt_path last: the data order, the LR schedule, the optimizer and the RNG go on where the
    checkpoint left them, to the bit."""
    (tmp_path / "killer.py").write_text(KILLER)
    run = [*TINY, "--trainer.max_steps=48", f"--trainer.default_root_dir={tmp_path / 'b'}", *checkpoints]
    killed = dpo_lit("fit", *run, "--trainer.callbacks+=killer.KillAt", f"--trainer.callbacks.step={kill_at}",
                     env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = tmp_path / "b" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == resumed_from
    assert not list(saved.parent.glob("*.partial"))

    resumed = dpo_lit("fit", *run, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"ckpt_path=last: {saved}" in resumed.stderr + resumed.stdout
    assert "not resumable" not in resumed.stderr  # Lightning's warning for loaders that restart an epoch
    resumed_weights = policy_weights(tmp_path / "b", version=1)
    assert resumed_weights["global_step"] == 48
    assert max_difference(straight, resumed_weights) == 0.0


@pytest.mark.parametrize(
    "reference, ddp",
    [("copy", ["--trainer.strategy=ddp", "--trainer.devices=2"]), ("precomputed", ["--trainer", "configs/trainer/ddp.yaml"])],
)
def test_two_ddp_processes_train_as_one_at_the_same_global_batch(tmp_path, reference, ddp):
    """12 steps with 2 gloo processes of batch 4 against 1 process of batch 8: each rank trains on
    its half of the same global batches, so the weights agree to float rounding; the precomputed
    reference is computed once (each rank its share of the examples), and cached once."""
    common = [*TINY, "--trainer.max_steps=12", f"--model.reference={reference}"]
    one = dpo_lit("fit", *common, "--data.batch_size=8", f"--trainer.default_root_dir={tmp_path / 'one'}",
                  env={"DPO_LIT_CACHE": str(tmp_path / "cache-one")})  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = dpo_lit("fit", *common, "--data.batch_size=4", *ddp,
                  f"--trainer.default_root_dir={tmp_path / 'two'}", env={"DPO_LIT_CACHE": str(tmp_path / "cache-two")})  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = policy_weights(tmp_path / "one"), policy_weights(tmp_path / "two")
    assert b["global_step"] == 12
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in two.stdout + two.stderr
    assert max_difference(a, b) <= 1e-4  # float rounding: the two processes sum the gradient in another order
    if reference == "precomputed":
        log = two.stdout + two.stderr
        assert log.count("Reference log-probs for 48 train pairs computed") == 1
        assert log.count("Reference log-probs for 16 val pairs computed") == 1
        assert len(list((tmp_path / "cache-two" / "ref_logps").glob("*.pt"))) == 2


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path):
    """The write goes to NAME.partial first: here that is /dev/full, so it fails with "No space
    left on device" as on a full disk; last.ckpt keeps its previous contents and the error names it."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    (tmp_path / "last.ckpt.partial").symlink_to("/dev/full")
    with pytest.raises(OutputError, match=rf"^{path}: cannot write: No space left on device$"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(1 << 16)}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert not (tmp_path / "last.ckpt.partial").exists()
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    done = dpo_lit("fit", *TINY, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path / 'a_file' / 'runs'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"dpo-lit: error: {tmp_path / 'a_file' / 'runs'}: Not a directory"
    assert "Traceback" not in done.stderr
