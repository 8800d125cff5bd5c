"""Render examples through the chat template and build the label mask.

The rule: the whole conversation is rendered once by the tokenizer's chat template and tokenised
once, without adding special tokens on top (the template already has them, so nothing is doubled).
A token is trained when its characters lie inside a trained assistant reply or that reply's
end-of-turn marker; everything else is -100. With `train_on: all` every token is trained except the
content (and end-of-turn marker) of a message marked `"train": false`, such as a leading assistant
turn kept as context. The label mask never depends on the pad id, so the end-of-turn token is
trained even when pad == EOS, and the tuned model learns to stop.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import jinja2

from ..errors import TemplateError
from .records import Example
from .templates import apply_template

IGNORE_INDEX = -100
_PROBE = "\u2063PROBE\u2063"



@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: bool = False
    full_length: int = 0  # tokens before truncation

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class Skipped:
    source: str
    reason: str
    length: int = 0  # tokens of the whole example, before any truncation
    refused: bool = False  # the chat template cannot render this conversation: an invalid row, not a length


def text_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (its BOS), found by asking it.

    Decided by what `tokenizer(text, add_special_tokens=True)` really adds, not by whether a
    `bos_token` is named: SmolLM2 names `<|im_start|>` as BOS but adds nothing, and plain text must
    not be trained as `<|im_start|>` + text.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start:start + len(plain)] == plain:
            return list(special[:start])
    return []


def find_end_of_turn(tokenizer) -> str | None:
    """The special token a template writes right after an assistant reply (<|im_end|>, <|eot_id|>, ...)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PROBE}], tokenize=False
    )
    after = text[text.index(_PROBE) + len(_PROBE):].lstrip(" ")
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    for token in specials:
        if token and after.startswith(token):
            return token
    return None


def refusal_reason(messages: list[dict], error: Exception) -> str:
    """Why the template would not render a conversation, with what to do about it."""
    spoken = [m["role"] for m in messages if m["role"] != "system"]
    if spoken and spoken[0] == "assistant":
        return (f"the chat template cannot render a conversation that starts with an assistant turn ({error}); "
                "drop the leading assistant turn from this row, or pick a template that can (data.template: chatml)")
    return f"the chat template refused this conversation: {error}"


