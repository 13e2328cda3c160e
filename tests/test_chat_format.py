"""Chats as OpenAI's fine-tuning users write them: content as text parts, ``weight`` on assistant turns, and
tools, images and audio refused naming the line and the field."""

from __future__ import annotations

import json

import pytest

from greencore.data import IGNORE, DatasetError, encode_dataset, validate_dataset
from greencore.demo import build_tokenizer
from tests.model_folders import write_jsonl


@pytest.fixture(scope="module")
def seq2seq_tokenizer():
    return build_tokenizer(add_eos=True, chat_template=None)


def msg(role: str, content, **extra) -> dict:
    return {"role": role, "content": content, **extra}


def parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


CHAT = [
    msg("system", "be brief"),
    msg("user", "hello there"),
    msg("assistant", "good morning"),
    msg("user", "thank you"),
    msg("assistant", "the cat sleeps"),
]

# Lines that were valid before text parts and weights: several turns, one turn, an empty system message, a
# trailing user message, no system message.
REPRESENTATIVE = [
    CHAT,
    [msg("user", "What is the capital of France?"), msg("assistant", "Paris")],
    [msg("system", ""), msg("user", "Translate: thank you"), msg("assistant", "Merci"), msg("user", "again")],
    [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "the quick brown fox")],
]


def as_parts_and_weights(messages: list[dict]) -> list[dict]:
    """The same chat in OpenAI's long form: content as text parts (split in two where it can be), weight 1 on
    every assistant message."""
    out = []
    for m in messages:
        text = m["content"]
        cut = len(text) // 2
        content = parts(text[:cut], text[cut:]) if text else parts("")
        out.append({**m, "content": content, **({"weight": 1} if m["role"] == "assistant" else {})})
    return out


def encode(tmp_path, tokenizer, chats: list[list[dict]], task="causal_lm", max_seq_len=512):
    summary = validate_dataset(write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in chats]))
    return encode_dataset(summary, tokenizer, task, max_seq_len)


def loss_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])


@pytest.mark.parametrize(
    ("tokenizer_name", "task"),
    [("chat_tokenizer", "causal_lm"), ("plain_tokenizer", "causal_lm"), ("seq2seq_tokenizer", "seq2seq")],
)
def test_lines_valid_before_encode_as_their_long_form(tmp_path, request, tokenizer_name, task):
    tokenizer = request.getfixturevalue(tokenizer_name)
    before = encode(tmp_path, tokenizer, REPRESENTATIVE, task)
    after = encode(tmp_path, tokenizer, [as_parts_and_weights(c) for c in REPRESENTATIVE], task)
    assert len(before) == len(REPRESENTATIVE)
    assert (after.input_ids, after.labels) == (before.input_ids, before.labels)
    assert (after.truncated, after.dropped) == (before.truncated, before.dropped)


def test_text_parts_are_joined_in_order_without_separator(tmp_path, chat_tokenizer):
    joined = [msg("user", "hello there"), msg("assistant", "good morning")]
    split = [msg("user", parts("hel", "lo", " there")), msg("assistant", parts("good", " ", "morning"))]
    rows = [{"messages": joined}, {"messages": split}]
    summary = validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows), chat_tokenizer)
    assert summary.records[1]["messages"] == joined
    assert (
        summary.tokens
        == 2 * validate_dataset(write_jsonl(tmp_path / "one.jsonl", rows[:1]), chat_tokenizer).tokens
    )
    enc = encode_dataset(summary, chat_tokenizer, "causal_lm", 512)
    assert (enc.input_ids[0], enc.labels[0]) == (enc.input_ids[1], enc.labels[1])


def test_an_empty_list_of_parts_is_empty_text(tmp_path, plain_tokenizer):
    with_empty = [msg("system", []), msg("user", "hello there"), msg("assistant", "good morning")]
    with_string = [msg("system", ""), *with_empty[1:]]
    enc = encode(tmp_path, plain_tokenizer, [with_empty, with_string])
    assert (enc.input_ids[0], enc.labels[0]) == (enc.input_ids[1], enc.labels[1])


