"""Model loading by alias, GGUF file and folder; the SmolLM2 conversion is checked against the GGUF."""

from pathlib import Path

import pytest
import torch

from dpo_lit import models


def test_tiny_alias_is_materialised_once_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path))
    path = Path(models.resolve(models.TINY_ALIAS))
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert models.resolve(models.TINY_ALIAS) == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    model = models.load_model(models.TINY_ALIAS)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert not list(tmp_path.glob(".tiny-random-llama-*"))  # no temporary folder left


def test_tiny_tokenizer_round_trips_and_has_chat_template():
    tok = models.load_tokenizer(models.TINY_ALIAS)
    text = "Héllo, wörld! 12 + 30 = 42\n\tdone"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == text
    assert tok.padding_side == "right" and tok.pad_token_id != tok.eos_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_failed_build_leaves_nothing_behind(tmp_path):
    def broken(out_dir: Path) -> None:
        (out_dir / "partial.bin").write_bytes(b"x")
        raise RuntimeError("conversion interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        models._materialise(tmp_path / "model", broken)
    assert list(tmp_path.iterdir()) == []


def test_gguf_path_is_converted_into_a_cache_folder_keyed_by_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, out_dir):  # the real conversion is covered by the slow test below
        calls.append(Path(src))
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    first = models.resolve(str(gguf))
    assert models.resolve(str(gguf)) == first and calls == [gguf]
    gguf.write_bytes(b"GGUF2")  # a changed file gets a new folder
    assert models.resolve(str(gguf)) != first
    with pytest.raises(FileNotFoundError):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not found"):
        models.resolve("./no/such/model")


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_model():
    from transformers import AutoModelForCausalLM

    gguf = models.smollm2_gguf_path()
    converted = models.load_model(models.SMOLLM2_ALIAS)
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = models.load_tokenizer(models.SMOLLM2_ALIAS)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = converted(ids).logits, original(ids).logits
    torch.testing.assert_close(a, b)
    assert a[0, -1].argmax() == b[0, -1].argmax()
