"""Where a compress run computes, in what dtype, and where its activations live.

device  auto → cuda:LOCAL_RANK when a GPU is visible, else cpu;  cuda without one → error
dtype   of the blocks' forwards: fp32 unless asked (the decomposition is fp32 always), on every
        device, so the same command gives the same model wherever it runs
X       on the device, or a disk file when n·L·d values (×2: X_{b−1} and X_b) would take more
        than a quarter of the free memory
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def resolve_device(device: str | torch.device, world=None) -> torch.device:
    """``device`` checked against this machine; ValueError naming what to pass instead. A bare
    ``cuda`` is this process's GPU (LOCAL_RANK under torchrun)."""
    name = str(device).strip().lower()
    has_cuda = torch.cuda.is_available()
    if name == "auto":
        name = "cuda" if has_cuda else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ValueError(f"device={device!r} is not supported; allowed: auto, cpu, cuda, cuda:N")
    if not has_cuda:
        raise ValueError(
            f"device={device!r} but no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "pass device='cpu' (--device cpu) or 'auto'"
        )
    if name == "cuda":
        rank = world.rank if world is not None else 0
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        return torch.device("cuda", local)
    try:
        index = int(name.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(
            f"device={device!r} is not a device; allowed: auto, cpu, cuda, cuda:N"
        ) from None
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The blocks' dtype (see the module docstring)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; allowed: {', '.join(DTYPES)}")
        return dtype
    name = DTYPE_NAMES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable), or 8 GiB when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def free_memory(device: torch.device) -> int:
    """Bytes free where ``device``'s tensors live: the GPU's free memory, else the host's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def activation_offload(offload: bool | None, out: Path, calibration, width: int) -> Path | None:
    """The folder for X's disk files, or None to keep X in memory (see the module docstring);
    ``width``: values per token held at once (2·d for X_{b−1} and X_b; (N + 2)·d while the Fisher
    pass keeps every block's input)."""
    if calibration is None or offload is False:
        return None
    folder = out / ".activations"
    return (
        folder
        if offload
        else spill_folder(calibration.blocks * calibration.seq_len * width, folder)
    )


def spill_folder(values: int, folder: Path) -> Path | None:
    """``folder`` when ``values`` float32 activations would take over a quarter of the free
    memory (they go to disk files there), else None (they stay in memory)."""
    return folder if values * 4 > available_memory() // 4 else None
