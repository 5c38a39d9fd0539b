"""Model FLOPs utilisation (MFU): achieved training FLOP/s over the device's peak dense FLOP/s.

    peak = run_peak_flops(cfg.train.peak_flops, device, amp_dtype)   # None on CPU / unknown GPUs
    row["mfu"] = mfu(tokens_per_s, flops_per_token, peak, world_size)

The training FLOPs per token are the trainer's `flops_per_token` (PaLM appendix B: 6 x active
non-embedding parameters, the untied head included, plus 12 x layers x heads x head_dim x seq_len
for attention's score and value products, counted in full although causal attention needs half,
as PaLM, nanoGPT and torchtitan count them; MoE layers count their shared experts and top_k
routed experts, an upper bound for MoE++/TC-MoE whose slots may be computation-free).

Peaks are dense (no 2:4 sparsity) tensor-core figures from the vendors' datasheets, per GPU. A
device missing from the table, or a CPU, gets no MFU rather than a guessed one; `train.peak_flops`
(FLOP/s per device) overrides the table, e.g. for a clock-limited or newer part.
"""

from __future__ import annotations

import re

import torch

__all__ = ["PEAK_FLOPS", "device_peak_flops", "mfu", "precision_key", "run_peak_flops"]

T = 1e12

# Names in torch.cuda.get_device_name(), matched case-insensitively as whole words ("a100" is not
# "RTX A1000", "h200" is not "GH200"; the first match wins, so "h100 pcie" comes before "h100")
# -> dense peak FLOP/s by compute dtype. "tf32": fp32 matmuls on tensor cores, which torch uses
# when torch.backends.cuda.matmul.allow_tf32 is set.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM bf16/fp16 1,979 TFLOPS and
    # tf32 989 with sparsity; PCIe 1,513 / 756; NVL 1,671 / 835 (dense: half). fp32 non-tensor.
    "h100 pcie": {"bf16": 756.5 * T, "fp16": 756.5 * T, "tf32": 378 * T, "fp32": 51.2 * T},
    "h100 nvl": {"bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60 * T},
    "h100": {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T},  # SXM5
    # GH200 (Grace Hopper superchip datasheet): the H100 SXM's tensor-core peaks.
    "gh200": {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T},
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 1,979 / 989 with sparsity,
    # NVL 1,671 / 835.
    "h200 nvl": {"bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60 * T},
    "h200": {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T},
    # NVIDIA HGX B200 spec (8 GPUs: fp16/bf16 36 PFLOPS, tf32 18 PFLOPS, with sparsity).
    "b200": {"bf16": 2250 * T, "fp16": 2250 * T, "tf32": 1125 * T, "fp32": 75 * T},
    # NVIDIA A100 datasheet: bf16/fp16 312, tf32 156, fp32 19.5 TFLOPS dense (SXM and PCIe).
    "a100": {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T},
    # NVIDIA L40S datasheet: bf16/fp16 362.05, tf32 183 dense (733 / 366 with sparsity), fp32 91.6.
    "l40s": {"bf16": 362.05 * T, "fp16": 362.05 * T, "tf32": 183 * T, "fp32": 91.6 * T},
    # NVIDIA L40 datasheet: bf16/fp16 181.05, tf32 90.5 dense (362.1 / 181 with sparsity), fp32 90.5.
    "l40": {"bf16": 181.05 * T, "fp16": 181.05 * T, "tf32": 90.5 * T, "fp32": 90.5 * T},
    # NVIDIA L4 datasheet: bf16/fp16 242 and tf32 120 with sparsity; fp32 30.3.
    "l4": {"bf16": 121 * T, "fp16": 121 * T, "tf32": 60 * T, "fp32": 30.3 * T},
    # A10G (AWS G5; no NVIDIA datasheet): bf16/fp16 70, tf32 35, fp32 35 TFLOPS as compared in
    # baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference.
    "a10g": {"bf16": 70 * T, "fp16": 70 * T, "tf32": 35 * T, "fp32": 35 * T},
    # NVIDIA A10 datasheet: bf16/fp16 125, tf32 62.5 dense; fp32 31.2.
    "a10": {"bf16": 125 * T, "fp16": 125 * T, "tf32": 62.5 * T, "fp32": 31.2 * T},
    # NVIDIA Ada GPU architecture whitepaper, RTX 4090: fp16/bf16 tensor with fp32 accumulate
    # (what PyTorch uses) 165.2 dense, tf32 82.6, fp32 82.6.
    "rtx 4090": {"bf16": 165.2 * T, "fp16": 165.2 * T, "tf32": 82.6 * T, "fp32": 82.6 * T},
    # NVIDIA V100 datasheet: fp16 tensor 125 (SXM2) / 112 (PCIe), fp32 15.7 / 14. No bf16 or tf32
    # tensor cores: bf16 autocast and fp32 matmuls run at the fp32 rate.
    "v100-pcie": {"bf16": 14 * T, "fp16": 112 * T, "tf32": 14 * T, "fp32": 14 * T},
    "v100": {"bf16": 15.7 * T, "fp16": 125 * T, "tf32": 15.7 * T, "fp32": 15.7 * T},
    # AMD Instinct MI300X datasheet: bf16/fp16 1,307.4 dense (2,614.9 with sparsity), tf32 653.7,
    # fp32 matrix 163.4.
    "mi300x": {"bf16": 1307.4 * T, "fp16": 1307.4 * T, "tf32": 653.7 * T, "fp32": 163.4 * T},
}


def precision_key(amp_dtype: torch.dtype | None) -> str:
    """The PEAK_FLOPS column of a run computing in `amp_dtype` (None: fp32, on tensor cores as
    tf32 when torch allows it)."""
    if amp_dtype == torch.bfloat16:
        return "bf16"
    if amp_dtype == torch.float16:
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def device_peak_flops(name: str, amp_dtype: torch.dtype | None) -> float | None:
    """Dense peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name) computing in
    `amp_dtype`, or None when the table does not know it."""
    lowered = name.lower()
    for key, peaks in PEAK_FLOPS.items():
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", lowered):
            return peaks[precision_key(amp_dtype)]
    return None


def run_peak_flops(override: float | None, device: torch.device,
                   amp_dtype: torch.dtype | None) -> float | None:
    """Peak FLOP/s per device for a run: `override` (train.peak_flops) when set, else the table's
    figure for this CUDA device, else None (a CPU or a GPU the table lacks: no MFU)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    return device_peak_flops(torch.cuda.get_device_name(device), amp_dtype)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None,
        n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: tokens_per_s (over all `n_devices`) x flops_per_token
    over n_devices x peak (per-device FLOP/s). None when the peak is unknown."""
    if peak is None or peak <= 0 or n_devices < 1:
        return None
    return tokens_per_s * flops_per_token / (peak * n_devices)
