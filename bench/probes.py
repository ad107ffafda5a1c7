"""The KL probes' carry through a block (``lorq.calibrate.sensitivity``): every probe's S
sequences run one at a time (``run_block`` per probe, lorq before batching) against the probes
of one sequence run as one batch (``carry_streams``), on the built-in SmolLM2's first block with
its calibration inputs; the outputs compared, seconds of each (one process, alternating).

    python bench/probes.py                 # 32 probes, S = 4, 128 tokens
    python bench/probes.py --probes 64 --repeats 5
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    import lorq
    from lorq.calibrate.blocks import BlockInputs, capture_inputs, run_block
    from lorq.calibrate.sensitivity import SENSITIVITY_SEQUENCES, carry_streams
    from lorq.calibrate.tokens import Calibration
    from lorq.model.skeleton import decoder_blocks

    loaded = lorq.io.models.load_model("smollm2", packed=True)
    tokens = Calibration().load(loaded.tokenizer)[:SENSITIVITY_SEQUENCES]
    block = decoder_blocks(loaded.model).modules[0]
    inputs = capture_inputs(loaded.model, block, tokens, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    streams = [
        inputs.hidden + 0.01 * torch.randn(inputs.hidden.shape, generator=g)
        for _ in range(args.probes)
    ]
    seconds = {"one at a time": [], "batched": []}
    for _ in range(args.repeats):
        alone = [s.clone() for s in streams]
        start = time.perf_counter()
        for state in alone:
            run_block(block, BlockInputs(state, inputs.kwargs), state)
        seconds["one at a time"].append(time.perf_counter() - start)
        batched = [s.clone() for s in streams]
        start = time.perf_counter()
        carry_streams(block, batched, inputs.kwargs)
        seconds["batched"].append(time.perf_counter() - start)
    gap = max(float((a - b).abs().max()) for a, b in zip(alone, batched, strict=True))
    best = {k: min(v) for k, v in seconds.items()}
    print("| probes | S | tokens | one at a time s | batched s | speed-up | max |Δ| |")
    print("|---|---|---|---|---|---|---|")
    alone_s, batched_s = best["one at a time"], best["batched"]
    print(f"| {args.probes} | {len(tokens)} | {tokens.shape[1]} | {alone_s:.3f} | "
          f"{batched_s:.3f} | {alone_s / batched_s:.2f}× | {gap:.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
