"""Device and precision: CUDA in half precision when there is a GPU, CPU in fp32 otherwise."""

from __future__ import annotations


def pick_device(device: str | None = None, precision: str | None = None) -> tuple[str, str]:
    """(device, precision): CUDA in fp16 when present, else CPU in fp32, unless told otherwise."""
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision is None:
        precision = "fp16" if str(device).startswith("cuda") else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    return str(device), precision


def _torch_dtype(precision: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
