"""An Ollama Modelfile whose Go template renders exactly what the model's jinja chat template renders."""

from __future__ import annotations

from typing import Any

from ..data.tokenize import end_of_turn_ids
from ..errors import ExportError

_MARK = {"system": "\u2063SYS\u2063", "user": "\u2063USR\u2063", "assistant": "\u2063AST\u2063"}


def _split_template(tokenizer) -> dict[str, Any]:
    """Read the jinja chat template as per-role (before, after) text around the content.

    The parts are checked by rebuilding a four-turn conversation from them and comparing it with the
    jinja rendering; a template that does not decompose this way (conditionals on content, trimming)
    is refused rather than approximated.
    """
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    sys_m = {"role": "system", "content": _MARK["system"]}
    usr_m = {"role": "user", "content": _MARK["user"]}
    ast_m = {"role": "assistant", "content": _MARK["assistant"]}
    # A template may open with the BOS token ({{ bos_token }}, as Llama 3's does): that belongs to the
    # conversation, not to the first message.
    # Only when the template really writes bos_token: SmolLM's BOS is <|im_start|>, which opens every turn.
    bos = tokenizer.bos_token or ""
    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    head = bos if bos and "bos_token" in source and render([sys_m]).startswith(bos) else ""

    def render_body(msgs, gen=False):
        return render(msgs, gen)[len(head):]

    one = render_body([sys_m])
    two = render_body([sys_m, usr_m])
    three = render_body([sys_m, usr_m, ast_m])
    prompt = render_body([sys_m, usr_m], gen=True)
    if not (two.startswith(one) and three.startswith(two) and prompt.startswith(two)):
        raise ExportError("the chat template does not render turn by turn")
    header = prompt[len(two):]
    blocks = {"system": one, "user": two[len(one):], "assistant": three[len(two):]}
    parts = {}
    for role, block in blocks.items():
        before, sep, after = block.partition(_MARK[role])
        if not sep:
            raise ExportError(f"the chat template drops the {role} content")
        parts[role] = (before, after)
    # Text the template puts before a conversation that has no system message (a default system prompt).
    alone = render_body([usr_m])
    user_block = parts["user"][0] + _MARK["user"] + parts["user"][1]
    default_system = None
    if alone != user_block:
        lead = alone[: len(alone) - len(user_block)] if alone.endswith(user_block) else None
        sb, sa = parts["system"]
        if lead is None or not (lead.startswith(sb) and lead.endswith(sa)):
            raise ExportError("the chat template adds text before a conversation that is not a system message")
        default_system = lead[len(sb): len(lead) - len(sa)]
    # Check: rebuild a longer conversation from the parts.
    convo = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    rebuilt = head + "".join(parts[m["role"]][0] + m["content"] + parts[m["role"]][1] for m in convo) + header
    if rebuilt != render(convo, gen=True):
        raise ExportError("the chat template does not decompose into per-role text around the content")
    return {"parts": parts, "header": header, "default_system": default_system, "head": head}


def _go_literal(text: str) -> str:
    if "{{" in text or '"""' in text:
        raise ExportError("the chat template's text contains '{{' or '\"\"\"', which an Ollama template cannot hold")
    return text


def ollama_modelfile(tokenizer, gguf_name: str) -> str:
    """A Modelfile whose Go template renders exactly what the jinja template renders."""
    split = _split_template(tokenizer)
    p = split["parts"]
    role_branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go_literal(p[role][0])}{{{{ .Content }}}}'
        f"{_go_literal(p[role][1])}"
        for i, role in enumerate(("system", "user", "assistant"))
    )
    # One line with no whitespace trimming ({{- ... -}}): the newlines in the parts are part of the format.
    head = split["head"]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if head and probe and probe[0] == tokenizer.bos_token_id:
        head = ""  # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token); writing it too would double it
    template = f"{_go_literal(head)}{{{{ range .Messages }}}}{role_branches}{{{{ end }}}}{{{{ end }}}}{_go_literal(split['header'])}"
    stops = []
    for tid in end_of_turn_ids(tokenizer):
        tok = tokenizer.convert_ids_to_tokens(tid)
        if tok and tok not in stops:
            stops.append(tok)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if split["default_system"]:
        lines.append(f'SYSTEM """{_go_literal(split["default_system"])}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
