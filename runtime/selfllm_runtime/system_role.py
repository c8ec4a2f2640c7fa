"""A family's system-role policy (model.yaml `system_role`, metadata.SystemRole), applied in one place: a
Jinja prelude put before the checkpoint's own chat template.

Some templates have no system role (Gemma-2's raises "System role not supported" on one). For them
(`merge_into_first_user`) the prelude rewrites `messages` before the template reads them: each system
message's text and a blank line go before the text of the first user turn after it (as Gemma-3's own
template does with a leading one); a system message with no user turn after it becomes a user turn.
`native` families get their template unchanged.

The rule is written once, in Jinja, so every renderer applies the very same one:
- `render_chat` renders messages for the transformers engine (ChatEngine.format_prompt: fastapi,
  webdemo, langchain, lora infer) and for LoRA training data (finetune.data.ChatTokenizer);
- `with_system_role` gives vLLM its `--chat-template` (tasks/vllm_server.py): the checkpoint's template
  with the same prelude.
The checkpoint's files are never changed (the tokenizer's own template stays as it is).
"""
from __future__ import annotations

from typing import Any

from .metadata import SystemRole

MARKER = "selfllm system_role: merge_into_first_user"
# Emits no text: every tag strips the whitespace around it; the last one is followed directly by the template
# and keeps the template's first newline (`+%}`: no trim_blocks). Message contents are strings here (the runtime
# joins text parts; vLLM passes strings to a template that does not loop over content parts).
MERGE_INTO_FIRST_USER = (
    "{#- " + MARKER + " (self-llm recipes, runtime/selfllm_runtime/system_role.py): this model's template has no "
    "system role; each system message's text and a blank line go before the first user turn after it. -#}\n"
    "{%- set selfllm = namespace(messages=[], system='') -%}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['role'] == 'system' -%}\n"
    "    {%- set selfllm.system = selfllm.system + message['content'] + '\\n\\n' -%}\n"
    "  {%- elif message['role'] == 'user' and selfllm.system -%}\n"
    "    {%- set selfllm.messages = selfllm.messages + [{'role': 'user', 'content': selfllm.system + message['content']}] -%}\n"
    "    {%- set selfllm.system = '' -%}\n"
    "  {%- else -%}\n"
    "    {%- set selfllm.messages = selfllm.messages + [message] -%}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if selfllm.system -%}\n"
    "  {%- set selfllm.messages = selfllm.messages + [{'role': 'user', 'content': selfllm.system[:-2]}] -%}\n"
    "{%- endif -%}\n"
    "{%- set messages = selfllm.messages +%}"
)
PRELUDES: dict[str, str] = {"native": "", "merge_into_first_user": MERGE_INTO_FIRST_USER}


def with_system_role(template: str, policy: SystemRole) -> str:
    """The template to render with: `template` itself for native families, else the policy's prelude
    then `template` (once: a template that already has it is returned as it is)."""
    prelude = PRELUDES[policy]
    if not prelude or MARKER in template:
        return template
    return prelude + template


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], policy: SystemRole, **kwargs: Any) -> str:
    """tokenizer.apply_chat_template(messages, tokenize=False, **kwargs) under the family's system-role policy:
    the one way the runtime turns messages into prompt text."""
    if policy != "native":
        kwargs["chat_template"] = with_system_role(
            tokenizer.get_chat_template(kwargs.get("chat_template"), kwargs.get("tools")), policy)
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
