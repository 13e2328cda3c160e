"""Training data as users bring it: JSONL files of chats, prompt/completion pairs or labelled texts.

Three formats, one per file (every line the same):

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str | [text parts]}, ...]}``: a chat in
  OpenAI's fine-tuning format; the loss is on the assistant messages only, and only on those without
  ``"weight": 0`` (a weight of 0 makes a turn context only). Text parts ``{"type": "text", "text": str}`` are
  joined into one string; images, audio, files and tools are refused.
- ``{"prompt": str, "completion": str}``: the loss is on the completion only.
- ``{"text": str, "label": str | int}``: sequence classification; the head is sized by the labels found.

:func:`validate_dataset` checks a file line by line and raises :class:`DatasetError` naming the line and the
field; the service answers 4xx with it. It reads one line at a time and never more than
``DatasetLimits.max_line_bytes`` of one line, and it stops at the line where a :class:`DatasetLimits` bound
(bytes of a line, examples, tokens) is crossed: :class:`DatasetLimitExceeded`. Unbounded by default; the
service passes its ``GT_MAX_DATASET_*`` settings. :func:`encode_dataset` turns the records into token ids
with loss labels, and :func:`collate` pads a batch to a multiple of 8 tokens.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

MESSAGES, PROMPT_COMPLETION, TEXT_LABEL = "messages", "prompt_completion", "text_label"
FORMATS = (MESSAGES, PROMPT_COMPLETION, TEXT_LABEL)
ROLES = ("system", "user", "assistant")
# OpenAI's tool use (tool and function roles, calls in assistant messages, tool definitions on the line) is
# refused by name, so that a user learns why rather than reading that the role is unknown.
TOOL_ROLES = ("tool", "function")
TOOL_MESSAGE_KEYS = ("tool_calls", "function_call")
TOOL_LINE_KEYS = ("tools", "functions", "parallel_tool_calls")
IGNORE = -100  # label of a position that carries no loss (PyTorch's cross-entropy ignore_index)
PAD_MULTIPLE = 8  # batches are padded to a multiple of this many tokens, so few distinct shapes are profiled

# Without a chat template, a chat is rendered as "<|role|>\n{content}\n" per message, the assistant's content
# followed by the end-of-sequence token.
PLAIN_HEADER = "<|{role}|>\n"


class DatasetError(ValueError):
    """A dataset line that cannot be used: ``line`` is 1-based (None for the file as a whole), ``field`` the
    key."""

    def __init__(self, line: int | None, field: str | None, message: str) -> None:
        self.line = line
        self.field = field
        self.message = message
        where = f"line {line}" if line is not None else "file"
        super().__init__(f"{where}{f', field {field!r}' if field else ''}: {message}")


@dataclass(frozen=True)
class DatasetLimits:
    """Bounds a dataset must keep, each None for no bound (the default: a file greencore is handed is
    trusted; the service passes its ``GT_MAX_DATASET_*`` settings)."""

    max_line_bytes: int | None = None  # bytes of one line, its newline not counted
    max_examples: int | None = None  # non-blank lines
    max_tokens: int | None = None  # tokens of the examples' text as DatasetSummary counts them (a tokenizer)


NO_LIMITS = DatasetLimits()


class DatasetLimitExceeded(DatasetError):
    """A dataset crossing one of its :class:`DatasetLimits` at ``line``: ``limit`` is the field's name
    (``max_line_bytes``, ``max_examples``, ``max_tokens``), ``value`` its bound."""

    def __init__(self, line: int, limit: str, value: int, message: str) -> None:
        super().__init__(line, None, message)
        self.limit = limit
        self.value = value


@dataclass
class DatasetSummary:
    """What a valid dataset holds."""

    examples: int
    format: str  # one of FORMATS
    labels: list[str] | None = None  # text_label: the label names found, in id order
    tokens: int | None = None  # tokens of all examples, when a tokenizer was given
    # The parsed lines, for encode_dataset; a chat's content is its text (text parts joined).
    records: list[dict] = field(default_factory=list, repr=False)


def _format_of(record: dict, line: int) -> str:
    found = [
        f
        for f, keys in (
            (MESSAGES, ("messages",)),
            (PROMPT_COMPLETION, ("prompt", "completion")),
            (TEXT_LABEL, ("text", "label")),
        )
        if any(k in record for k in keys)
    ]
    if not found:
        raise DatasetError(line, None, 'expected "messages", "prompt"/"completion" or "text"/"label" keys')
    if len(found) > 1:
        raise DatasetError(line, None, f"mixes the keys of several formats: {', '.join(found)}")
    return found[0]


def _string(record: dict, key: str, line: int, allow_empty: bool = False) -> str:
    if key not in record:
        raise DatasetError(line, key, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(line, key, f"must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DatasetError(line, key, "is empty")
    return value


def _check_record(record: dict, fmt: str, line: int) -> None:
    if fmt == PROMPT_COMPLETION:
        _string(record, "prompt", line, allow_empty=True)
        _string(record, "completion", line)
    elif fmt == TEXT_LABEL:
        _string(record, "text", line)
        if "label" not in record:
            raise DatasetError(line, "label", "missing")
        label = record["label"]
        if (
            isinstance(label, bool)
            or not isinstance(label, str | int)
            or (isinstance(label, str) and not label)
        ):
            raise DatasetError(line, "label", "must be a non-empty string or an integer")
    else:
        record["messages"] = _check_messages(record, line)


def _absent(value: Any) -> bool:
    """Whether a tool key's value says nothing (as exported chats write ``"tool_calls": null``)."""
    return value is None or value == []


