"""Chat messages -> the prompt text the model continues.

A Hugging Face model directory carries its chat format as a Jinja template (`chat_template` in
tokenizer_config.json, or a chat_template.jinja file beside it, as newer transformers write
it); rendering that template is the only way to build the prompt the model was tuned on, so it
is rendered here with jinja2's sandbox (the template comes with downloaded files). A model
without one (a run trained here) gets a plain, documented fallback:

    system: You are terse.
    user: Hi
    assistant:

one "role: content" line per message, then "assistant:" for the model to continue.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from jaxlm.config_fields import ConfigError

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _raise(message):
    raise ConfigError(f"the chat template refused these messages: {message}")


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    # jinja2's own tojson escapes <, >, & for HTML; prompts want the plain JSON
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


class ChatTemplate:
    """`template`: a Jinja chat template (None: the fallback above); `special_tokens`: the
    values the template may name (bos_token, eos_token, ...)."""

    def __init__(self, template: str | None = None, special_tokens: dict | None = None,
                 source: str = "chat template"):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.template = None
        if template is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            try:
                self.template = env.from_string(template)
            except TemplateError as e:
                raise ConfigError(f"{source}: the chat template does not compile ({e})") from None

    @classmethod
    def beside(cls, tokenizer_file) -> "ChatTemplate":
        """The template of the Hugging Face files next to `tokenizer_file` (None, or no
        template there: the fallback)."""
        if tokenizer_file is None:
            return cls()
        folder = Path(tokenizer_file).parent
        config_path = folder / "tokenizer_config.json"
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{config_path}: cannot read it ({e})") from None
        specials = {}
        for name in SPECIAL_TOKENS:
            value = config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                specials[name] = value
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), specials, str(jinja_file))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ConfigError(f"{config_path}: chat_template: expected a template string")
        return cls(template, specials, str(config_path))

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` ({"role", "content"} dicts), ending where the assistant's
        reply begins. A template's own refusal is a ConfigError."""
        if self.template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        **self.special_tokens)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 (TemplateError, or a TypeError inside it)
            raise ConfigError(f"the chat template ({self.source}) failed on these messages: "
                              f"{e}") from None