class ChatEncoder:
    """Turns `Example`s into (input_ids, labels) and prompts into inference ids, with one template."""

    def __init__(self, tokenizer, max_length: int = 512, truncation: str = "drop",
                 train_on: str = "assistant", system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the tokenizer has no chat template; pick one with data.template (for example chatml) "
                "or use a model that ships one"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.train_on = train_on
        self.system_prompt = system_prompt
        self.end_of_turn = find_end_of_turn(tokenizer)
        if self.end_of_turn is None:
            raise TemplateError(
                "the chat template writes no special end-of-turn token after an assistant reply, so the "
                "tuned model would never learn to stop; use a template that does (data.template)"
            )
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        self.text_prefix = text_prefix_ids(tokenizer)

    # -- rendering -----------------------------------------------------------------------------

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if messages and messages[0]["role"] == "text":
            return list(messages)
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}] + list(messages)
        return list(messages)

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt_text(self, messages: list[dict]) -> str:
        """The exact text a model sees at inference before it answers."""
        return self._render(self._with_system(messages), generation_prompt=True)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"]

    def generation_eos_ids(self) -> list[int]:
        ids = [self.end_of_turn_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    # -- training encoding ---------------------------------------------------------------------

    def _trained_turns(self, messages: list[dict]) -> list[int]:
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last_assistant":
            assistant = assistant[-1:]
        return [i for i in assistant if messages[i].get("train", True)]

    def char_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans to train: each reply plus its end-of-turn token."""
        full = self._render(messages)
        if self.train_on == "all":
            return full, self._all_but_untrained(messages, full)
        spans = []
        for i in self._trained_turns(messages):
            if i == 0:  # an opening assistant turn the row marks trained: no prompt comes before it
                spans.append(self.content_span(messages, i, full))
                continue
            prefix = self._render(messages[:i], generation_prompt=True)
            upto = self._render(messages[: i + 1])
            if not (full.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix)):
                raise TemplateError(
                    "the chat template does not render conversations incrementally (the prompt for turn "
                    f"{i + 1} is not a prefix of the whole conversation), so replies cannot be masked exactly; "
                    "use data.template to pick a built-in template"
                )
            turn = full[len(prefix):len(upto)]
            end = turn.rfind(self.end_of_turn)
            if end < 0:
                raise TemplateError(f"turn {i + 1} has no {self.end_of_turn} after the reply")
            spans.append((len(prefix), len(prefix) + end + len(self.end_of_turn)))
        return full, spans

    def _all_but_untrained(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """train_on=all: the whole text minus the content and end-of-turn of each `"train": false` message."""
        holes = sorted(self.content_span(messages, i, full) for i, m in enumerate(messages)
                       if m.get("train", True) is False)
        spans, at = [], 0
        for a, b in holes:
            if a > at:
                spans.append((at, a))
            at = max(at, b)
        if at < len(full):
            spans.append((at, len(full)))
        return spans

    def content_span(self, messages: list[dict], i: int, full: str) -> tuple[int, int]:
        """Where message i's content, and the end-of-turn token right after it, lie in `full`.

        The message is rendered once more with a probe in place of its content: the text before the
        probe and the text after it are shared with `full`, so what lies between them in `full` is
        exactly the content as the template wrote it (trimmed or not), for any template.
        """
        probed = [dict(m) for m in messages]
        probed[i]["content"] = _PROBE
        text = self._render(probed)
        start = text.find(_PROBE)
        after = text[start + len(_PROBE):] if start >= 0 else ""
        end = len(full) - len(after)
        if start < 0 or text[:start] != full[:start] or end < start or full[end:] != after:
            raise TemplateError(f"the chat template does not render message {i + 1} where it can be found again, "
                                "so a \"train\": false message cannot be masked exactly; use data.template")
        gap = len(after) - len(after.lstrip(" "))
        if after[gap:].startswith(self.end_of_turn):
            end += gap + len(self.end_of_turn)
        return start, end

    def _text_ids(self, token_ids: list[int]) -> list[int]:
        """Plain text (continued pre-training): the tokenizer's own BOS if it adds one, the text, EOS.

        No chat template: the text is the document itself. EOS marks where one document ends.
        """
        tok = self.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.end_of_turn_id
        return self.text_prefix + list(token_ids) + [eos]

    def encode(self, example: Example) -> Encoded | Skipped:
        return self.encode_many([example])[0]

    def encode_many(self, examples: list[Example]) -> list[Encoded | Skipped]:
        """Encode several examples; the tokenizer runs once on the batch (faster, same result)."""
        out: list[Encoded | Skipped | None] = [None] * len(examples)
        chat, texts = [], []
        for i, example in enumerate(examples):
            if example.format == "text":
                texts.append(i)
                continue
            try:
                chat.append((i, *self.char_spans(self._with_system(example.messages))))
            except jinja2.TemplateError as e:  # the template's own raise_exception(...)
                out[i] = Skipped(example.source, refusal_reason(example.messages, e), refused=True)
        if texts:
            batch = self.tokenizer([examples[i].messages[0]["content"] for i in texts], add_special_tokens=False)
            for i, token_ids in zip(texts, batch["input_ids"]):
                ids = self._text_ids(token_ids)
                out[i] = self._fit(ids, list(ids), examples[i].source)
        if chat:
            batch = self.tokenizer([text for _, text, _ in chat], add_special_tokens=False,
                                   return_offsets_mapping=True)
            for (i, _, spans), ids, offsets in zip(chat, batch["input_ids"], batch["offset_mapping"]):
                out[i] = self._label(list(ids), offsets, spans, examples[i].source)
        return out  # type: ignore[return-value]

    def _label(self, ids: list[int], offsets, spans: list[tuple[int, int]], source: str) -> Encoded | Skipped:
        # Offsets are sorted, so each span's tokens are found by bisection rather than a scan per token.
        labels = [IGNORE_INDEX] * len(ids)
        starts = [o[0] for o in offsets]
        ends = [o[1] for o in offsets]
        for a, b in spans:
            first = bisect.bisect_left(starts, a)  # first token starting at or after the span
            stop = bisect.bisect_right(ends, b, lo=first)  # tokens [first, stop) end inside it
            if (first > 0 and starts[first - 1] < a < ends[first - 1]) or \
                    (stop < len(ids) and starts[stop] < b < ends[stop]):
                raise TemplateError(f"{source}: a token straddles the edge of a reply, so the mask "
                                    "cannot be exact; this template and tokenizer do not fit together")
            for j in range(first, stop):
                if ends[j] > starts[j]:
                    labels[j] = ids[j]
        # Tokens after the last trained one carry no loss and cannot influence earlier tokens: drop them.
        last = max((j for j, x in enumerate(labels) if x != IGNORE_INDEX), default=-1)
        if last < 0:
            return Skipped(source, "no supervised tokens (nothing to train on)", len(ids))
        return self._fit(ids[: last + 1], labels[: last + 1], source)

    def _fit(self, ids: list[int], labels: list[int], source: str) -> Encoded | Skipped:
        """Apply the length policy: keep the end (the answer and its end-of-turn token) or drop."""
        full = len(ids)
        truncated = False
        if len(ids) > self.max_length:
            if self.truncation == "drop":
                return Skipped(source, f"{len(ids)} tokens > data.max_length={self.max_length} "
                                       "(policy: drop)", full)
            ids, labels = ids[-self.max_length:], labels[-self.max_length:]
            truncated = True
            if all(x == IGNORE_INDEX for x in labels):
                return Skipped(source, "no supervised tokens left after truncation", full)
        return Encoded(ids, labels, source, truncated, full)


@dataclass
class EncodeStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: list[Skipped] | None = None
    tokens: int = 0
    trained_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped": len(self.skipped or []),
            "skipped_reasons": [f"{s.source}: {s.reason}" for s in (self.skipped or [])[:20]],
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


def encoder_for(data, tokenizer) -> tuple[list[str], ChatEncoder]:
    """The one place an encoder is built from the `data` config section: data.template installed on
    `tokenizer` (returns the special tokens it had to add), then the encoder with data.max_length,
    truncation, train_on and system_prompt. Training, `eval`, `data check` and `data preview` all use
    it, so they encode alike."""
    added = apply_template(tokenizer, data.template)
    return added, ChatEncoder(tokenizer, data.max_length, data.truncation, data.train_on, data.system_prompt)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: the template's end-of-turn marker(s), else EOS (no usable template)."""
    try:
        return ChatEncoder(tokenizer).generation_eos_ids()
    except ValueError:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
