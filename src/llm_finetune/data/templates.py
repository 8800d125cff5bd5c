"""Built-in chat templates, for models without one or with one that cannot be masked exactly.

`data.template: null` keeps the tokenizer's own template. A name picks one below; it replaces the
tokenizer's `chat_template`, so `save_pretrained` stores it with the adapter and `generate` (which
loads the tokenizer from the adapter) renders prompts with exactly the same text. A template whose
special tokens the tokenizer lacks adds them; the caller then resizes the embeddings and trains the
new rows (see `added_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TemplateError

# A leading system message folded into the first user turn, for formats that have no system role.
_FOLD_SYSTEM = (
    "{% set sys = '' %}{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
)


@dataclass(frozen=True)
class Template:
    name: str
    jinja: str
    special_tokens: tuple[str, ...]  # must each be one token; added to the tokenizer if missing
    about: str


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template(
        "chatml",
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
        "ChatML (Qwen, SmolLM, many others): <|im_start|>role ... <|im_end|>",
    ),
    Template(
        "llama3",
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "Llama 3: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>",
    ),
    Template(
        "mistral",
        "{{ bos_token }}" + _FOLD_SYSTEM + "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}",
        (),
        "Mistral instruct: [INST] question [/INST] answer</s> (system folded into the first question)",
    ),
    Template(
        "gemma",
        "{{ bos_token }}" + _FOLD_SYSTEM + "{% for message in messages %}{{ '<start_of_turn>' + "
        "('model' if message['role'] == 'assistant' else 'user') + '\n' + (sys if loop.first else '') + "
        "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
        "Gemma: <start_of_turn>user|model ... <end_of_turn> (system folded into the first user turn)",
    ),
    Template(
        "alpaca",
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
        (),
        "plain alpaca prompt for base models: ### Instruction: ... ### Response: ... <eos>",
    ),
)}


def apply_template(tokenizer, name: str | None) -> list[str]:
    """Install the named template on `tokenizer` (in place); return the special tokens it had to add."""
    if name is None:
        return []
    if name not in TEMPLATES:
        raise TemplateError(f"data.template: unknown template {name!r}; built-in ones: {', '.join(TEMPLATES)} "
                            "(or null for the tokenizer's own)")
    template = TEMPLATES[name]
    if template.special_tokens == () and "eos_token" in template.jinja and tokenizer.eos_token is None:
        raise TemplateError(f"data.template={name} ends every reply with the EOS token, but this tokenizer has "
                            "none; pick a template with its own end-of-turn token (chatml, llama3, gemma)")
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    tokenizer.chat_template = template.jinja
    return missing


def added_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]
