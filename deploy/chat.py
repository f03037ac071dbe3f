"""Chat prompts: the tokenizer config's Jinja `chat_template`, or ChatML (Qwen's format) if it has none."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from cluster.model.tiny import CHATML_TEMPLATE  # Qwen's ChatML: what make-tiny writes, and the default

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplate:
    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        source = config.get("chat_template") or CHATML_TEMPLATE
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            source = next((t["template"] for t in source if t.get("name") == "default"), source[0]["template"])
        self._template = ImmutableSandboxedEnvironment(trim_blocks=False).from_string(source)

    def render(self, messages: list[dict]) -> str:
        for i, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {message.get('role')!r}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        if not messages:
            raise ValueError("messages is empty")
        return self._template.render(messages=messages, add_generation_prompt=True)
