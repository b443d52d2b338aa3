"""The model's tokenizer: tokenizer.json (or Kimi-K2's tiktoken.model), BOS as the model
expects it, its chat template, and the check that every token id indexes its embedding."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import UserError, first_line
from ..io.source import Checkpoint
from ..io.text import JsonText
from .families import family_for
from .tiktoken_vocab import TiktokenVocab, tiktoken_tokenizer


def no_tokenizer(location: str, tiktoken: bool) -> UserError:
    """The refusal of a checkpoint without tokenizer.json; tiktoken: it ships tiktoken.model
    instead, which hcconvert reads only for the families that declare how (Kimi-K2's)."""
    found = (": it ships tiktoken.model, which hcconvert reads only for Kimi-K2's families; "
             "add a tokenizer.json of the same vocabulary beside it" if tiktoken else "")
    return UserError(f"{location} has no tokenizer.json (needed for calibration text){found}")


class TextTokenizer:
    """The model's tokenizer.json (or, where the family says how, its tiktoken.model); BOS as
    its post-processor adds it, and also where tokenizer_config.json sets add_bos_token
    (Llama-style tokenizers add BOS that way). With embedding_rows given, every token id must
    index the model's embedding table."""

    def __init__(self, model_dir: Path, embedding_rows: int | None = None,
                 tiktoken: TiktokenVocab | None = None):
        path, vocab = model_dir / "tokenizer.json", model_dir / "tiktoken.model"
        if not path.is_file() and not (tiktoken is not None and vocab.is_file()):
            raise no_tokenizer(str(model_dir), vocab.is_file())
        try:
            config_path = model_dir / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            if not isinstance(config, dict):
                raise ValueError("tokenizer_config.json is not a JSON object")
            self.tokenizer = (Tokenizer.from_file(str(path)) if path.is_file() else
                              tiktoken_tokenizer(vocab, tiktoken, _special_names(config)))
        except UserError:
            raise
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"cannot read the tokenizer in {model_dir}: {err}") from None
        # A saved truncation or padding setting would cut or pad every document.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos_id = self._bos_id(config)
        self.template = _chat_template(model_dir, config)
        self.special_tokens = {key: _token_text(config.get(key))
                               for key in ("bos_token", "eos_token")}
        self.embedding_rows = embedding_rows
        # A token spells at most this many characters of text, so a document's first
        # chars_for(n) characters give n tokens (a tokenizer that drops whitespace may
        # need more, hence the factor 2 below; fewer tokens only means fewer samples).
        self.longest_token = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)),
                                 default=1)

    def _bos_id(self, config: dict) -> int | None:
        bos = config.get("bos_token")
        if isinstance(bos, dict):
            bos = bos.get("content")
        if not isinstance(bos, str) or not bos or config.get("add_bos_token") is not True:
            return None
        return self.tokenizer.token_to_id(bos)

    def render_chat(self, messages: list) -> str:
        """A chat-format document as the model sees it: its chat template applied."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered = render_jinja_template([messages], chat_template=self.template,
                                             **self.special_tokens)
        except Exception as err:  # jinja2's errors vary: a template error, bad messages
            raise ValueError(f"the chat template cannot render these messages: "
                             f"{first_line(err)}") from None
        return rendered[0][0] if isinstance(rendered, tuple) else rendered[0]

    def json_reader(self, field: str) -> JsonText:
        """How this model reads a JSON line: field, or chat messages through its template."""
        return JsonText(field, self.render_chat if self.template else None)

    def chars_for(self, tokens: int) -> int:
        """Characters of one document that can be needed to give this many tokens."""
        return 2 * tokens * max(self.longest_token, 1)

    def encode(self, text: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text).ids
        except Exception as err:  # a lone surrogate, say; tokenizers raises bare Exceptions
            raise UserError(f"calibration text cannot be tokenized: {first_line(err)}") from None
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def check_ids(self, tokens: torch.Tensor) -> None:
        top = int(tokens.max())
        if self.embedding_rows is not None and top >= self.embedding_rows:
            raise UserError(f"the tokenizer gives token id {top}, beyond the model's embedding "
                            f"table of {self.embedding_rows} rows: the tokenizer does not "
                            "belong to this model")


def _special_names(config: dict) -> dict[int, str]:
    """tokenizer_config.json's added tokens by id."""
    added = config.get("added_tokens_decoder") or {}
    return {int(i): _token_text(token) for i, token in added.items()}


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(model_dir: Path, config: dict) -> str | None:
    """The model's default chat template: chat_template.jinja beside the tokenizer, or
    tokenizer_config.json's (a string, or named templates of which "default" is used)."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def embedding_rows(ckpt: Checkpoint) -> int | None:
    """Rows of the checkpoint's embedding table (its vocabulary), from the header."""
    embedding = ckpt.tensors.get(family_for(ckpt.config).embedding)
    return embedding.shape[0] if embedding is not None and embedding.shape else None


def model_tokenizer(ckpt: Checkpoint, check_rows: bool = True) -> TextTokenizer:
    """The checkpoint's tokenizer, checked against its embedding table with check_rows."""
    return TextTokenizer(ckpt.root, embedding_rows(ckpt) if check_rows else None,
                         family_for(ckpt.config).tiktoken)
