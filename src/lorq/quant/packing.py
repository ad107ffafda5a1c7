"""Bit packing of k-bit codes, k ∈ {2, 3, 4, 8}, into uint8 storage.

A *word* of ``CODES_PER_WORD[k]`` codes fills ``BYTES_PER_WORD[k]`` bytes exactly, first code in
the most significant bits (4-bit: high nibble first, as bitsandbytes; 3-bit: 8 codes in 3 bytes):

    k = 8: 1 code → 1 byte     k = 4: 2 codes → 1 byte
    k = 2: 4 codes → 1 byte    k = 3: 8 codes → 3 bytes (big-endian 24-bit word)

A length that is not a multiple of the word is padded with zero codes; ``unpack`` trims it, so
``packed_nbytes(n, k) = ceil(n / codes_per_word) · bytes_per_word``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CODES_PER_WORD = {2: 4, 3: 8, 4: 2, 8: 1}
BYTES_PER_WORD = {2: 1, 3: 3, 4: 1, 8: 1}


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of width ``bits`` occupy once packed."""
    words = -(-numel // CODES_PER_WORD[bits])
    return words * BYTES_PER_WORD[bits]


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    per = CODES_PER_WORD[bits]
    return torch.arange(per - 1, -1, -1, device=device, dtype=torch.int32) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes (< 2^bits) into a 1-D uint8 tensor."""
    if bits not in CODES_PER_WORD:
        raise ValueError(f"bits={bits!r} is not supported for packing; allowed: 2, 3, 4, 8")
    codes = codes.reshape(-1)
    if bits == 8:
        return codes.to(torch.uint8).clone()
    per, nbytes = CODES_PER_WORD[bits], BYTES_PER_WORD[bits]
    pad = (-codes.numel()) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    words = (codes.view(-1, per).to(torch.int32) << _shifts(bits, codes.device)).sum(
        1, dtype=torch.int32
    )
    if nbytes == 1:
        return words.to(torch.uint8)
    byte_shifts = torch.arange(nbytes - 1, -1, -1, device=codes.device, dtype=torch.int32) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The packed words as int32, shape (words,)."""
    nbytes = BYTES_PER_WORD[bits]
    if nbytes == 1:
        return packed.to(torch.int32)
    byte_shifts = torch.arange(nbytes - 1, -1, -1, device=packed.device, dtype=torch.int32) * 8
    return (packed.view(-1, nbytes).to(torch.int32) << byte_shifts).sum(1, dtype=torch.int32)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a 1-D uint8 tensor."""
    if bits == 8:
        return packed[:numel].clone()
    mask = (1 << bits) - 1
    codes = (_words(packed, bits)[:, None] >> _shifts(bits, packed.device)) & mask
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _byte_table(table: torch.Tensor, bits: int) -> torch.Tensor:
    """(256, codes_per_byte) lookup: every byte value → the table entries of its codes."""
    byte = torch.arange(256, device=table.device, dtype=torch.int32)
    codes = (byte[:, None] >> _shifts(bits, table.device)) & ((1 << bits) - 1)
    return table[codes.long()]


def unpack_lookup(packed: torch.Tensor, bits: int, numel: int, table: torch.Tensor) -> torch.Tensor:
    """``table[unpack(packed)]`` without materialising the codes: a 1-D float32 tensor of ``numel``.

    For byte-aligned widths (2, 4, 8) one gather per packed byte yields all of its codes at once
    (for 4 bits the two float32 values of a byte travel as one int64).
    """
    if bits == 3:
        return table.index_select(0, unpack(packed, bits, numel).int())
    byte_table = _byte_table(table.float(), bits)
    index = packed.int()
    if bits == 4:
        values = byte_table.view(torch.int64).reshape(-1).index_select(0, index).view(torch.float32)
    else:
        values = byte_table.index_select(0, index)
    return values.reshape(-1)[:numel]


def pack_blocks(
    blocks: torch.Tensor,
    bits: int,
    encode: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk_values: int = 1 << 20,
) -> torch.Tensor:
    """Encode and pack a (num_blocks, block_size) tensor chunk by chunk.

    ``encode(values, rows)`` gets float32 values of the blocks ``rows`` and returns their uint8
    codes of the same shape; only one chunk of codes is alive at a time, which bounds temporary
    memory to a few × ``chunk_values`` whatever the size of the matrix.
    """
    num_blocks, block = blocks.shape
    step = max(1, chunk_values // block)
    parts = []
    for start in range(0, num_blocks, step):
        rows = slice(start, min(start + step, num_blocks))
        parts.append(pack(encode(blocks[rows].float(), rows).reshape(-1), bits))
    return torch.cat(parts)


CHUNK_VALUES = 1 << 18  # values decoded at once: cache-sized, bounds temporary memory


def decode_packed(
    codes: torch.Tensor,
    bits: int,
    shape: tuple[int, int],
    block_size: int,
    table: torch.Tensor,
    scale: Callable[[torch.Tensor, slice, torch.Tensor], None],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decode packed codes of a scalar grid into a dense (out × in) tensor, chunk by chunk.

    ``table[code]`` gives each code's grid value; ``scale(values, blocks, out)`` writes the
    decoded values of the blocks ``blocks`` (values and out: (len(blocks) × block_size)) into
    ``out`` — the format's per-block scale (and zero or min).
    """
    numel = shape[0] * shape[1]
    num_blocks = numel // block_size
    out = torch.empty(shape, dtype=dtype, device=codes.device).view(-1, block_size)
    step = max(1, CHUNK_VALUES // block_size)
    for start in range(0, num_blocks, step):
        stop = min(start + step, num_blocks)
        lo, hi = start * block_size * bits // 8, -(-stop * block_size * bits // 8)
        values = unpack_lookup(codes[lo:hi], bits, (stop - start) * block_size, table)
        scale(values.view(-1, block_size), slice(start, stop), out[start:stop])
    return out.view(shape)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 (n, 1) → the two little-endian bytes of its fp16 value (n, 2), as GGUF blocks
    store d and mins."""
    return x.to(torch.float16).view(torch.uint8)


def fp16_at(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 value at byte ``at`` of every block row of ``raw`` (n, bytes), as float32 (n, 1)."""
    return raw[:, at : at + 2].contiguous().view(torch.float16).float()