@pytest.mark.parametrize("tokenizer_name", ["chat_tokenizer", "plain_tokenizer"])
def test_weight_0_turns_are_context_only(tmp_path, request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    first_off = [*CHAT[:2], {**CHAT[2], "weight": 0}, *CHAT[3:]]
    last_off = [*CHAT[:4], {**CHAT[4], "weight": 0}]
    enc = encode(tmp_path, tokenizer, [CHAT, first_off, last_off])
    (ids, full), (ids_first, first), (ids_last, last) = zip(enc.input_ids, enc.labels, strict=True)
    assert ids_first == ids_last == ids  # the text is the same; only the loss changes
    # Every label is the full chat's, or IGNORE; a token is trained in exactly one of the two weighted chats.
    for labels in (first, last):
        assert all(lab in (full_lab, IGNORE) for lab, full_lab in zip(labels, full, strict=True))
    trained_in = [(a != IGNORE) + (b != IGNORE) for a, b in zip(first, last, strict=True)]
    assert trained_in == [int(x != IGNORE) for x in full]
    end = "</s>\n" if tokenizer.chat_template else "</s>"
    assert loss_text(tokenizer, ids, first) == f"the cat sleeps{end}"
    assert loss_text(tokenizer, ids, last) == f"good morning{end}"


# A template that renders only whole chats (ending with an assistant turn), as some do: the spans of the
# assistant turns are then found by searching the text.
WHOLE_CHATS_ONLY = (
    "{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('ends with an answer') }}{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
)


@pytest.mark.parametrize("template", ["demo", "whole chats only"])
def test_weight_0_turn_with_the_same_text_as_a_trained_one(tmp_path, template):
    tokenizer = build_tokenizer() if template == "demo" else build_tokenizer(chat_template=WHOLE_CHATS_ONLY)
    # The repeated answer's loss stays on the trained (second) turn, however the spans are found.
    chat = [
        msg("user", "hello"),
        msg("assistant", "Paris", weight=0),
        msg("user", "again"),
        msg("assistant", "Paris"),
    ]
    enc = encode(tmp_path, tokenizer, [chat])
    ids, labels = enc.input_ids[0], enc.labels[0]
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE]
    rendered = tokenizer.apply_chat_template(
        [{k: m[k] for k in ("role", "content")} for m in chat], tokenize=False
    )
    assert tokenizer.decode(ids) == rendered
    assert tokenizer.decode(ids[trained[0] :]).startswith("Paris")
    assert tokenizer.decode(ids[: trained[0]]).endswith("<|user|>\nagain</s>\n<|assistant|>\n")


def test_seq2seq_targets_the_last_trained_turn(tmp_path, seq2seq_tokenizer):
    chat = [*CHAT[:4], {**CHAT[4], "weight": 0}]
    enc = encode(tmp_path, seq2seq_tokenizer, [chat], task="seq2seq")
    assert seq2seq_tokenizer.decode(enc.labels[0]) == "good morning</s>"
    assert seq2seq_tokenizer.decode(enc.input_ids[0]).endswith("<|user|>\nhello there\n</s>")


def test_tool_keys_that_say_nothing_are_accepted(tmp_path, plain_tokenizer):
    # Chats copied from API responses carry "tool_calls": null; a line of empty tool lists defines no tool.
    chat = [msg("user", "hello there"), msg("assistant", "good morning", tool_calls=None, function_call=None)]
    rows = [{"messages": chat, "tools": [], "functions": None}]
    assert validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows)).examples == 1


GOOD = json.dumps({"messages": [msg("user", "q"), msg("assistant", "a")]})


def line(*messages: dict, **top) -> str:
    return json.dumps({"messages": list(messages), **top})


