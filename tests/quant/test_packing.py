"""Oracle: unpack(pack(codes)) == codes for every width, value and length; byte counts exact."""

import pytest
import torch

from lorq.quant.packing import pack, packed_nbytes, unpack, unpack_lookup


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", [*range(1, 26), 63, 64, 65, 1000, 4099])
def test_round_trip_every_value(bits, length):
    g = torch.Generator().manual_seed(length * 10 + bits)
    codes = torch.randint(0, 2**bits, (length,), generator=g, dtype=torch.uint8)
    codes[: min(length, 2**bits)] = torch.arange(min(length, 2**bits), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(length, bits)
    assert torch.equal(unpack(packed, bits, length), codes)


@pytest.mark.parametrize(("bits", "expected"), [(2, 250), (3, 375), (4, 500), (8, 1000)])
def test_packed_size_is_bits_over_eight(bits, expected):
    assert packed_nbytes(1000, bits) == expected


def test_three_bit_layout_is_big_endian_24_bit_words():
    codes = torch.arange(8, dtype=torch.uint8)  # 000 001 010 011 100 101 110 111
    word = int("000001010011100101110111", 2)
    assert pack(codes, 3).tolist() == [word >> 16, (word >> 8) & 255, word & 255]


def test_four_bit_layout_is_high_nibble_first():
    assert pack(torch.tensor([7, 1, 15], dtype=torch.uint8), 4).tolist() == [0x71, 0xF0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lookup_equals_indexing(bits):
    codes = torch.randint(0, 2**bits, (1234,), dtype=torch.uint8)
    table = torch.randn(2**bits)
    packed = pack(codes, bits)
    assert torch.equal(unpack_lookup(packed, bits, 1234, table), table[codes.long()])


def test_unsupported_width():
    with pytest.raises(ValueError, match="bits=5"):
        pack(torch.zeros(4, dtype=torch.uint8), 5)
