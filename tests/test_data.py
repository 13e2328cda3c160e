"""Datasets as users bring them: validation names the line and field; encoding puts loss on completions
only."""

from __future__ import annotations

import io
import tracemalloc

import pytest

from greencore.data import (
    IGNORE,
    DatasetError,
    DatasetLimitExceeded,
    DatasetLimits,
    Encoded,
    batch_shape,
    collate,
    encode_dataset,
    epoch_batches,
    epoch_order,
    jsonl_lines,
    task_for,
    validate_dataset,
)
from greencore.demo import build_tokenizer
from tests.model_folders import dataset, write_jsonl


def write_lines(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "text_label"])
def test_validate_reports_format_examples_and_labels(tmp_path, fmt, plain_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", dataset(fmt, 12))
    path.write_text(path.read_text() + "\n   \n")  # blank lines are skipped
    summary = validate_dataset(path, plain_tokenizer)
    assert (summary.format, summary.examples) == (fmt, 12)
    assert summary.tokens > 12
    if fmt == "text_label":
        assert summary.labels == sorted({r["label"] for r in dataset(fmt, 12)})
    else:
        assert summary.labels is None


def test_integer_labels_keep_numeric_order(tmp_path):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, 2, 1])]
    assert validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows)).labels == ["1", "2", "10"]


GOOD = '{"prompt": "a", "completion": "b"}'


@pytest.mark.parametrize(
    ("lines", "line", "field", "words"),
    [
        ([GOOD, "{not json"], 2, None, "not valid JSON"),
        ([GOOD, "[1, 2]"], 2, None, "JSON object"),
        ([GOOD, '{"prompt": "a"}'], 2, "completion", "missing"),
        ([GOOD, '{"prompt": "a", "completion": 3}'], 2, "completion", "string"),
        ([GOOD, '{"prompt": "a", "completion": "  "}'], 2, "completion", "empty"),
        ([GOOD, '{"text": "x", "label": "y"}'], 2, None, "one format per file"),
        (['{"foo": 1}'], 1, None, "expected"),
        (['{"prompt": "a", "completion": "b", "messages": []}'], 1, None, "mixes"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "messages", "no non-empty assistant"),
        (['{"messages": [{"role": "bot", "content": "hi"}]}'], 1, "messages[0].role", "one of"),
        (['{"messages": [{"role": "user", "content": 1}]}'], 1, "messages[0].content", "string"),
        (['{"messages": "hi"}'], 1, "messages", "non-empty list"),
        (['{"text": "x", "label": true}', '{"text": "y", "label": 1}'], 1, "label", "integer"),
        (['{"text": "x", "label": "a"}', '{"text": "y", "label": "a"}'], None, "label", "at least 2"),
        ([""], None, None, "empty"),
    ],
)
def test_bad_lines_name_line_and_field(tmp_path, lines, line, field, words):
    with pytest.raises(DatasetError) as err:
        validate_dataset(write_lines(tmp_path, lines))
    assert (err.value.line, err.value.field) == (line, field)
    assert words in err.value.message
    assert (f"line {line}" if line else "file") in str(err.value)


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DatasetError, match="UTF-8") as err:
        validate_dataset(path)
    assert err.value.line == 2
    with pytest.raises(DatasetError, match="cannot open"):
        validate_dataset(tmp_path / "absent.jsonl")


def loss_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def encode_rows(tmp_path, tokenizer, rows, task="causal_lm", max_seq_len=512, label2id=None):
    summary = validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    return encode_dataset(summary, tokenizer, task, max_seq_len, label2id)


def test_prompt_completion_loss_on_completion_only(tmp_path, plain_tokenizer):
    enc = encode_rows(tmp_path, plain_tokenizer, [{"prompt": "What is the capital?", "completion": " Paris"}])
    ids, labels = enc.input_ids[0], enc.labels[0]
    assert plain_tokenizer.decode(ids) == "What is the capital? Paris</s>"
    assert loss_text(plain_tokenizer, ids, labels) == " Paris</s>"
    n_prompt = len(plain_tokenizer("What is the capital?")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "good morning"},
    {"role": "user", "content": "thank you"},
    {"role": "assistant", "content": "the cat sleeps"},
]


def test_chat_template_loss_on_assistant_messages_only(tmp_path, chat_tokenizer):
    enc = encode_rows(tmp_path, chat_tokenizer, [{"messages": CHAT}])
    ids, labels = enc.input_ids[0], enc.labels[0]
    assert chat_tokenizer.decode(ids) == chat_tokenizer.apply_chat_template(CHAT, tokenize=False)
    # Each assistant turn's content and its end token (as the template writes it) carry loss; nothing else.
    assert loss_text(chat_tokenizer, ids, labels) == "good morning</s>\nthe cat sleeps</s>\n"


