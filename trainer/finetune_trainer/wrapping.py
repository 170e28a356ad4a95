"""Model wrapping for training: LoRA adapters (peft), FSDP2 sharding, activation checkpointing.

Called by the recipe (`train.py`) after `models.load_model`, before the optimizer is built.
FSDP2 (`torch.distributed.fsdp.fully_shard`) shards one unit per transformer block, then the
root (embeddings, final norm, output layer), over one mesh of all processes — the layout of
torchtitan's and torchtune's distributed recipes. The same code runs with gloo on CPU and NCCL
on CUDA. Must not do I/O.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from finetune_trainer.config import LoraSpec
from finetune_trainer.errors import InvalidInput

log = logging.getLogger(__name__)


def wrap_lora(model: Any, spec: LoraSpec, *, seed: int, frozen_dtype: torch.dtype = torch.float32) -> Any:
    """The model with LoRA adapters (peft); the frozen base in `frozen_dtype` (bf16 halves its
    memory; the adapters stay fp32 master weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(seed)  # the adapter's random init follows the run's seed
    lora = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise InvalidInput(f"lora: {exc}") from exc
    if frozen_dtype != torch.float32:
        for parameter in peft_model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(frozen_dtype)
    return peft_model


def enable_activation_checkpointing(model: Any, *, lora: bool) -> None:
    """Recompute each block's activations in the backward pass. Non-reentrant checkpointing:
    the variant that composes with FSDP2 (and DDP) hooks."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks, in order: the modules whose class the model
    names in `_no_split_modules` (transformers' list of blocks never to split across devices,
    e.g. LlamaDecoderLayer, GPTJBlock, GPTNeoXLayer, CodeGenBlock, GPT2Block)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    # after fully_shard a block's class is FSDP<Block>, a subclass of the original
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise InvalidInput(
            f"hyperparameters.sharding: fsdp needs the model's transformer blocks, and "
            f"{type(model).__name__} names none (_no_split_modules); use sharding data-parallel"
        )
    return blocks


def mixed_precision(precision: str) -> Any:
    """bf16: weights gathered and computed in bf16, gradients reduced in fp32 (the sharded
    master weights and AdamW state stay fp32). fp32: no casts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(
    model: nn.Module,
    *,
    device: torch.device,
    precision: str,
    reshard_after_forward: bool,
    cpu_offload: bool,
) -> nn.Module:
    """FSDP2 over all processes: `fully_shard` on every transformer block, then on the root.
    The model may sit on the CPU; its shards move to `device`'s mesh (or stay in host memory
    with `cpu_offload`, where the optimizer step then runs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    settings: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mixed_precision(precision),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    # No model.to(device) first: each fully_shard call moves its own block to the device and
    # shards it there, so a GPU never holds more than one full block of a model loaded on the CPU.
    blocks = transformer_blocks(model)
    for index, block in enumerate(blocks):
        # the last block's weights are needed again at once by the backward pass: keep them
        last = index == len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard_after_forward and not last, **settings)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **settings)
    log.info("fsdp: %d blocks + root sharded over %d processes", len(blocks), mesh.size())
    return model


def replicate(model: nn.Module, *, device: torch.device) -> nn.Module:
    """Data parallel: a full copy per process, gradients averaged over processes (DDP); a
    single process trains the model unwrapped."""
    model.to(device)
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 does not wrap: the module itself is sharded)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds for parameters, gradients and optimizer state: each tensor's
    local part (a DTensor's shard), counted once (tied weights share one tensor)."""
    seen: set[tuple[int, int]] = set()

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        # by the elements' address, not the storage's: FSDP's sharded gradients are views of one buffer
        key = (local.data_ptr(), local.numel())
        if key in seen:
            return 0
        seen.add(key)
        return local.numel() * local.element_size()

    parameters = list(dict.fromkeys(model.parameters()))
    params = sum(local_bytes(p) for p in parameters)
    grads = sum(local_bytes(p.grad) for p in parameters if p.grad is not None)
    state = sum(
        local_bytes(value)
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
    return {"parameters": params, "gradients": grads, "optimizer": state}
