"""Tokenizer and chat template, torch-free (the router tokenizes without importing torch).

HF folders: `tokenizer.json` through the `tokenizers` library, `tokenizer_config.json` for the
special tokens and chat template. GGUF files: the vocabulary is converted once by transformers in
a child process (its converter imports torch) and cached as an HF folder under
~/.cache/pdserve/tokenizers/<file fingerprint>/, so later loads take milliseconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.common.config import ConfigError, env_flag
from pdserve.common.errors import ParameterError


class Tokenizer:
    def __init__(self, folder: str, chat_template_override: str | None = None):
        from tokenizers import Tokenizer as RustTokenizer
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{folder} has no tokenizer.json")
        self._tok = RustTokenizer.from_file(path)
        cfg = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.chat_template = chat_template_override or cfg.get("chat_template") or _read_template_file(folder)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # The longest vocabulary entry: n tokens never decode to more than n * this many characters
        # (byte-level entries spell one character per byte), so a longer text is too long untokenized.
        self.max_token_chars = max((len(t) for t in self.get_vocab()), default=1)
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids: list[int] = [] if eos_id is None else [eos_id]
        self._template = None

    # ---- encode / decode --------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(t) or "" for t in token_ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # HF tokenizer attributes that vLLM users read off llm.get_tokenizer()
    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.bos_token) if self.bos_token else None

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` underneath (grammar compilers read its vocabulary)."""
        return self._tok

    # ---- chat -------------------------------------------------------------------------------
    def with_chat_template(self, chat_template: str) -> "Tokenizer":
        """This tokenizer with another chat template (a call's own: LLM.chat(chat_template=...))."""
        other = copy.copy(self)
        other.chat_template, other._template = chat_template, None
        return other

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, continue_final_message: bool = False, **kwargs) -> str:
        """The template's text. `continue_final_message` (HF's and vLLM's): the text ends right
        after the last message's content, its end-of-turn markup cut, so the model continues that
        message (an assistant reply started by the caller); not with add_generation_prompt."""
        if continue_final_message:
            if add_generation_prompt:
                raise ParameterError("continue_final_message", "continue_final_message and add_generation_prompt "
                                                               "cannot both be true")
            if not messages or not isinstance(messages[-1].get("content"), str) or not messages[-1]["content"]:
                raise ParameterError("continue_final_message", "continue_final_message needs a last message with "
                                                               "text content to continue")
        if not self.chat_template:
            raise ValueError("this model has no chat template; use completions instead of chat")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        text = self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        if continue_final_message:
            final = messages[-1]["content"]
            for piece in (final, final.strip()):  # templates that strip the content (as HF tries)
                end = text.rfind(piece) if piece else -1
                if end >= 0:
                    return text[:end + len(piece)]
            raise ParameterError("continue_final_message", "the chat template does not write the last message's "
                                                           "content as given, so it cannot be continued")
        return text


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _read_template_file(folder: str) -> str | None:
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    return None


def _fingerprint(path: str) -> str:
    st = os.stat(path)
    h = hashlib.blake2b(f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}".encode(), digest_size=8)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()


def gguf_tokenizer_folder(gguf_path: str) -> str:
    """The cached HF tokenizer folder for a GGUF file, converting it on first use."""
    cache = env_flag("PDSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")
    folder = os.path.join(cache, "tokenizers", _fingerprint(gguf_path))
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tmp = folder + f".tmp{os.getpid()}"
        proc = subprocess.run([sys.executable, "-m", "pdserve.common.tokenizer", gguf_path, tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"cannot read the tokenizer of {gguf_path}: {proc.stderr.strip()[-500:]}")
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its copy is identical
            pass
    return folder


def read_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a file's contents, or the value itself when it is a Jinja template
    (it holds `{` or a newline); a value that looks like a path but names no file is an error."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{" in value or "\n" in value:
        return value
    raise ConfigError(f"--chat-template {value!r}: no such file (give a Jinja file or the template itself)")


def load_tokenizer(model_path: str, tokenizer_path: str | None = None, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of a model; `chat_template` (`--chat-template`, a file or the template)
    replaces the model's."""
    path = tokenizer_path or model_path
    override = read_chat_template(chat_template)
    if os.path.isfile(path):
        return Tokenizer(gguf_tokenizer_folder(path), override)
    return Tokenizer(path, override)


def _convert(gguf_path: str, out: str) -> None:
    import logging
    logging.disable(logging.WARNING)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                        gguf_file=os.path.basename(gguf_path))
    tok.save_pretrained(out)


if __name__ == "__main__":
    _convert(sys.argv[1], sys.argv[2])
