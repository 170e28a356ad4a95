"""The tokenizer `add dataset` counts tokens with, found on this machine and loaded without
transformers or torch: a model's `tokenizer.json` read by the `tokenizers` library (the fast
tokenizer transformers wraps, so the ids are the trainer's).

Where it looks, for `--tokenizer`: a local model folder or file:// URI; a catalog name with an
hf:// URI in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), never the network. When no tokenizer can be used, `find` says why in
words the command prints (a catalog model shipped as a GGUF file, one not downloaded yet, chat
records, whose template transformers renders). Called by `commands.add`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune_cli.errors import CliError
from finetune_trainer.catalog import CATALOG

TOKENIZER_FILE = "tokenizer.json"


class JsonTokenizer:
    """What `finetune_trainer.records.encode_batch` calls on a tokenizer, over a `tokenizers`
    Tokenizer: batch encoding with or without special tokens, the EOS id, no chat template."""

    chat_template = None

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.backend.no_padding()
        self.backend.no_truncation()  # transformers' __call__ neither pads nor truncates by default
        eos = _eos_token(folder)
        self.eos_token_id = None if eos is None else self.backend.token_to_id(eos)

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __call__(
        self, texts: Sequence[str], *, add_special_tokens: bool = True, return_attention_mask: bool = False
    ) -> dict[str, list[list[int]]]:
        encoded = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}


def _eos_token(folder: Path) -> str | None:
    """The EOS token's text, from tokenizer_config.json (else special_tokens_map.json)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


@dataclass(frozen=True)
class Counting:
    """A tokenizer to count with and what it is, or None and why not."""

    tokenizer: JsonTokenizer | None
    description: str


def hub_cache(env: Mapping[str, str]) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    home = Path(env["HF_HOME"]) if env.get("HF_HOME") else Path("~/.cache/huggingface").expanduser()
    return home / "hub"


def _cached_snapshot(repo: str, env: Mapping[str, str]) -> Path | None:
    """The folder of the cached main revision of a hub repository that has a tokenizer.json."""
    base = hub_cache(env) / ("models--" + repo.replace("/", "--"))
    ref = base / "refs" / "main"
    candidates = [base / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    if (base / "snapshots").is_dir():
        candidates += sorted((base / "snapshots").iterdir())
    return next((c for c in candidates if (c / TOKENIZER_FILE).is_file()), None)


def find(model: str, *, format: str, env: Mapping[str, str] = os.environ) -> Counting:
    """The tokenizer of `model` (--tokenizer: a catalog name or a local model folder)."""
    if format == "chat":
        return Counting(
            None,
            "tokens not counted: chat records are rendered with the model's chat template by transformers, "
            "which kubectl finetune does not load (the trainer logs the count when it tokenizes)",
        )
    if model in CATALOG:
        uri = CATALOG[model].uri
        if not uri.startswith("hf://"):
            return Counting(
                None,
                f"tokens not counted: {model}'s tokenizer is inside its GGUF file, which kubectl finetune does "
                "not read; pass --tokenizer <model folder> (a folder with tokenizer.json) to count them",
            )
        folder = _cached_snapshot(uri[len("hf://") :], env)
        if folder is None:
            return Counting(
                None,
                f"tokens not counted: {model} ({uri}) is not in the local Hugging Face cache "
                f"({hub_cache(env)}); download it, or pass --tokenizer <model folder>",
            )
        return _load(folder, f"{model} ({folder / TOKENIZER_FILE})")
    path = Path(model[len("file://") :] if model.startswith("file://") else model).expanduser()
    if model.startswith("s3://") or not path.exists():
        raise CliError(
            f"--tokenizer {model}: neither a catalog model nor a local model folder",
            hint="see `kubectl finetune list models`, or give a folder that holds tokenizer.json",
        )
    folder = path if path.is_dir() else path.parent
    if not (folder / TOKENIZER_FILE).is_file():
        raise CliError(
            f"--tokenizer {model}: no {TOKENIZER_FILE} in {folder}", hint="give a Hugging Face model folder"
        )
    return _load(folder, str(folder / TOKENIZER_FILE))


def _load(folder: Path, description: str) -> Counting:
    try:
        tokenizer = JsonTokenizer(folder)
    except ImportError:
        return Counting(
            None, "tokens not counted: the tokenizers package is not installed (pip install tokenizers)"
        )
    except Exception as exc:  # a corrupt tokenizer.json: the tokenizers library raises its own Exception
        raise CliError(f"--tokenizer: cannot read {folder / TOKENIZER_FILE}: {exc}") from None
    return Counting(tokenizer, description)