def test_plain_chat_template_without_tokenizer_template(tmp_path, plain_tokenizer):
    enc = encode_rows(tmp_path, plain_tokenizer, [{"messages": CHAT}])
    ids, labels = enc.input_ids[0], enc.labels[0]
    assert plain_tokenizer.decode(ids) == (
        "<|system|>\nbe brief\n<|user|>\nhello there\n<|assistant|>\ngood morning</s>\n"
        "<|user|>\nthank you\n<|assistant|>\nthe cat sleeps</s>\n"
    )
    assert loss_text(plain_tokenizer, ids, labels) == "good morning</s>the cat sleeps</s>"


def test_truncation_counted_and_lossless_examples_dropped(tmp_path, plain_tokenizer):
    rows = [
        {"prompt": "the quick brown fox", "completion": " jumps"},
        {
            "prompt": "the quick brown fox jumps over the lazy dog " * 4,
            "completion": " sleeps",
        },  # prompt fills all
        {"prompt": "a", "completion": " the quick brown fox jumps over the lazy dog " * 4},  # completion cut
    ]
    enc = encode_rows(tmp_path, plain_tokenizer, rows, max_seq_len=24)
    assert (enc.truncated, enc.dropped, len(enc)) == (2, 1, 2)
    assert enc.dropped_lines == [2]  # the line the service names when it refuses the job
    assert max(len(ids) for ids in enc.input_ids) == 24


def test_seq2seq_encodes_source_and_target(tmp_path):
    tokenizer = build_tokenizer(add_eos=True, chat_template=None)
    enc = encode_rows(tmp_path, tokenizer, [{"messages": CHAT}], task="seq2seq")
    assert tokenizer.decode(enc.input_ids[0]).startswith("<|system|>\nbe brief\n<|user|>")
    assert tokenizer.decode(enc.input_ids[0]).endswith("<|user|>\nthank you\n</s>")
    assert tokenizer.decode(enc.labels[0]) == "the cat sleeps</s>"


def test_classification_maps_labels_and_refuses_unknown(tmp_path, plain_tokenizer):
    rows = [{"text": "good morning", "label": "b"}, {"text": "thank you", "label": "a"}]
    enc = encode_rows(tmp_path, plain_tokenizer, rows, task="classification", label2id={"a": 0, "b": 1})
    assert enc.labels == [1, 0]
    with pytest.raises(DatasetError, match="does not occur") as err:
        encode_rows(tmp_path, plain_tokenizer, rows, task="classification", label2id={"a": 0})
    assert (err.value.line, err.value.field) == (1, "label")


def test_text_label_data_cannot_train_a_generator(tmp_path, plain_tokenizer):
    with pytest.raises(DatasetError, match="classifier"):
        encode_rows(tmp_path, plain_tokenizer, [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])


