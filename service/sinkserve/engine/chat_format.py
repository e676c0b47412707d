"""Chat template -> the tokens of one turn, for sessions that only ever append.

The template (Jinja, as in Hugging Face / GGUF metadata) renders a whole conversation. A
session holding earlier turns needs only what a new turn adds. `ChatFormat` finds that by
rendering small conversations whose messages are marker strings and cutting the text at the
markers, so it works for ChatML (SmolLM2, Qwen2), Llama-3 and Mistral-style templates alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sinkserve.engine.tokenizer import Tokenizer

_MARK = "SinkServeMarker"  # + role; no whitespace, so `| trim` leaves it whole


@dataclass(frozen=True)
class _Slot:
    role: str
    strip: bool  # the template trims this message's content


# A turn's text: template text and the slots where message contents go, in order.
_Layout = tuple[str | _Slot, ...]


class ChatFormat:
    """Token ids of a session's first and later turns, each ending with the assistant
    generation prompt. Message contents are encoded as plain text: a user typing
    "<|im_start|>" does not inject a control token."""

    def __init__(self, tokenizer: Tokenizer, template: str | None = None) -> None:
        template = template or tokenizer.chat_template
        if not template:
            raise ValueError("the checkpoint has no chat template; use raw prompts")
        self._tokenizer = tokenizer
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals |= {"raise_exception": _raise, "strftime_now": _strftime_now}
        self._template = env.from_string(template)
        self._first = self._layout([("user", "user")])
        try:
            self._first_system: _Layout | None = self._layout(
                [("system", "system"), ("user", "user")]
            )
        except TemplateError:  # e.g. templates that raise on a system role
            self._first_system = None
        prev = [("user", "prev"), ("assistant", "reply"), ("user", "user")]
        layout = self._layout(prev)
        reply_at = next(
            i for i, p in enumerate(layout) if isinstance(p, _Slot) and p.role == "reply"
        )
        self._next = layout[reply_at + 1 :]

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
        """The template's text for a whole conversation (`[{"role", "content"}, ...]`)."""
        tok = self._tokenizer
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
        )

    def first_turn(self, system: str | None, user: str) -> list[int]:
        """Tokens of a new session's first turn (BOS included if the template writes it)."""
        if system is None:
            return self._encode(self._first, {"user": user})
        if self._first_system is None:
            raise ValueError("this chat template does not accept a system prompt")
        return self._encode(self._first_system, {"system": system, "user": user})

    def next_turn(self, user: str, prev_finished_with_eos: bool) -> list[int]:
        """Tokens appended after the previous assistant reply: its closing text (without
        the leading EOS token when the reply already ended with one), the user message,
        and the generation prompt."""
        ids = self._encode(self._next, {"user": user})
        if prev_finished_with_eos and ids and ids[0] in self._tokenizer.eos_ids:
            return ids[1:]
        return ids

    def conversation(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Tokens of a whole conversation (`(role, content)` pairs) ending with the
        assistant generation prompt: what a new session's first turn prefills when a
        client sends its history (OpenAI's stateless chat completions). Contents are
        plain text, as in `first_turn`. ValueError (or jinja2's TemplateError) when the
        template refuses the roles."""
        if not messages:
            raise ValueError("a conversation needs at least one message")
        # Slot names end with a letter: "m1e" is no prefix of "m10e".
        slots = [(role, f"m{i}e") for i, (role, _) in enumerate(messages)]
        contents = {slot: content for (_, slot), (_, content) in zip(slots, messages, strict=True)}
        return self._encode(self._layout(slots), contents)

    def _layout(self, roles_and_slots: Sequence[tuple[str, str]]) -> _Layout:
        """Renders messages whose content is ` marker ` and cuts the text at the markers."""
        messages = [{"role": r, "content": f" {_MARK}{s} "} for r, s in roles_and_slots]
        text = self.render(messages, add_generation_prompt=True)
        found = []
        for _, slot in roles_and_slots:
            bare = _MARK + slot
            if text.count(bare) != 1:
                raise ValueError(
                    f"chat template renders the {slot!r} message {text.count(bare)} times"
                )
            padded = text.find(f" {bare} ")
            start, end = (padded, padded + len(bare) + 2) if padded >= 0 else (text.find(bare), -1)
            found.append((start, end if end >= 0 else start + len(bare), _Slot(slot, padded < 0)))
        layout: list[str | _Slot] = []
        at = 0
        for start, end, piece in sorted(found, key=lambda f: f[0]):
            layout += [text[at:start], piece]
            at = end
        layout.append(text[at:])
        return tuple(p for p in layout if p != "")

    def _encode(self, layout: _Layout, contents: Mapping[str, str]) -> list[int]:
        tok = self._tokenizer
        parts = [
            (p, True)
            if isinstance(p, str)
            else (contents[p.role].strip() if p.strip else contents[p.role], False)
            for p in layout
        ]
        if not any(
            s in text for text, is_template in parts if not is_template for s in tok.special_tokens
        ):
            # one piece: tokens exactly as encoding the rendered conversation would give
            return tok.encode("".join(text for text, _ in parts))
        return [i for text, is_template in parts for i in tok.encode(text, special=is_template)]


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
