"""Tokenizers from the same source as the weights: a HF directory's tokenizer.json, a
GGUF file's metadata, or a byte-level stand-in for random-weight models."""

from __future__ import annotations

import json
import os
from typing import Any

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        chat_template: str | None,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self._template: Any = None
        self._max_token_chars: int | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token stands for (its longest vocabulary
        entry; 1 for the byte stand-in), so a text of n characters has at least
        n / max_token_chars tokens."""
        if self._max_token_chars is None:
            vocab = getattr(self.backend, "get_vocab", None)
            words = vocab(with_added_tokens=True) if vocab is not None else {}
            self._max_token_chars = max((len(w) for w in words), default=1)
        return self._max_token_chars

    def token_bytes(self) -> tuple[list[bytes], list[int]]:
        """The bytes each token id stands for, and the ids of the special tokens (whose
        entry is their text): what a grammar library needs to tell which tokens may come
        next. Byte-level BPE entries are mapped back through GPT-2's byte alphabet,
        SentencePiece ones through '\u2581' (space) and '<0xNN>' (one byte)."""
        backend = self.backend
        if isinstance(backend, _ByteBackend):
            n = backend.vocab_size
            return [bytes([i]) if i < 256 else f"<{i}>".encode() for i in range(n)], list(
                range(256, n)
            )
        added = backend.get_added_tokens_decoder()
        special = sorted(i for i, t in added.items() if t.special)
        byte_level = _is_byte_level(backend)
        out = []
        for i in range(self.vocab_size):
            text = backend.id_to_token(i) or ""
            if i in added:
                out.append(text.encode("utf-8"))
            elif byte_level:
                out.append(bytes(_UNICODE_TO_BYTE.get(ch, 0) for ch in text))
            elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                out.append(bytes([int(text[3:5], 16)]))
            else:
                out.append(text.replace("\u2581", " ").encode("utf-8"))
        return out, special

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # A batch of one, where the backend has batches: HF tokenizers' `encode` holds the
        # GIL throughout (1.6 s for a 2 MB prompt), `encode_batch` releases it, so a
        # caller may tokenize in a thread while its event loop runs on. Same ids.
        batch = getattr(self.backend, "encode_batch", None)
        enc = (
            batch([text], add_special_tokens=add_special_tokens)[0]
            if batch is not None
            else self.backend.encode(text, add_special_tokens=add_special_tokens)
        )
        ids = list(enc.ids)
        bos = self.bos_token_id
        wants_bos = add_special_tokens and self.add_bos_token and bos is not None
        if wants_bos and (not ids or ids[0] != bos):
            ids.insert(0, bos)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat messages into a prompt with the model's own template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
            self._template = env.from_string(self.chat_template)
        tok = self.backend
        special = {
            "bos_token": tok.id_to_token(self.bos_token_id)
            if self.bos_token_id is not None
            else "",
            "eos_token": tok.id_to_token(self.eos_token_id)
            if self.eos_token_id is not None
            else "",
        }
        return str(
            self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **special
            )
        )

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(os.path.join(path, "tokenizer.json"))
        conf = _read_json(os.path.join(path, "tokenizer_config.json"))
        template = conf.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        model_conf = _read_json(os.path.join(path, "config.json"))
        gen_conf = _read_json(os.path.join(path, "generation_config.json"))

        def token_id(key: str) -> int | None:
            t = conf.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            found = backend.token_to_id(t) if isinstance(t, str) else None
            if found is not None:
                return int(found)
            v = gen_conf.get(key + "_id", model_conf.get(key + "_id"))
            return v[0] if isinstance(v, list) else v

        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_id=token_id("eos_token"),
            chat_template=template,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Byte-level BPE from `tokenizer.ggml.*` (GGUF tokenizer model 'gpt2')."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        if meta["model"] != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {meta['model']!r} is not supported (gpt2 BPE only)"
            )
        tokens = list(meta["tokens"])
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if meta.get("pre") == "smollm":
            # llama.cpp's 'smollm' pre-tokenizer: every digit alone, then GPT-2's split.
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        types = list(meta["token_types"])
        special = [
            tokens[i] for i, t in enumerate(types) if t in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
        ]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        return cls(
            backend,
            bos_token_id=meta.get("bos_token_id"),
            eos_token_id=meta.get("eos_token_id"),
            chat_template=meta.get("chat_template"),
            add_bos_token=meta.get("add_bos_token", False),
        )

    @classmethod
    def bytes_only(cls, vocab_size: int, eos_token_id: int | None = None) -> Tokenizer:
        """Stand-in for random-weight models: UTF-8 bytes are tokens 0..255; other ids
        decode to nothing. Enough to run text through a model made for profiling."""
        return cls(
            _ByteBackend(vocab_size),
            bos_token_id=None,
            eos_token_id=eos_token_id,
            chat_template=_PLAIN_TEMPLATE,
        )


_PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for
    each byte in a byte-level BPE vocabulary -> that byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _byte_alphabet()


def _is_byte_level(backend: Any) -> bool:
    """Whether a HF tokenizers backend decodes through the byte-level alphabet."""
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


class _ByteBackend:
    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(f"a byte tokenizer needs a vocabulary of >= 256, got {vocab_size}")
        self.vocab_size = vocab_size

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        return _Encoding(list(text.encode("utf-8")))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Bytes as UTF-8; an id past the bytes (a random-weight model samples those most)
        as `<id>`, so that its output is visible rather than blank."""
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace") + f"<{i}>")
            run.clear()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        return chr(i) if i < 256 else f"<{i}>"


class _Encoding:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _raise(message: str) -> None:
    raise ValueError(f"chat template error: {message}")