Q = msg("user", "q")
A = msg("assistant", "a")
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
FILE = {"type": "file", "file": {"file_id": "file-1"}}
CALL = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
TOOL = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        (
            line(msg("user", [IMAGE]), A),
            "messages[0].content[0].type",
            "images, audio and files are not supported",
        ),
        (line(msg("user", [*parts("see"), AUDIO]), A), "messages[0].content[1].type", "not supported"),
        (line(Q, msg("assistant", [FILE])), "messages[1].content[0].type", "not supported"),
        (
            line(Q, msg("assistant", [{"type": "refusal", "refusal": "no"}])),
            "messages[1].content[0].type",
            "only text",
        ),
        (line(msg("user", [{"text": "q"}]), A), "messages[0].content[0].type", "must be 'text'"),
        (line(msg("user", ["q"]), A), "messages[0].content[0]", "must be an object"),
        (line(msg("user", [{"type": "text", "text": 5}]), A), "messages[0].content[0].text", "string"),
        (line(msg("user", {"type": "text", "text": "q"}), A), "messages[0].content", "list of text parts"),
        (line(msg("user", None), A), "messages[0].content", "string"),
        (line(msg("user", "q", weight=1), A), "messages[0].weight", "only assistant"),
        (line(msg("system", "s", weight=0), Q, A), "messages[0].weight", "only assistant"),
        (line(Q, msg("assistant", "a", weight=2)), "messages[1].weight", "0 or 1"),
        (line(Q, msg("assistant", "a", weight=True)), "messages[1].weight", "0 or 1, not true"),
        (line(Q, msg("assistant", "a", weight=False)), "messages[1].weight", "0 or 1"),
        (line(Q, msg("assistant", "a", weight=1.0)), "messages[1].weight", "0 or 1"),
        (line(Q, msg("assistant", "a", weight=0.5)), "messages[1].weight", "0 or 1"),
        (line(Q, msg("assistant", "a", weight="1")), "messages[1].weight", "0 or 1"),
        (line(Q, msg("assistant", "a", weight=None)), "messages[1].weight", "0 or 1"),
        (line(Q, msg("assistant", "a", weight=0)), "messages", "every assistant message has weight 0"),
        (
            line(Q, msg("assistant", "a", weight=0), Q, msg("assistant", "b", weight=0)),
            "messages",
            "weight 0",
        ),
        (
            line(Q, msg("assistant", "a", weight=0), Q, msg("assistant", " ")),
            "messages",
            "no non-empty assistant",
        ),
        (
            line(Q, msg("assistant", None, tool_calls=CALL)),
            "messages[1].tool_calls",
            "tools are not supported",
        ),
        (
            line(Q, msg("assistant", "a", tool_calls=CALL)),
            "messages[1].tool_calls",
            "tools are not supported",
        ),
        (
            line(Q, msg("assistant", None, function_call=CALL[0]["function"])),
            "messages[1].function_call",
            "tools",
        ),
        (
            line(Q, msg("assistant", None, tool_calls=CALL), msg("tool", "42", tool_call_id="call_1"), A),
            "messages[1].tool_calls",
            "tools",
        ),
        (
            line(Q, A, msg("tool", "42", tool_call_id="call_1"), A),
            "messages[2].role",
            "tools are not supported",
        ),
        (line(Q, A, msg("function", "42", name="f"), A), "messages[2].role", "tools are not supported"),
        (line(Q, A, tools=TOOL), "tools", "tools are not supported"),
        (line(Q, A, functions=[TOOL[0]["function"]]), "functions", "tools are not supported"),
        (line(Q, A, parallel_tool_calls=False), "parallel_tool_calls", "tools are not supported"),
        # Today's refusals stand.
        (line(Q, msg("bot", "a")), "messages[1].role", "one of"),
        (line(Q), "messages", "no non-empty assistant"),
        (json.dumps({"messages": []}), "messages", "non-empty list"),
        (line(Q, "a"), "messages[1]", "must be an object"),
    ],
)
def test_refusals_name_line_and_field(tmp_path, bad, field, words):
    path = tmp_path / "d.jsonl"
    path.write_text(f"{GOOD}\n{bad}\n{GOOD}\n")
    with pytest.raises(DatasetError) as err:
        validate_dataset(path)
    assert (err.value.line, err.value.field) == (2, field)
    assert words in err.value.message
    assert f"line 2, field {field!r}" in str(err.value)
