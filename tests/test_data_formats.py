"""Every format end to end on real and written rows, and every bad record named by file, line, field."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from dpo_lit.data import (
    DataError,
    DataReport,
    DataWarning,
    PairedExample,
    UnpairedExample,
    detect_format,
    read_examples,
)
from dpo_lit.data.formats import split_implicit_messages, split_implicit_text

HH = "preference/hh_rlhf_test/harmless-base-test.jsonl.gz"
UF = "preference/ultrafeedback_sample/eval_200.jsonl.gz"
MARKER = "\n\nAssistant:"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write(tmp_path: Path, rows: list[object], name: str = "d.jsonl") -> str:
    path = tmp_path / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def test_hh_rlhf_transcripts_split_after_the_last_assistant_marker(shared_data: Path) -> None:
    report = DataReport("skip")  # four transcripts end in an empty assistant turn
    examples = read_examples([str(shared_data / HH)], report=report)
    with pytest.warns(
        DataWarning, match=r"harmless-base-test\.jsonl\.gz: skipped 4 record\(s\): field 'chosen'"
    ):
        report.warn(1024, 512)
    raw = [json.loads(line) for line in gzip.open(shared_data / HH, "rt", encoding="utf-8")]
    assert len(examples) == len(raw) - 4
    for example in examples:
        line = int(example.source.rsplit(":", 1)[1])
        assert example.prompt.endswith(MARKER) and example.prompt.startswith("\n\nHuman:")
        assert not example.chosen.startswith("\n\nHuman") and not example.rejected.startswith("\n\nHuman")
        assert example.prompt + example.chosen == raw[line - 1]["chosen"]
        assert example.prompt + example.rejected == raw[line - 1]["rejected"]


def test_ultrafeedback_rows_are_standard(shared_data: Path) -> None:
    examples = read_examples([str(shared_data / UF)], report=DataReport("skip"))  # one pair is identical
    raw = json.loads(gzip.open(shared_data / UF, "rt").readline())
    assert detect_format(raw, "x") == "standard"
    assert examples[0] == PairedExample(
        raw["prompt"], raw["chosen"], raw["rejected"], f"{shared_data / UF}:1"
    )
    assert len(examples) == 199


def test_implicit_split_falls_back_to_the_common_prefix() -> None:
    assert split_implicit_text("Q: x? A: yes", "Q: x? A: no", MARKER) == ("Q: x? A: ", "yes", "no")
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert split_implicit_text(text + " d", text + " e", MARKER) == (text, " d", " e")


def test_implicit_message_lists_split_before_the_last_assistant_turn() -> None:
    shared = [user("a"), assistant("b"), user("c")]
    chosen, rejected = [*shared, assistant("d")], [*shared, assistant("e")]
    assert split_implicit_messages(chosen, rejected) == (shared, [assistant("d")], [assistant("e")])
    # The shared part ending in an assistant message is cut back to where both answer.
    chosen, rejected = [*shared, assistant("d"), user("f")], [*shared, assistant("d")]
    assert split_implicit_messages(chosen, rejected)[0] == shared


def test_conversational_openai_and_unpaired(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be kind."}
    conv = {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Bye.")]}
    openai = [
        {
            "input": {"messages": m},
            "preferred_output": [assistant("Hello!")],
            "non_preferred_output": [assistant("Bye.")],
        }
        for m in ([user("Hi")], [system, user("Hi")])
    ]
    implicit = {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Bye.")]}
    unpaired = [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": "Hi", "completion": "Bye.", "label": False},
    ]
    files = [
        write(tmp_path, [conv], "c.jsonl"),
        write(tmp_path, openai, "o.jsonl"),
        write(tmp_path, [implicit], "i.jsonl"),
    ]
    examples = read_examples(files)
    assert [e.prompt for e in examples] == [[user("Hi")], [user("Hi")], [system, user("Hi")], [user("Hi")]]
    assert all(e.chosen == [assistant("Hello!")] and e.rejected == [assistant("Bye.")] for e in examples)
    assert read_examples([write(tmp_path, unpaired, "u.jsonl")], mode="unpaired") == [
        UnpairedExample("Hi", "Hello!", True, f"{tmp_path}/u.jsonl:1"),
        UnpairedExample("Hi", "Bye.", False, f"{tmp_path}/u.jsonl:2"),
    ]


def test_format_can_be_forced(tmp_path: Path) -> None:
    row = {
        "prompt": "ignored",
        "chosen": "\n\nHuman: a\n\nAssistant: b",
        "rejected": "\n\nHuman: a\n\nAssistant: c",
    }
    [example] = read_examples([write(tmp_path, [row])], format="implicit")
    assert (example.prompt, example.chosen) == ("\n\nHuman: a\n\nAssistant:", " b")


def test_unpaired_data_in_paired_mode_says_to_use_unpaired_mode(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "Hi", "completion": "Hello!", "label": True}])
    with pytest.raises(DataError, match="use `mode: unpaired` in the data config with KTOLoss"):
        read_examples([path])


def test_undetectable_keys(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: cannot detect the data format from the keys \['question'\]"
    ):
        read_examples([write(tmp_path, [{"question": "Hi"}])])


GOOD = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
CONV = {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Bye.")]}
OPENAI = {
    "input": {"messages": [user("Hi")]},
    "preferred_output": [assistant("A")],
    "non_preferred_output": [assistant("B")],
}
UNPAIRED = {"prompt": "Hi", "completion": "Hello!", "label": True}
BAD_RECORDS = {
    "malformed JSON": (GOOD, '{"prompt": "Hi", "chosen": ', "malformed JSON"),
    "missing field": (GOOD, {"prompt": "Hi", "chosen": "Hello!"}, "field 'rejected': missing"),
    "wrong type": (GOOD, {**GOOD, "chosen": 3}, "field 'chosen': expected a non-empty string, got int"),
    "empty text": (
        GOOD,
        {**GOOD, "prompt": "  "},
        "field 'prompt': expected a non-empty string, got an empty string",
    ),
    "identical": (
        GOOD,
        {**GOOD, "rejected": "Hello!"},
        "fields 'chosen' and 'rejected': identical completions",
    ),
    "not an object": (GOOD, "[1, 2]", "expected a JSON object"),
    "message without content": (
        CONV,
        {**CONV, "chosen": [{"role": "assistant"}]},
        "field 'chosen[0].content': missing",
    ),
    "message list is a string": (
        CONV,
        {**CONV, "rejected": "Bye."},
        "field 'rejected': expected a non-empty list",
    ),
    "empty assistant message": (
        CONV,
        {**CONV, "chosen": [assistant("")]},
        "field 'chosen[0].content': expected a non",
    ),
    "openai missing output": (
        OPENAI,
        {"input": OPENAI["input"], "preferred_output": [assistant("A")]},
        "field 'non_preferred_output': missing",
    ),
    "openai input not object": (OPENAI, {**OPENAI, "input": "Hi"}, "field 'input': expected an object"),
    "implicit empty completion": (
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: "},
        "field 'rejected': empty string after splitting off the shared prompt",
    ),
    "label not boolean": (
        UNPAIRED,
        {**UNPAIRED, "label": "maybe"},
        "field 'label': expected a boolean, got a string",
    ),
    "unknown role": (
        CONV,
        {**CONV, "prompt": [{"role": "narrator", "content": "Once"}, user("Hi")]},
        "field 'prompt[0].role': unknown role 'narrator'; expected one of system, user, assistant, tool (a chat "
        "template with more roles: list them in data.extra_roles)",
    ),
    "completion ends with the user": (
        CONV,
        {**CONV, "chosen": [assistant("Hello!"), user("And?")]},
        "field 'chosen[1].role': a completion must end with an assistant turn, not 'user'",
    ),
    "openai output not the assistant's": (
        OPENAI,
        {**OPENAI, "non_preferred_output": [user("B")]},
        "field 'non_preferred_output[0].role': a completion must end with an assistant turn, not 'user'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_raises_naming_file_line_and_field(tmp_path: Path, case: str) -> None:
    good, bad, message = BAD_RECORDS[case]
    path = write(tmp_path, [good, good, bad, good], "bad data.jsonl")
    mode = "unpaired" if "label" in good else "paired"
    with pytest.raises(DataError) as info:
        read_examples([path], mode=mode)
    assert str(info.value).startswith(f"{path}:3: {message}")
    assert "\n" not in str(info.value)
    report = DataReport("skip")
    examples = read_examples([path], mode=mode, report=report)
    assert len(examples) == 3
    pattern = rf"bad data\.jsonl: skipped 1 record\(s\): {re.escape(message)}.* \(first at .*:3\)$"
    with pytest.warns(DataWarning, match=pattern) as record:
        report.warn(1024, 512)
    assert len(record) == 1


def test_extra_roles_are_accepted_when_listed(tmp_path: Path) -> None:
    record = {**CONV, "prompt": [{"role": "ipython", "content": "ran: 2"}, user("Hi")]}
    path = write(tmp_path, [record], "roles.jsonl")
    with pytest.raises(DataError, match="unknown role 'ipython'"):
        read_examples([path])
    [example] = read_examples([path], extra_roles=["ipython"])
    assert example.prompt[0] == {"role": "ipython", "content": "ran: 2"}
