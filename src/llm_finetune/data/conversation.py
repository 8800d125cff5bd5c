"""Chat rows as people really export them, turned into one clean conversation or a clear reason why not.

Real ShareGPT and chat exports are rarely textbook: role names are spelled many ways, a chat cut from
a longer one starts with the assistant, a user sends two messages in a row, a turn is empty, the last
user message was never answered. Each rule below is the fix a person would make by hand, and each use
of one is counted (`notes`) so `data check` can say what it did:

- role names match ignoring case and surrounding spaces; `data.roles` maps further names (e.g. `bing`);
- an empty turn (only spaces) is dropped: there is nothing in it to read or to learn;
- consecutive turns of one role are merged into one, joined by a blank line (trained only if every
  part was);
- leading assistant turns (a greeting, or a conversation cut from a longer one) are kept as context:
  rendered, never trained (unless the row marks them `"train": true` itself);
- user turns after the last assistant reply are dropped: there is no answer to learn from them.

Still rejected, with the reason: tool turns, unknown role names, a system message after the
conversation started, and a conversation with no assistant reply to a user turn.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
# The stated rule for tool turns, in every chat format: rejected with the row named, because a
# template that has no tool role would otherwise render them as something they are not.
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")
# ShareGPT's role spellings (matched lower-cased); anything else is reported as unknown, never guessed.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant",
}
# The messages format's names; `developer` is OpenAI's newer name for the system message.
MESSAGES_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

NOTE_EMPTY = "dropped empty turns"
NOTE_MERGED = "merged consecutive turns of one role"
NOTE_CONTEXT = "leading assistant turn kept as untrained context"
NOTE_TRAILING = "dropped unanswered user turn at the end"


def role_table(builtin: dict[str, str], extra: dict[str, str] | None) -> dict[str, str]:
    """The built-in names plus `data.roles`, keyed lower-case (the config has checked the values)."""
    table = dict(builtin)
    for name, role in (extra or {}).items():
        table[name.strip().lower()] = role
    return table


def resolve_role(name: Any, table: dict[str, str], where: str, key: str) -> str:
    """One of system/user/assistant for a spoken role name, or a ValueError that says how to fix it."""
    if not isinstance(name, str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(name).__name__}")
    role = table.get(name.strip().lower())
    if role is not None:
        return role
    if name.strip().lower() in TOOL_ROLES:
        raise ValueError(f"{where}: role '{name}' (tool calls) is not supported for training; "
                         "remove tool turns or fold their result into the user turn")
    raise ValueError(f"{where}: unknown role {name!r}; expected one of {', '.join(table)}, or map it in the "
                     f"config, e.g. data.roles: {{\"{name}\": \"assistant\"}}")


def content_text(value: Any, where: str, key: str) -> str:
    """A turn's text: a string, null (an empty turn), or a list of text parts (OpenAI's content parts)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for j, part in enumerate(value):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: {key}[{j}] is a {part.get('type')!r} part; only text parts "
                                 "({\"type\": \"text\", \"text\": ...}) can be trained")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__}")


def train_flag(turn: dict, where: str) -> dict[str, bool]:
    if "train" not in turn:
        return {}
    if not isinstance(turn["train"], bool):
        raise ValueError(f"{where}: 'train' must be true or false")
    return {"train": turn["train"]}


def _merge(group: list[dict]) -> dict:
    merged = {"role": group[0]["role"], "content": "\n\n".join(m["content"] for m in group)}
    flags = [m["train"] for m in group if "train" in m]
    if flags:
        merged["train"] = all(flags)  # never train a part the row said not to
    return merged


def normalise(messages: list[dict], where: list[str], notes: list[str] | None = None) -> list[dict]:
    """Apply the rules of this module to `messages` (`where[i]` names turn i in errors)."""
    notes = notes if notes is not None else []
    first_spoken = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    for i in range(first_spoken, len(messages)):
        if messages[i]["role"] == "system":
            raise ValueError(f"{where[i]}: a system message may only come first, before every other turn")
    kept = [m for m in messages if m["content"].strip()]
    if len(kept) < len(messages):
        notes.append(NOTE_EMPTY)
    groups: list[list[dict]] = []
    for m in kept:
        if groups and groups[-1][0]["role"] == m["role"]:
            groups[-1].append(m)
        else:
            groups.append([m])
    if len(groups) < len(kept):
        notes.append(NOTE_MERGED)
    turns = [_merge(g) if len(g) > 1 else g[0] for g in groups]
    spoken = [i for i, m in enumerate(turns) if m["role"] != "system"]
    if spoken and turns[spoken[0]]["role"] == "assistant" and "train" not in turns[spoken[0]]:
        turns[spoken[0]] = {**turns[spoken[0]], "train": False}
        notes.append(NOTE_CONTEXT)
    roles = [m["role"] for m in turns]
    if "assistant" not in roles:
        raise ValueError("the conversation has no assistant turn, so nothing would be trained")
    if "user" not in roles or "assistant" not in roles[roles.index("user"):]:
        raise ValueError("the conversation has no assistant reply to a user turn, so nothing would be trained "
                         "(an assistant turn before the first user turn is context only)")
    if roles[-1] == "user":
        turns.pop()
        notes.append(NOTE_TRAILING)
    return turns
