"""Calibration block by block: the inputs of the first transformer block, captured once, pushed
through the blocks one at a time (ALGORITHMS.md §6)."""

from lorq.calibrate.blocks import BlockInputs, capture_inputs, run_block

__all__ = ["BlockInputs", "capture_inputs", "run_block"]