def _content_text(content: Any, line: int, where: str) -> str:
    """A message's text: the string, or its text parts joined in order with no separator."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DatasetError(line, where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise DatasetError(line, at, 'must be an object {"type": "text", "text": ...}')
        kind = part.get("type")
        if kind != "text":
            if not isinstance(kind, str):
                raise DatasetError(line, f"{at}.type", f"must be 'text', not {kind!r}")
            raise DatasetError(
                line,
                f"{at}.type",
                f"a {kind!r} part: images, audio and files are not supported, only text parts",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise DatasetError(line, f"{at}.text", f"must be a string, not {type(text).__name__}")
        texts.append(text)
    return "".join(texts)


def _check_messages(record: dict, line: int) -> list[dict]:
    """The line's messages, each with its content as one string; raises DatasetError for what is not a chat
    this service trains on."""
    for key in TOOL_LINE_KEYS:
        if not _absent(record.get(key)):
            raise DatasetError(line, key, "tools are not supported: only chats of text messages")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(line, "messages", "must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(line, where, "must be an object with role and content")
        role = message.get("role")
        if role in TOOL_ROLES:
            raise DatasetError(line, f"{where}.role", f"tools are not supported: role {role!r}")
        if role not in ROLES:
            raise DatasetError(line, f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        for key in TOOL_MESSAGE_KEYS:  # before the content: a tool call's content is often null
            if not _absent(message.get(key)):
                raise DatasetError(line, f"{where}.{key}", "tools are not supported: only text messages")
        text = _content_text(message.get("content"), line, f"{where}.content")
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                raise DatasetError(
                    line, f"{where}.weight", f"only assistant messages have a weight, not {role}"
                )
            if type(weight) is not int or weight not in (0, 1):  # not True/False, not 1.0: OpenAI's 0 or 1
                raise DatasetError(line, f"{where}.weight", f"must be 0 or 1, not {json.dumps(weight)[:40]}")
        checked.append({**message, "content": text})
    trained = [m for m in checked if _trained(m)]
    if not any(m["content"].strip() for m in trained):
        if not trained and any(m["role"] == "assistant" for m in checked):
            raise DatasetError(
                line, "messages", "every assistant message has weight 0: nothing to learn from"
            )
        raise DatasetError(line, "messages", "has no non-empty assistant message to learn from")
    return checked


def _trained(message: dict) -> bool:
    """Whether a message carries loss: an assistant message without ``"weight": 0``."""
    return message["role"] == "assistant" and message.get("weight", 1) == 1


def _json_line(text: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(line, None, f"not valid JSON: {exc.msg} at column {exc.colno}") from exc
    except RecursionError as exc:
        raise DatasetError(line, None, "not usable JSON: nested too deeply") from exc
    except ValueError as exc:  # an integer of more digits than Python converts
        limit = sys.get_int_max_str_digits()
        raise DatasetError(line, None, f"not usable JSON: a number of more than {limit} digits") from exc


def label_names(labels: Sequence[str | int]) -> list[str]:
    """Label names in id order: integers in numeric order when every label is an integer, else sorted
    names."""
    unique = set(labels)
    if all(isinstance(x, int) for x in unique):
        return [str(x) for x in sorted(unique)]
    return sorted(str(x) for x in unique)


def jsonl_lines(handle: BinaryIO, max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """The lines of ``handle``, one at a time: (1-based number, bytes with their newline).

    A line longer than ``max_line_bytes`` (its newline not counted) raises :class:`DatasetLimitExceeded`
    once ``max_line_bytes + 1`` of its bytes are read: the rest of it is never read.
    """
    number = 0
    while raw := handle.readline(-1 if max_line_bytes is None else max_line_bytes + 1):
        number += 1
        if max_line_bytes is not None and len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise DatasetLimitExceeded(
                number,
                "max_line_bytes",
                max_line_bytes,
                f"longer than {max_line_bytes} bytes, the longest line a dataset may hold",
            )
        yield number, raw


def validate_dataset(
    path: str | Path, tokenizer: Any = None, limits: DatasetLimits = NO_LIMITS
) -> DatasetSummary:
    """Check a JSONL dataset line by line; blank lines are skipped.

    Returns a :class:`DatasetSummary` (examples, format, label names, and tokens when ``tokenizer`` is given).
    Raises :class:`DatasetError` at the first bad line, naming the line (1-based) and the field, and
    :class:`DatasetLimitExceeded` at the line where ``limits`` are crossed (``max_tokens`` counts only with a
    tokenizer), having read no further.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DatasetError(None, None, f"cannot open {path.name}: {exc.strerror}") from exc
    records: list[dict] = []
    fmt: str | None = None
    first_line = 0
    tokens = 0
    with handle:
        for number, raw in jsonl_lines(handle, limits.max_line_bytes):
            try:
                text = raw.decode(
                    "utf-8-sig" if number == 1 else "utf-8"
                )  # a byte-order mark some editors write
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    number, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from exc
            if not text.strip():
                continue
            if limits.max_examples is not None and len(records) >= limits.max_examples:
                raise DatasetLimitExceeded(
                    number, "max_examples", limits.max_examples, f"more than {limits.max_examples} examples"
                )
            record = _json_line(text, number)
            if not isinstance(record, dict):
                raise DatasetError(number, None, f"must be a JSON object, not {type(record).__name__}")
            line_fmt = _format_of(record, number)
            if fmt is None:
                fmt, first_line = line_fmt, number
            elif line_fmt != fmt:
                raise DatasetError(
                    number, None, f"is {line_fmt} but line {first_line} is {fmt}: one format per file"
                )
            _check_record(record, fmt, number)
            if tokenizer is not None:
                tokens += sum(_count(tokenizer, text) for text in _texts(record, fmt))
                if limits.max_tokens is not None and tokens > limits.max_tokens:
                    raise DatasetLimitExceeded(
                        number,
                        "max_tokens",
                        limits.max_tokens,
                        f"the examples up to this line hold {tokens} tokens, more than {limits.max_tokens}",
                    )
            record["_line"] = number
            records.append(record)
    if fmt is None:
        raise DatasetError(None, None, "no examples: the file is empty")
    labels = label_names([r["label"] for r in records]) if fmt == TEXT_LABEL else None
    if labels is not None and len(labels) < 2:
        raise DatasetError(None, "label", f"classification needs at least 2 distinct labels, found {labels}")
    return DatasetSummary(len(records), fmt, labels, tokens if tokenizer is not None else None, records)


