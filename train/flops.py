"""Model FLOPs per token for MFU, and the peak they are measured against.

MFU = flops_per_token · tokens/s (all ranks) / (peak per device · devices). Model FLOPs, not
hardware FLOPs: recomputation under activation checkpointing is not counted (that would be HFU).

Per token, training (forward + backward = 3 × forward):

    flops_per_token = 6 · N + 3 · Σ_layers mixing_forward

- N: parameters except the input embedding (the LM head counts even when tied, since it is a
  matmul per token). Each weight is used once per token: 2 FLOPs forward, 4 backward (Kaplan et
  al. 2020, the 6N rule). Norm scales, biases and decays are counted the same way; they are a
  fraction of a percent.
- mixing_forward: the token-mixing work that has no weight of its own, in its recurrent form
  (what the state costs per token, whatever the kernel's chunking). Each family declares its
  formula in its folder (`FAMILY.mixing_flops` in recur/modeling/<family>/__init__.py); a family
  without one counts 6N only (said in the log).
"""
from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (datasheets; torchtitan tools/utils.py get_peak_flops uses the same).
GPU_PEAK_BF16 = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2.25e15), ("B100", 1.75e15), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12), ("V100", 125e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


def numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions parameters; ds_numel is the full size


def non_embedding_params(model) -> int:
    embedding = model.get_input_embeddings().weight
    total = sum(numel(p) for p in model.parameters() if p is not embedding)
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the head still multiplies every token
        total += numel(embedding)
    return total


def mixing_forward_flops(config, seq_len: int) -> tuple[float, str]:
    """Forward FLOPs per token of token mixing summed over layers, and the formula used."""
    from recur.modeling import FAMILIES

    family = FAMILIES.get(config.model_type)
    if family is None or family.mixing_flops is None:
        return 0.0, "6N (token mixing not counted for this family)"
    return family.mixing_flops(config, seq_len)


def flops_per_token(model, seq_len: int) -> tuple[float, str]:
    mixing, formula = mixing_forward_flops(model.config, seq_len)
    return 6 * non_embedding_params(model) + 3 * mixing, formula


def gpu_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The datasheet dense bf16 peak for a known GPU; otherwise (or in float32) a measured matmul."""
    name = torch.cuda.get_device_name(device)
    if dtype == torch.bfloat16:
        for key, peak in GPU_PEAK_BF16:
            if key.lower() in name.lower():
                return peak, f"{name} bf16 datasheet"
    return measured_matmul_peak(device, dtype), f"{name} measured {str(dtype).removeprefix('torch.')} matmul"


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                         seconds: float = 0.5) -> float:
    """FLOP/s of the best n×n matmul this process gets (its threads, its share of the machine)."""
    n = n or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        a @ b
        sync()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * n**3 / best


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if device.type == "cuda":
        return gpu_peak(device, dtype)
    threads = torch.get_num_threads()
    return measured_matmul_peak(device, torch.float32), f"CPU measured float32 matmul, {threads} thread(s) per process"