def test_collate_pads_to_multiple_of_8_and_masks(tmp_path, plain_tokenizer):
    enc = encode_rows(tmp_path, plain_tokenizer, dataset("prompt_completion", 6, long_every=3))
    lengths = [len(ids) for ids in enc.input_ids]
    batch = collate(enc, [0, 1, 2], pad_id=0, max_seq_len=512)
    longest = max(lengths[:3])
    assert batch["input_ids"].shape == (3, -(-longest // 8) * 8) == batch_shape(enc, [0, 1, 2], 512)
    assert batch["attention_mask"].sum(1).tolist() == lengths[:3]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    # Padding never exceeds max_seq_len even when it is not a multiple of 8.
    long_rows = [{"prompt": "a", "completion": " the quick brown fox jumps over the lazy dog"}] * 2
    short = encode_rows(tmp_path, plain_tokenizer, long_rows, max_seq_len=21)
    assert collate(short, [0, 1], 0, 21)["input_ids"].shape[1] == 21


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(10, 3, seed=1, epoch=2)
    assert [len(b) for b in order] == [3, 3, 3, 1]
    assert sorted(i for b in order for i in b) == list(range(10))
    assert order == epoch_order(10, 3, seed=1, epoch=2)
    assert order != epoch_order(10, 3, seed=1, epoch=3)


def test_epoch_batches_put_the_median_sized_batches_first():
    # Example i has i + 1 tokens (seq2seq: targets of other lengths), so batches differ in padded size.
    lengths = list(range(1, 41))
    causal = Encoded("causal_lm", [[5] * n for n in lengths], [[5] * n for n in lengths], 0, 0)
    seq2seq = Encoded("seq2seq", [[5] * n for n in lengths], [[5] * (7 * n % 40 + 1) for n in lengths], 0, 0)
    for data in (causal, seq2seq):
        shuffled = epoch_order(40, 4, seed=3, epoch=1)
        size = {tuple(b): len(b) * sum(batch_shape(data, b, 64)[1:]) for b in shuffled}  # padded tokens
        for measured in (1, 3):
            batches = epoch_batches(data, 4, seed=3, epoch=1, max_seq_len=64, measured=measured)
            assert sorted(map(tuple, batches)) == sorted(map(tuple, shuffled))  # the same batches, reordered
            front, rest = batches[:measured], batches[measured:]
            assert rest == [b for b in shuffled if b not in front]  # the others keep the shuffled order
            assert front == [b for b in shuffled if b in front]
            ranked = sorted(size[tuple(b)] for b in shuffled)
            lo = (len(ranked) - measured) // 2
            assert sorted(size[tuple(b)] for b in front) == ranked[lo : lo + measured]  # the median sizes
            assert batches == epoch_batches(data, 4, seed=3, epoch=1, max_seq_len=64, measured=measured)
        assert epoch_batches(data, 4, seed=3, epoch=1, max_seq_len=64, measured=0) == shuffled
        assert len(epoch_batches(data, 4, seed=3, epoch=1, max_seq_len=64, measured=99)) == 10


def test_task_follows_format_and_model():
    class Config:
        is_encoder_decoder = True

    assert task_for("text_label", Config()) == "classification"
    assert task_for("messages", Config()) == "seq2seq"
    assert task_for("prompt_completion", object()) == "causal_lm"


def test_validate_reads_a_byte_order_mark_and_refuses_unreadable_json(tmp_path):
    good = '{"prompt": "a", "completion": "b"}\n'
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() * 2)  # as some editors save UTF-8
    assert validate_dataset(path).examples == 2
    for body, words in [
        ("[" * 100_000, "nested too deeply"),
        ('{"text": "a", "label": ' + "9" * 5000 + "}", "digits"),
    ]:
        path.write_text(good + body + "\n")
        with pytest.raises(DatasetError, match=words) as caught:
            validate_dataset(path)
        assert (caught.value.line, caught.value.field) == (2, None)


class CountingReader(io.RawIOBase):
    """A file of ``head``, then ``size`` bytes of ``fill`` never held at once; counts the bytes read."""

    def __init__(self, head: bytes, size: int, fill: bytes = b"x") -> None:
        self.head, self.left, self.fill, self.read_bytes = head, size, fill, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
        else:
            n = min(len(buffer), self.left)
            buffer[:n] = self.fill * n
            self.left -= n
        self.read_bytes += n
        return n


def test_a_line_over_the_byte_limit_is_refused_having_read_only_the_limit():
    good = GOOD.encode() + b"\n"
    source = CountingReader(good * 2, 1 << 30)  # a third line of 1 GiB, no newline
    with pytest.raises(DatasetLimitExceeded) as err:
        for _ in jsonl_lines(io.BufferedReader(source), max_line_bytes=1024):
            pass
    assert (err.value.line, err.value.limit, err.value.value) == (3, "max_line_bytes", 1024)
    assert "1024 bytes" in str(err.value) and str(err.value).startswith("line 3")
    assert source.read_bytes < 2 * len(good) + 1024 + io.DEFAULT_BUFFER_SIZE + 1  # not the 1 GiB


def test_lines_at_the_byte_limit_pass(tmp_path):
    line = GOOD.encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(line + b"\n" + line + b"\r\n" + line)  # the last line has no newline
    limits = DatasetLimits(max_line_bytes=len(line) + 1)  # the \r counts, the \n does not
    assert validate_dataset(path, limits=limits).examples == 3
    with pytest.raises(DatasetLimitExceeded) as err:
        validate_dataset(path, limits=DatasetLimits(max_line_bytes=len(line)))
    assert err.value.line == 2


def test_a_huge_line_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as out:
        out.write(GOOD.encode() + b"\n" + b'{"prompt": "' + b"a" * (64 << 20))  # a 64 MiB second line
    tracemalloc.start()
    try:
        with pytest.raises(DatasetLimitExceeded) as err:
            validate_dataset(path, limits=DatasetLimits(max_line_bytes=1 << 16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.line == 2 and peak < 4 << 20  # a few times the 64 KiB limit, not the 64 MiB line


def test_too_many_examples_stop_at_the_first_line_past_the_limit(tmp_path):
    path = write_lines(tmp_path, [GOOD, "", GOOD, GOOD, "not JSON"])  # the bad line 5 is never reached
    with pytest.raises(DatasetLimitExceeded) as err:
        validate_dataset(path, limits=DatasetLimits(max_examples=2))
    assert (err.value.line, err.value.limit, err.value.value) == (4, "max_examples", 2)
    assert "more than 2 examples" in err.value.message


def test_too_many_tokens_stop_at_the_line_that_crosses_the_limit(tmp_path, plain_tokenizer):
    per_line = validate_dataset(write_lines(tmp_path, [GOOD]), plain_tokenizer).tokens
    path = write_lines(tmp_path, [GOOD] * 10)
    total = validate_dataset(path, plain_tokenizer).tokens
    assert total == 10 * per_line
    assert validate_dataset(path, plain_tokenizer, DatasetLimits(max_tokens=total)).tokens == total
    with pytest.raises(DatasetLimitExceeded) as err:
        validate_dataset(path, plain_tokenizer, DatasetLimits(max_tokens=3 * per_line))
    assert (err.value.line, err.value.limit) == (4, "max_tokens")
    assert f"{4 * per_line} tokens" in err.value.message
    # Without a tokenizer nothing counts tokens: the limit cannot apply.
    assert validate_dataset(path, limits=DatasetLimits(max_tokens=1)).tokens is None
