"""Recovery (ALGORITHMS.md §9): train what lorq stores toward the original model's outputs.

block-wise:  min_θ ‖ f̂_b(X̂; θ) − f_b(X) ‖²   per block, inside the compress job (``block``)
"""