def _texts(record: dict, fmt: str) -> list[str]:
    """The texts of one checked record whose tokens DatasetSummary.tokens counts."""
    if fmt == MESSAGES:
        return [m["content"] for m in record["messages"]]
    if fmt == PROMPT_COMPLETION:
        return [record["prompt"] + record["completion"]]
    return [record["text"]]


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Encoded:
    """A dataset as token ids, ready to batch."""

    task: str  # "causal_lm", "seq2seq" or "classification"
    input_ids: list[list[int]]
    labels: (
        list[list[int]] | list[int]
    )  # per-token labels (IGNORE where no loss), or one class id per example
    truncated: int  # examples cut at max_seq_len
    dropped: int  # examples left with no loss token after truncation (not trained on)
    dropped_lines: list[int] = field(default_factory=list)  # their lines in the file (1-based)

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and _ids(tokenizer, "a", special=True)[:1] == [bos]


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids


def _chat_with_template(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat rendered by the tokenizer's chat template, and which of them carry loss.

    An assistant message's span is the text between the chat rendered up to it (with the generation prompt)
    and the chat rendered through it; tokens starting inside the span of a trained message (see
    :func:`_trained`) carry loss. The text does not depend on the weights.
    """
    trained = [_trained(m) for m in messages]
    messages = _rendered(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    search_from = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        except Exception:  # a template that refuses a partial chat: fall back to a text search
            before = through = None
        if before is not None and text.startswith(through) and through.startswith(before):
            span = (len(before), len(through))
        else:
            start = text.find(message["content"], search_from)
            if start < 0:
                continue
            span = (start, start + len(message["content"]))
        search_from = span[1]  # past weight-0 turns too, so that a later turn's search does not find them
        if trained[i]:
            spans.append(span)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]


def _chat_plain(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat in the plain template (see PLAIN_HEADER), and their loss labels."""
    ids = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    labels = [IGNORE] * len(ids)
    newline = _ids(tokenizer, "\n")
    for message in messages:
        header = _ids(tokenizer, PLAIN_HEADER.format(role=message["role"]))
        content = _ids(tokenizer, message["content"])
        if message["role"] == "assistant":
            content = _with_eos(tokenizer, content)
            ids += header + content + newline
            loss = content if _trained(message) else [IGNORE] * len(content)
            labels += [IGNORE] * len(header) + loss + [IGNORE] * len(newline)
        else:
            ids += header + content + newline
            labels += [IGNORE] * (len(header) + len(content) + len(newline))
    return ids, labels


def _rendered(messages: list[dict]) -> list[dict]:
    """The messages as a chat template sees them: ``weight`` says what to train, not what was said."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def _plain_text(messages: list[dict]) -> str:
    return "".join(PLAIN_HEADER.format(role=m["role"]) + m["content"] + "\n" for m in messages)


def encode_dataset(
    summary: DatasetSummary,
    tokenizer: Any,
    task: str,
    max_seq_len: int,
    label2id: dict[str, int] | None = None,
) -> Encoded:
    """Token ids and loss labels of every example of a validated dataset, cut at ``max_seq_len`` tokens.

    ``task`` follows from the data and the model (see :func:`task_for`). Causal LM: one sequence, loss on the
    completion / trained assistant tokens. Seq2seq: the prompt (or the chat before its last trained assistant
    message, in the plain template) as input, the completion (or that message) as target, each cut at
    ``max_seq_len``.
    Classification: the text, and the label's id in ``label2id``.
    """
    inputs: list[list[int]] = []
    labels: list = []
    truncated = 0
    dropped_lines: list[int] = []
    for record in summary.records:
        line = record["_line"]
        if task == "classification":
            name = str(record["label"])
            if label2id is None or name not in label2id:
                raise DatasetError(line, "label", f"label {name!r} does not occur in the training file")
            ids = _ids(tokenizer, record["text"], special=True)
            if len(ids) > max_seq_len:
                truncated += 1
                ids = ids[:max_seq_len]
            inputs.append(ids)
            labels.append(label2id[name])
            continue
        if summary.format == TEXT_LABEL:
            raise DatasetError(line, "text", "text/label data trains a classifier, not a generative model")
        if task == "seq2seq":
            if summary.format == PROMPT_COMPLETION:
                source, target = record["prompt"], record["completion"]
            else:
                messages = record["messages"]
                last = max(i for i, m in enumerate(messages) if _trained(m))
                source, target = _plain_text(messages[:last]), messages[last]["content"]
            src = _ids(tokenizer, source, special=True)
            tgt = _with_eos(tokenizer, _ids(tokenizer, target, special=True))
            if len(src) > max_seq_len or len(tgt) > max_seq_len:
                truncated += 1
                src, tgt = src[:max_seq_len], tgt[:max_seq_len]
            inputs.append(src)
            labels.append(tgt)
            continue
        if summary.format == PROMPT_COMPLETION:
            prompt = ([tokenizer.bos_token_id] if _adds_bos(tokenizer) else []) + _ids(
                tokenizer, record["prompt"]
            )
            completion = _with_eos(tokenizer, _ids(tokenizer, record["completion"]))
            ids, lab = prompt + completion, [IGNORE] * len(prompt) + completion
        elif getattr(tokenizer, "chat_template", None):
            ids, lab = _chat_with_template(tokenizer, record["messages"])
        else:
            ids, lab = _chat_plain(tokenizer, record["messages"])
        if len(ids) > max_seq_len:
            truncated += 1
            ids, lab = ids[:max_seq_len], lab[:max_seq_len]
        # A causal LM predicts token t from the tokens before it: the first token never carries loss.
        if not any(x != IGNORE for x in lab[1:]):
            dropped_lines.append(line)
            continue
        inputs.append(ids)
        labels.append(lab)
    return Encoded(task, inputs, labels, truncated, len(dropped_lines), dropped_lines)


def padded_len(n: int, max_seq_len: int) -> int:
    """Length a batch whose longest example has ``n <= max_seq_len`` tokens is padded to: the next multiple of
    8, at most ``max_seq_len``."""
    return min(-(-n // PAD_MULTIPLE) * PAD_MULTIPLE, max_seq_len)


def batch_shape(data: Encoded, indices: Sequence[int], max_seq_len: int) -> tuple[int, ...]:
    """Shape of the padded batch of these examples: (batch, seq) or, for seq2seq, (batch, seq, target)."""
    seq = padded_len(max(len(data.input_ids[i]) for i in indices), max_seq_len)
    if data.task == "seq2seq":
        tgt = padded_len(max(len(data.labels[i]) for i in indices), max_seq_len)
        return (len(indices), seq, tgt)
    return (len(indices), seq)


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate(data: Encoded, indices: Sequence[int], pad_id: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    """The batch of these examples: right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    shape = batch_shape(data, indices, max_seq_len)
    rows = [data.input_ids[i] for i in indices]
    batch = {
        "input_ids": _pad(rows, shape[1], pad_id),
        "attention_mask": _pad([[1] * len(r) for r in rows], shape[1], 0),
    }
    if data.task == "classification":
        batch["labels"] = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    else:
        batch["labels"] = _pad([data.labels[i] for i in indices], shape[-1], IGNORE)
    return batch


def epoch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: example indices shuffled by (seed, epoch), in batches of ``batch_size``.

    A pure function of its arguments, so a resumed run replays the same order. The last batch may be smaller.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def epoch_batches(
    data: Encoded, batch_size: int, seed: int, epoch: int, max_seq_len: int, measured: int = 1
) -> list[list[int]]:
    """The batches of one epoch as a run trains them: :func:`epoch_order`'s, with the ``measured`` batches of
    median padded size moved to the front (in their shuffled order).

    GreenTrainer measures importance on an epoch's first batches, and that measurement is paid out of the
    budget: were it the first batch of the shuffle, its cost would follow the luck of the draw (a batch padded
    to the epoch's longest example can cost several typical steps). A batch of median size costs what a
    typical step does and is as representative as any. Sizes are padded tokens (``batch x seq``, plus the
    target for seq2seq); ties go to the earlier batch. Pure, like :func:`epoch_order`.
    """
    batches = epoch_order(len(data.input_ids), batch_size, seed, epoch)
    n = min(max(measured, 0), len(batches))
    if n == 0:
        return batches
    shapes = [batch_shape(data, idx, max_seq_len) for idx in batches]
    sizes = [shape[0] * sum(shape[1:]) for shape in shapes]
    by_size = sorted(range(len(batches)), key=lambda i: (sizes[i], i))
    start = (len(batches) - n) // 2
    middle = sorted(by_size[start : start + n])
    rest = set(middle)
    return [batches[i] for i in middle] + [b for i, b in enumerate(batches) if i not in rest]


def task_for(fmt: str, config: Any) -> str:
    """The task that data of format ``fmt`` trains on a model with this config."""
    if fmt == TEXT_LABEL:
        return "classification"
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal_lm"
