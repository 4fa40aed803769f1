"""FSDP2 (dpo_lit.sharding) on CPU: 2 gloo processes of the tiny config train as 1 process at the
same global batch, with every reference; the export is one Hugging Face folder that loads and
gives the trained policy's log-probs; a SIGKILLed sharded run resumes to the uninterrupted weights;
the monitoring callbacks measure what one process measures."""

import signal
from pathlib import Path

import pytest
import torch
from conftest import KILLER, dpo_lit, max_difference, policy_weights
from safetensors.torch import load_file

from dpo_lit.errors import ConfigError
from dpo_lit.logps import completion_logps
from dpo_lit.models import TINY_ALIAS, load_model
from dpo_lit.pipelines.plots import read_scalars
from dpo_lit.sharding import decoder_layers

TINY = ["--config", "configs/dpo/tiny.yaml", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=-1",
        "--trainer.max_steps=12"]  # fmt: skip
FSDP2 = ["--trainer", "configs/trainer/fsdp.yaml", "--trainer.devices=2", "--trainer.accelerator=cpu", "--data.batch_size=4"]
ONE = ["--data.batch_size=8"]
REFERENCES = {
    "copy": ["--model.reference=copy"],
    "precomputed": ["--model.reference=precomputed"],
    "adapter": ["--model.reference=adapter", "--model.lora.r=4", "--model.lora.alpha=8"],
    "synced": ["--model.reference=dpo_lit.reference.SyncedReference", "--model.reference.mixup_alpha=0.5",
               "--model.reference.sync_steps=2"],
}  # fmt: skip


def exported(root: Path) -> dict[str, torch.Tensor]:
    folder = root / "lightning_logs" / "version_0" / "policy"
    return load_file(folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").is_file() else "model.safetensors"))


def fit(root: Path, *args: str) -> None:
    done = dpo_lit("fit", *TINY, *args, f"--trainer.default_root_dir={root}", env={"DPO_LIT_CACHE": str(root / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    if "--trainer.devices=2" in args:
        assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each reference's 12 steps, one process of 8 pairs and FSDP2 over 2 processes of 4 (as asked)."""
    made: dict[tuple[str, str], Path] = {}

    def run(reference: str, mode: str) -> Path:
        if (reference, mode) not in made:
            root = tmp_path_factory.mktemp(f"{reference}-{mode}")
            fit(root, *REFERENCES[reference], *(FSDP2 if mode == "fsdp2" else ONE))
            made[reference, mode] = root
        return made[reference, mode]

    return run


@pytest.mark.parametrize("reference", list(REFERENCES))
def test_fsdp2_over_two_processes_trains_as_one_process(runs, reference):
    one, two = exported(runs(reference, "one")), exported(runs(reference, "fsdp2"))
    assert one.keys() == two.keys() and any("lora_B" in k for k in one) == (reference == "adapter")
    assert max_difference(one, two) <= 1e-5  # the same global batches; gradients summed in another order
    a, b = policy_weights(runs(reference, "one")), policy_weights(runs(reference, "fsdp2"))
    assert b["global_step"] == 12 and max_difference(a, b) <= 1e-5  # last.ckpt: one full file


def test_the_precomputed_reference_is_computed_once_across_ranks(runs):
    log = (runs("precomputed", "fsdp2") / "cache" / "ref_logps")
    assert len(list(log.glob("*.pt"))) == 2  # train and val, each written once by rank 0


def test_the_export_loads_and_gives_the_trained_policys_logps(runs):
    from transformers import AutoModelForCausalLM

    root = runs("copy", "fsdp2")
    loaded = AutoModelForCausalLM.from_pretrained(root / "lightning_logs" / "version_0" / "policy").eval()
    trained = load_model(TINY_ALIAS).eval()
    state = {k.removeprefix("policy."): v for k, v in policy_weights(root).items() if k.startswith("policy.")}
    trained.load_state_dict(state)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 13, 14, 15, 0, 0]])
    mask = (torch.arange(8) < torch.tensor([[8], [6]])).long()
    completion = mask.bool() & (torch.arange(8) >= 3)
    with torch.no_grad():
        ours, theirs = completion_logps(trained, ids, mask, completion)[0], completion_logps(loaded, ids, mask, completion)[0]
    assert torch.equal(ours, theirs)
    untrained = completion_logps(load_model(TINY_ALIAS).eval(), ids, mask, completion)[0].detach()
    assert (ours - untrained).abs().max() > 1e-3  # the export holds the trained weights, not the initial ones


def test_a_sigkilled_fsdp2_run_resumes_to_the_uninterrupted_weights(tmp_path, runs):
    (tmp_path / "killer.py").write_text(KILLER)
    run = [*FSDP2, *REFERENCES["copy"], f"--trainer.default_root_dir={tmp_path / 'b'}"]
    killed = dpo_lit("fit", *TINY, *run, "--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.step=9",
                     env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = tmp_path / "b" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == 6  # the end of epoch 0 (6 global batches)
    resumed = dpo_lit("fit", *TINY, *run, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert max_difference(policy_weights(runs("copy", "fsdp2")), policy_weights(tmp_path / "b")) == 0.0


def test_sampled_kl_under_fsdp2_is_one_process_kl(tmp_path):
    kl = ["--trainer.callbacks+=dpo_lit.callbacks.SampledKL", "--trainer.callbacks.num_prompts=8",
          "--trainer.callbacks.max_new_tokens=12", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
          "--trainer.limit_val_batches=1"]  # fmt: skip
    fit(tmp_path / "one", *REFERENCES["copy"], *ONE, *kl)
    fit(tmp_path / "two", *REFERENCES["copy"], *FSDP2, *kl)
    one, two = read_scalars(tmp_path / "one"), read_scalars(tmp_path / "two")
    assert [s for s, _ in one["val/kl"]] == [s for s, _ in two["val/kl"]] == [3]
    assert abs(one["val/kl"][0][1]) > 0.01  # the policy has moved (a sampled estimate: either sign)
    assert two["val/kl"][0][1] == pytest.approx(one["val/kl"][0][1], rel=1e-4)
    assert two["val/kl_stderr"][0][1] == pytest.approx(one["val/kl_stderr"][0][1], rel=1e-4)


def test_a_model_without_named_decoder_layers_cannot_be_sharded():
    model = load_model(TINY_ALIAS)
    assert {type(m).__name__ for m in decoder_layers(model)} == {"LlamaDecoderLayer"} and len(decoder_layers(model)) == 2
    model._no_split_modules = None
    with pytest.raises(ConfigError, match="names no decoder layer class in _no_split_modules"):
        decoder_layers(model)
