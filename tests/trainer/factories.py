"""Tiny models and a tiny tokenizer for trainer tests, built in milliseconds, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.data import IGNORE

if TYPE_CHECKING:
    from finetune_trainer.config import DatasetSpec

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "the market rose and the shares fell while the bank said profit for the year was higher",
    "oil price company market shares bank profit year said rose fell",
    "user assistant system hello how are you what is the answer question reply",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
]
VOCAB_SIZE = 384


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>", bos_token=None
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_config(family: str, vocab_size: int) -> Any:
    from transformers import CodeGenConfig, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0}
    if family == "gptj":
        return GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    if family == "codegen":
        return CodeGenConfig(
            n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, n_ctx=128, **common
        )
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    if family == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    raise ValueError(family)


# family -> what it stands for in the original studio's list
FAMILIES = {
    "gptj": "GPT-J",
    "gpt_neox": "GPT-NeoX / Pythia",
    "codegen": "CodeGen",
    "gpt2": "Cerebras-GPT (GPT-2 architecture)",
    "llama": "Llama / SmolLM2 / Qwen-style",
}


def make_model_dir(family: str, path: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f"file://{path}"


def reference_document(
    record: dict[str, Any], spec: DatasetSpec, tokenizer: Any
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one record computed from the tokenizer directly, apart from the trainer's
    code: what the shards must hold."""
    eos = tokenizer.eos_token_id
    if spec.format == "text":
        ids = [*tokenizer(record[spec.text_field])["input_ids"], eos]
        return ids, ids
    if spec.format == "prompt-completion":
        prompt = tokenizer(record[spec.prompt_field])["input_ids"]
        completion = tokenizer(record[spec.completion_field], add_special_tokens=False)["input_ids"]
        ids = [*prompt, *completion, eos]
        shown = list(prompt) if spec.train_on_inputs else [IGNORE] * len(prompt)
        return ids, [*shown, *completion, eos]

    def render(messages: list[Any], prompt: bool) -> list[int]:
        return list(
            tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=prompt, return_dict=False
            )
        )

    messages = record[spec.messages_field]
    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
            labels[start:end] = ids[start:end]
    if ids[-1] != eos:  # the EOS the trainer appends is trained when it ends an assistant turn
        ids, labels = [*ids, eos], [*labels, IGNORE if labels[-1] == IGNORE else eos]
    return ids, labels
