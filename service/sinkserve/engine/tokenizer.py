"""Text <-> token ids, from a GGUF file's metadata or a Hugging Face `tokenizer.json`.

`Tokenizer` wraps a `tokenizers.Tokenizer`; `IncrementalDecoder` turns a stream of ids into
text deltas; the chat template lives in `sinkserve.engine.chat_format`.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from sinkserve.engine.gguf_file import gguf_field, open_gguf

# Control tokens that end a turn in the common chat formats. llama.cpp also stops on these
# whatever the declared EOS is: SmolLM2 declares <|im_end|> but may emit <|endoftext|>.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>")

# Split patterns of llama.cpp's `tokenizer.ggml.pre` names (the same as the HF tokenizer.json
# of those models). `smollm` and `gpt2` use ByteLevel's built-in GPT-2 pattern instead.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """Encodes text to ids and back. Thread-safe: the wrapped tokenizers are never mutated.

    `token_bytes[i]` is the UTF-8 byte string token `i` stands for (a byte-level BPE token
    may hold part of a character); `eos_ids` is every id that ends a generated turn.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        token_bytes: Sequence[bytes],
        bos_token: str | None,
        eos_token: str | None,
        extra_eos_ids: Iterable[int] = (),
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self._literal = tokenizers.Tokenizer.from_str(backend.to_str())
        self._literal.encode_special_tokens = True  # special tokens in text stay plain text
        self.token_bytes = tuple(token_bytes)
        added = backend.get_added_tokens_decoder()
        self.special_tokens = frozenset(t.content for t in added.values() if t.special)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = None if bos_token is None else backend.token_to_id(bos_token)
        ends = {
            backend.token_to_id(t) for t in (eos_token, *_END_TOKENS) if t in self.special_tokens
        }
        self.eos_ids = frozenset(ends | set(extra_eos_ids))
        # whether the tokenizer itself prepends BOS to plain text (Llama 3's does)
        self.add_bos = self.bos_id is not None and backend.encode("").ids[:1] == [self.bos_id]
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Ids of `text`, no BOS added. `special=False` encodes e.g. "<|im_start|>" as
        ordinary text (for user-supplied content), True as the control token."""
        backend = self._backend if special else self._literal
        return list(backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, control tokens included; invalid UTF-8 becomes U+FFFD."""
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a `.gguf` file or a Hugging Face directory holding `tokenizer.json`."""
        path = Path(path)
        return cls.from_hf_dir(path) if path.is_dir() else cls.from_gguf(path)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """From `tokenizer.ggml.*` metadata; supports byte-level BPE (`model == "gpt2"`)."""
        reader = open_gguf(path)
        kind = gguf_field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r} (only 'gpt2' BPE)")
        pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
        tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
        types: list[int] = gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{path}: duplicate token strings in tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
        backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre == "llama-bpe"))
        backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k == _USER_DEFINED
            ]
        )

        def token(key: str) -> str | None:
            i = gguf_field(reader, f"tokenizer.ggml.{key}_token_id", None)
            return None if i is None else tokens[i]

        ends = (gguf_field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eot", "eom"))
        return cls(
            backend,
            token_bytes=_byte_level_bytes(backend),
            bos_token=token("bos"),
            eos_token=token("eos"),
            extra_eos_ids=(int(i) for i in ends if i is not None),
            chat_template=gguf_field(reader, "tokenizer.chat_template", None),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From `tokenizer.json` + `tokenizer_config.json` (+ the EOS ids of `config.json`
        and `generation_config.json`, and `chat_template.jinja`, where present)."""
        path = Path(path)
        spec = json.loads((path / "tokenizer.json").read_text())
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        config = _read_json(path / "tokenizer_config.json")
        extra_eos: list[int] = []
        for name in ("config.json", "generation_config.json"):
            value = _read_json(path / name).get("eos_token_id")
            extra_eos += [] if value is None else [value] if isinstance(value, int) else value
        template_file = path / "chat_template.jinja"
        template = (
            template_file.read_text() if template_file.is_file() else config.get("chat_template")
        )
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        return cls(
            backend,
            token_bytes=_byte_level_bytes(backend) if byte_level else _sentencepiece_bytes(backend),
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            extra_eos_ids=extra_eos,
            chat_template=template,
        )


class IncrementalDecoder:
    """Turns ids fed one at a time into text deltas: each `feed` returns only characters
    completed so far, holding back the bytes of a character split across tokens.

    Invariant: the concatenation of all deltas plus `flush()` is the UTF-8 decoding (with
    U+FFFD for invalid bytes) of the concatenated `token_bytes` of the ids fed.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return str(self._utf8.decode(self._token_bytes[token_id]))

    def flush(self) -> str:
        """Whatever is held back, as U+FFFD (the stream ended inside a character)."""
        return str(self._utf8.decode(b"", final=True))


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    if pre in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    splits = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
    if pre not in splits:
        raise ValueError(
            f"unsupported tokenizer.ggml.pre {pre!r}; known: smollm, gpt2, {', '.join(splits)}"
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves,
    the other 68 bytes for chr(256 + n) in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _byte_level_bytes(backend: tokenizers.Tokenizer) -> list[bytes]:
    to_byte = _gpt2_unicode_to_byte()
    added = backend.get_added_tokens_decoder()
    size = backend.get_vocab_size(with_added_tokens=True)
    out = []
    for i in range(size):
        token = backend.id_to_token(i) or ""
        out.append(added[i].content.encode() if i in added else bytes(to_byte[c] for c in token))
    return out


def _sentencepiece_bytes(backend: tokenizers.Tokenizer) -> list[bytes]:
    """`<0xNN>` byte-fallback tokens are that byte; `▁` stands for a space."""
    added = backend.get_added_tokens_decoder()
    out = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        token = backend.id_to_token(i) or ""
        if i in added:
            out.append(added[i].content.encode())
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out.append(bytes([int(token[3:5], 16)]))
        else:
            out.append(token.replace("\u2581", " ").encode())
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _token_content(value: str | dict[str, Any] | None) -> str | None:
    return value.get("content") if isinstance(value, dict) else value
