"""Calibration, block by block (ALGORITHMS.md §5, §6): the tokens, the inputs of each transformer
block, the layers' input statistics H and the Fisher."""
