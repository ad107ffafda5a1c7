"""Peak memory and step time of LoRA training on SmolLM2 under glibc mmap thresholds
(``lorq finetune --low-memory``, ``lorq/runtime.py``).

SmolLM2 compressed by plain nf3 (r = 16) and saved once; then, per threshold, a fresh process
loads it, enables activation checkpointing and runs four AdamW steps on 4 × 128 random tokens,
printing each step's time and the process's peak RSS (``ru_maxrss``).

    python bench/malloc.py          # thresholds: glibc's dynamic one, 4 MiB, 1 MiB, 64 KiB
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THRESHOLDS = {"glibc's dynamic": 0, "4 MiB": 1 << 22, "1 MiB": 1 << 20, "64 KiB": 1 << 16}


def child(path: str, threshold: int) -> None:
    from lorq.util.runtime import fixed_mmap_threshold

    if threshold:
        fixed_mmap_threshold(threshold)
    import torch

    import lorq
    from lorq.train.trainer import set_trainable

    model = lorq.load(path)
    set_trainable(model)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(
        0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0)
    )
    times = []
    for _ in range(4):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(f"{peak:.0f} MB | {min(times):.1f}–{max(times):.1f} s")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], int(sys.argv[3]))
    import lorq
    from lorq.io.models import load_model

    with tempfile.TemporaryDirectory(prefix="lorq-bench-malloc-") as tmp:
        loaded = load_model("smollm2")
        result = lorq.compress(loaded.model, lorq.CompressConfig(method="plain", quant="nf3"))
        lorq.save(result.model, Path(tmp) / "m", loaded.tokenizer)
        del loaded, result
        print("| mmap threshold | peak RSS | time per step |\n|---|---|---|")
        for label, threshold in THRESHOLDS.items():
            command = [sys.executable, __file__, "--child", str(Path(tmp) / "m"), str(threshold)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            print(f"| {label} | {out.strip().splitlines()[-1]} |", flush=True)


if __name__ == "__main__":
    main()
