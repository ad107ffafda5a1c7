"""llama.cpp's K-quants Q2_K … Q6_K (Q2_K, Q3_K: their encoders' docstrings).

Q4_K / Q5_K: super-blocks of 256 weights (8 sub-blocks of 32), each sub-block j with a 6-bit
scale s_j and a 6-bit min m_j under the super-block's fp16 d and dmin (docs/algorithms.md §1.8,
``ggml-common.h``):

    w = d·s_j·q − dmin·m_j          q ∈ [0, 15] (Q4_K) or [0, 31] (Q5_K)

    Q4_K  144 bytes: d, dmin, scales[12], qs[128]            4.5 bits/weight
    Q5_K  176 bytes: d, dmin, scales[12], qh[32], qs[128]    5.5 bits/weight

scales[12] packs the 6-bit s_j, m_j (``get_scale_min_k4``); qs holds, for each 64 weights, weight
l in the low nibble of byte l and weight l + 32 in the high one; Q5_K's fifth bits are in qh
(bit 2c of byte l: weight 64c + l; bit 2c + 1: weight 64c + 32 + l).

Encoding is llama.cpp's reference (``quantize_row_q{4,5}_K_ref``, what ``llama-quantize`` writes
without an importance matrix): per sub-block, ``make_qkx2_quants`` — weights w = rms(x) + |x|, a
first fit over [min(x, 0), max(x)], then 21 (Q4_K) or 16 (Q5_K) trial scales (nmax + rmin +
0.1·k)/(max − min), each refit by weighted least squares for scale and min, the lowest weighted
squared error kept — then s_j, m_j rounded to 6 bits of max_j and the codes re-rounded with the
stored scales. Sums run in float32 in weight order, as llama.cpp adds them.

Q6_K (210 bytes per 256: ql[128], qh[64], int8 scales[16], d): 16 sub-blocks of 16, symmetric,
w = d·sc_j·(q − 32), q ∈ [0, 63]. ``make_qx_quants`` per sub-block (weights x², 1/scale ∈
−(32 + 0.1·k)/x_max for k = −9 … 9, the best weighted fit kept), sc_j = min(127, round(−128 ·
scale_j / scale_max)), d = fp16(−scale_max / 128), then the codes re-rounded with d·sc_j.
"""

from __future__ import annotations

import numpy as np
import torch

from lorq.quant.packing import fp16_at, fp16_bytes

SUPER = 256
SUB = 32
F32 = np.float32


def crumbs(codes: torch.Tensor) -> torch.Tensor:
    """2-bit values (n, 256) → (n, 64) bytes: for each 128, byte l holds values l, l + 32,
    l + 64, l + 96 in bits 0–1, 2–3, 4–5, 6–7 (Q2_K's and Q3_K's qs, Q6_K's qh)."""
    quarters = (codes & 3).reshape(codes.shape[0], 2, 4, 32).to(torch.uint8)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=codes.device)
    return (quarters << shifts[None, None, :, None]).sum(2, dtype=torch.uint8).reshape(-1, 64)


def from_crumbs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`crumbs`: (n, 64) bytes → (n, 256) int32 values 0–3."""
    bytes_ = packed.reshape(-1, 2, 1, 32).int()
    shifts = torch.tensor([0, 2, 4, 6], device=packed.device)[None, None, :, None]
    return ((bytes_ >> shifts) & 3).reshape(-1, SUPER)


def _sequential(terms: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension in float32, one term after another (llama.cpp's order)."""
    total = terms[..., 0].clone()
    for j in range(1, terms.shape[-1]):
        total = total + terms[..., j]
    return total


def _codes(x: torch.Tensor, low: torch.Tensor, iscale: torch.Tensor, nmax: int) -> torch.Tensor:
    """nearest_int(iscale·(x − min)) clamped to [0, nmax] (round half to even, as llama.cpp)."""
    return torch.round(iscale[:, None] * (x - low[:, None])).clamp(0, nmax)


def _error(x, w, codes, scale, low, mad: bool = False) -> torch.Tensor:
    diff = scale[:, None] * codes + low[:, None] - x
    return _sequential(w * (diff.abs() if mad else diff * diff))


def _refit(x, w, codes, sum_w, sum_x):
    """Weighted least squares of x ≈ scale·codes + min (min ≤ 0): (valid, scale, min)."""
    wl = w * codes
    sum_l, sum_l2, sum_xl = _sequential(wl), _sequential(wl * codes), _sequential(wl * x)
    det = sum_w * sum_l2 - sum_l * sum_l
    scale = (sum_w * sum_xl - sum_x * sum_l) / det
    low = (sum_l2 * sum_x - sum_l * sum_xl) / det
    positive = low > 0
    scale = torch.where(positive, sum_xl / sum_l2, scale)
    low = torch.where(positive, torch.zeros_like(low), low)
    return det > 0, scale, low


def make_qkx2_quants(x, w, nmax: int, rmin: float, nstep: int, mad: bool = False):
    """llama.cpp's make_qkx2_quants on rows of ``x`` (m, n) with weights ``w`` (error: squared,
    or absolute with ``mad``): (scale, −min, codes)."""
    low = torch.minimum(x.amin(1), torch.zeros_like(x[:, 0]))
    high = x.amax(1)
    sum_w, sum_x = _sequential(w), _sequential(w * x)
    span = high - low
    iscale = nmax / span
    scale = 1 / iscale
    codes = _codes(x, low, iscale, nmax)
    best = _error(x, w, codes, scale, low, mad)
    for step in range(nstep + 1):
        trial = F32(F32(rmin) + F32(0.1) * F32(step)) + F32(nmax)
        aux = _codes(x, low, torch.tensor(trial) / (high - low), nmax)  # min as refitted
        valid, this_scale, this_low = _refit(x, w, aux, sum_w, sum_x)
        error = _error(x, w, aux, this_scale, this_low, mad)
        better = valid & (error < best)
        codes = torch.where(better[:, None], aux, codes)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_low, low)
    flat = high == low
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat[:, None], torch.zeros_like(codes), codes)
    return scale, -low, codes


def _six_bits(values: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """uint8_t(nearest_int(63/largest · v)) capped at 63, as llama.cpp stores s_j and m_j."""
    inverse = torch.where(largest > 0, 63 / largest, torch.zeros_like(largest))
    rounded = torch.round(inverse[:, None] * values).to(torch.int64) & 0xFF
    return rounded.clamp(max=63).to(torch.uint8)


def pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(n, 8) 6-bit scales and mins → llama.cpp's 12 bytes (get_scale_min_k4's layout)."""
    low = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    high = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([low, mid, high], 1)


def unpack_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_scales`: (n, 12) → (s, m), each (n, 8) float32."""
    low, mid, high = packed[:, :4], packed[:, 4:8], packed[:, 8:12]
    ls = torch.cat([low & 63, (high & 0xF) | ((low >> 6) << 4)], 1)
    lm = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], 1)
    return ls.float(), lm.float()


def _weights(x: torch.Tensor) -> torch.Tensor:
    """rms(x) + |x| of every sub-block (m, 32)."""
    rms = torch.sqrt(_sequential(x * x) / float(SUB))
    return rms[:, None] + x.abs()


def _encode_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int, w: torch.Tensor | None = None):
    """Scale bytes (n, 16: d, dmin, scales[12]) and codes (n, 256) of super-blocks ``x``
    (sub-block fits weighted by rms + |x|, or by the importance weights ``w``)."""
    n = x.shape[0]
    sub = x.reshape(-1, SUB)
    weights = _weights(sub) if w is None else w.reshape(-1, SUB)
    scale, low, codes = make_qkx2_quants(sub, weights, nmax, rmin, nstep)
    scale, low, codes = scale.view(n, 8), low.view(n, 8), codes.view(n, 8, SUB)
    max_scale = torch.clamp(scale.amax(1), min=0)
    max_min = torch.clamp(low.amax(1), min=0)
    ls, lm = _six_bits(scale, max_scale), _six_bits(low, max_min)
    d = (max_scale / 63)[:, None].to(torch.float16).float()
    dmin = (max_min / 63)[:, None].to(torch.float16).float()
    step = d * ls.float()
    shifted = (x.view(n, 8, SUB) + (dmin * lm.float())[..., None]) / step[..., None]
    requantized = torch.round(shifted).clamp(0, nmax)
    codes = torch.where((step != 0)[..., None], requantized, codes).reshape(n, SUPER)
    head = torch.cat([fp16_bytes(d), fp16_bytes(dmin), pack_scales(ls, lm)], 1)
    return head, codes.to(torch.uint8)


def _low_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n, 256) codes → (n, 128) bytes: per 64 weights, weight l low, weight l + 32 high."""
    c = codes.view(-1, 4, 2, SUB) & 0xF
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)


def _from_nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.view(-1, 4, SUB)
    return torch.stack([q & 0xF, q >> 4], 2).reshape(-1, SUPER)


def _fifth_bits(codes: torch.Tensor) -> torch.Tensor:
    """Q5_K's qh (n, 32) of codes (n, 256): bit 2c + h of byte l = fifth bit of 64c + 32h + l."""
    fifth = (codes.view(-1, 4, 2, SUB) >> 4) & 1  # (n, chunk c, half h, l) → bit 2c + h
    shifts = (2 * torch.arange(4)[:, None] + torch.arange(2)[None, :]).to(torch.uint8)
    return (fifth << shifts[None, :, :, None].to(codes.device)).sum((1, 2), dtype=torch.uint8)


def encode_q4_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    head, codes = _encode_k(x, 15, -1.0, 20, w)
    return put_q4_k(head, codes)


def put_q4_k(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``raw``'s scales (its first 16 bytes) with ``codes`` (n, 256) as the weights' codes."""
    return torch.cat([raw[:, :16], _low_nibbles(codes)], 1)


def encode_q5_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    head, codes = _encode_k(x, 31, -0.5, 15, w)
    return put_q5_k(head, codes)


def put_q5_k(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.cat([raw[:, :16], _fifth_bits(codes), _low_nibbles(codes)], 1)


def _decode_k(raw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    d, dmin = fp16_at(raw, 0), fp16_at(raw, 2)
    ls, lm = unpack_scales(raw[:, 4:16])
    step = (d * ls)[..., None]
    return (step * q.view(-1, 8, SUB).float() - (dmin * lm)[..., None]).reshape(-1, SUPER)


def decode_q4_k(raw: torch.Tensor) -> torch.Tensor:
    return _decode_k(raw, _from_nibbles(raw[:, 16:144]))


def decode_q5_k(raw: torch.Tensor) -> torch.Tensor:
    qh = raw[:, 16:48]
    shifts = (2 * torch.arange(4)[:, None] + torch.arange(2)[None, :]).to(raw.device)
    fifth = ((qh[:, None, None, :].int() >> shifts[None, :, :, None]) & 1).reshape(-1, SUPER)
    return _decode_k(raw, _from_nibbles(raw[:, 48:176]) | (fifth << 4).to(torch.uint8))


def make_qx_quants(
    x: torch.Tensor, nmax: int = 32, w: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qx_quants (rmse_type 1: weights x², or the importance weights ``w`` of
    its imatrix path; 18 trial scales) on rows of ``x`` (m, n): (scale, signed codes in
    [−nmax, nmax − 1])."""
    largest = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
    w = x * x if w is None else w

    def trial(iscale: torch.Tensor):
        codes = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return codes, _sequential(w * x * codes), _sequential(w * codes * codes)

    codes, sumlx, suml2 = trial(-nmax / largest)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        numerator = torch.tensor(F32(nmax) + F32(0.1) * F32(step))
        aux, sumlx, suml2 = trial(-numerator / largest)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = torch.where(better[:, None], aux, codes)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    tiny = x.abs().amax(1) < 1e-15
    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    return scale, torch.where(tiny[:, None], torch.full_like(codes, -nmax), codes)


def encode_q6_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Q6_K (210 bytes per 256): ql[128], qh[64], int8 scales[16] of 16-value sub-blocks, d."""
    n = x.shape[0]
    scale, codes = make_qx_quants(x.reshape(-1, 16), 32, None if w is None else w.reshape(-1, 16))
    scale, codes = scale.view(n, 16), codes.view(n, 16, 16)
    pick = scale.abs().argmax(1, keepdim=True)
    max_scale = scale.gather(1, pick)
    zero = scale.abs().amax(1, keepdim=True) < 1e-15
    iscale = -128 / max_scale
    d = (1 / iscale).to(torch.float16).float()
    sc = torch.round(iscale * scale).clamp(max=127)
    step = (d * sc)[..., None]
    requantized = torch.round(x.view(n, 16, 16) / step).clamp(-32, 31)
    codes = torch.where(step != 0, requantized, codes) + 32
    d = torch.where(zero, torch.zeros_like(d), d)
    scales = torch.where(zero, torch.zeros_like(sc), sc).to(torch.int8).view(torch.uint8)
    body = torch.cat([_six_bit_codes(codes.reshape(n, SUPER).to(torch.uint8)), scales], 1)
    return torch.cat([torch.where(zero, torch.zeros_like(body), body), fp16_bytes(d)], 1)


def _six_bit_codes(codes: torch.Tensor) -> torch.Tensor:
    """Q6_K's ql[128] and qh[64] of codes (n, 256) in [0, 63]."""
    quarters = codes.reshape(-1, 2, 4, 32)  # per 128: quarters of 32
    low = quarters & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    return torch.cat([ql.reshape(-1, 128), crumbs(codes >> 4)], 1)


def put_q6_k(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``raw``'s scales and d (bytes 192–209) with ``codes`` (n, 256) as the weights' codes."""
    return torch.cat([_six_bit_codes(codes), raw[:, 192:]], 1)


def decode_q6_k(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    ql = raw[:, :128].reshape(n, 2, 64)
    low = torch.stack(
        [ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], 2
    ).reshape(n, SUPER)
    high = from_crumbs(raw[:, 128:192])
    q = (low.int() | (high << 4)).reshape(n, 16, 16).float() - 32
    sc = raw[:, 192:208].contiguous().view(torch.int8).float()
    d = fp16_at(raw, 208)
    return ((d * sc)[..., None] * q).reshape(n, SUPER)


def _four_bits(values: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """nearest_int(15/largest · v) as llama.cpp stores Q2_K's scales and mins (0 if largest ≤ 0)."""
    inverse = torch.where(largest > 0, 15 / largest, torch.zeros_like(largest))
    return (torch.round(inverse[:, None] * values).to(torch.int64) & 0xFF).to(torch.uint8)


def encode_q2_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Q2_K (84 bytes per 256): scales[16] (scale low nibble, min high), qs[64], d, dmin; 16
    sub-blocks of 16, w = d·s_j·q − dmin·m_j, q ∈ [0, 3]; make_qkx2_quants with weights |x|,
    absolute error, 16 trials from nmax − 0.5."""
    n = x.shape[0]
    sub = x.reshape(-1, 16)
    weights = sub.abs() if w is None else w.reshape(-1, 16)
    scale, low, codes = make_qkx2_quants(sub, weights, 3, -0.5, 15, mad=True)
    scale, low, codes = scale.view(n, 16), low.view(n, 16), codes.view(n, 16, 16)
    max_scale = torch.clamp(scale.amax(1), min=0)
    max_min = torch.clamp(low.amax(1), min=0)
    ls, lm = _four_bits(scale, max_scale), _four_bits(low, max_min)
    packed = ls | (lm << 4)
    d = (max_scale / 15)[:, None].to(torch.float16).float()
    dmin = (max_min / 15)[:, None].to(torch.float16).float()
    step = d * (packed & 0xF).float()
    shifted = (x.view(n, 16, 16) + (dmin * (packed >> 4).float())[..., None]) / step[..., None]
    codes = torch.where((step != 0)[..., None], torch.round(shifted).clamp(0, 3), codes)
    zeros = torch.zeros(n, 64, dtype=torch.uint8, device=x.device)
    head = torch.cat([packed, zeros, fp16_bytes(d), fp16_bytes(dmin)], 1)
    return put_q2_k(head, codes.reshape(n, SUPER).to(torch.uint8))


def put_q2_k(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``raw``'s scales (bytes 0–15) and d, dmin (80–83) with ``codes`` (n, 256)."""
    return torch.cat([raw[:, :16], crumbs(codes), raw[:, 80:]], 1)


def decode_q2_k(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    packed = raw[:, :16]
    q = from_crumbs(raw[:, 16:80]).reshape(n, 16, 16).float()
    d, dmin = fp16_at(raw, 80), fp16_at(raw, 82)
    step = d * (packed & 0xF).float()
    return (step[..., None] * q - (dmin * (packed >> 4).float())[..., None]).reshape(n, SUPER)


def make_q3_quants(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_q3_quants with do_rmse on rows of ``x`` (m, 16): a first rounding at
    −nmax/x_max, then five passes that move one code at a time to the value the least-squares
    scale of the others wants, kept when the weighted fit (weights x²) improves. A pass that
    changes nothing leaves the state as it was, so every row runs all five.
    Returns (scale, codes + nmax)."""
    largest = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
    w = x * x
    codes = torch.round((-nmax / largest)[:, None] * x).clamp(-nmax, nmax - 1)
    sumlx, suml2 = _sequential(w * x * codes), _sequential(w * codes * codes)
    for _ in range(5):
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], codes[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = torch.round(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            slx, sl2 = slx + wi * xi * new, sl2 + wi * new * new
            better = (sumlx - wi * xi * li > 0) & (new != li) & (sl2 > 0)
            better &= slx * slx * suml2 > sumlx * sumlx * sl2
            codes[:, i] = torch.where(better, new, li)
            sumlx, suml2 = torch.where(better, slx, sumlx), torch.where(better, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    tiny = x.abs().amax(1) < 1e-15
    codes = torch.where(tiny[:, None], torch.full_like(codes, -nmax), codes)
    return torch.where(tiny, torch.zeros_like(scale), scale), codes + nmax


def encode_q3_k(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Q3_K (110 bytes per 256): hmask[32], qs[64], 6-bit signed scales[12], d; 16 sub-blocks
    of 16, w = d·sc_j·(q − 4), q ∈ [0, 7] (two low bits in qs, the third in hmask). With
    importance weights ``w``, llama.cpp's imatrix path: make_qx_quants instead of
    make_q3_quants."""
    n = x.shape[0]
    if w is None:
        scale, codes = make_q3_quants(x.reshape(-1, 16))
    else:
        scale, codes = make_qx_quants(x.reshape(-1, 16), 4, w.reshape(-1, 16))
        codes = codes + 4
    scale, codes = scale.view(n, 16), codes.view(n, 16, 16)
    max_scale = scale.gather(1, scale.abs().argmax(1, keepdim=True))
    iscale = torch.where(max_scale != 0, -32 / max_scale, torch.zeros_like(max_scale))
    rounded = torch.round(iscale * scale).to(torch.int64)
    signed = ((rounded + 128) % 256 - 128).clamp(-32, 31)  # int8_t, then clamped
    six = torch.where(max_scale != 0, signed + 32, torch.zeros_like(signed)).to(torch.uint8)
    d = torch.where(max_scale != 0, 1 / iscale, torch.zeros_like(iscale)).to(torch.float16)
    step = (d.float() * (six.float() - 32))[..., None]
    step = torch.where((max_scale != 0)[..., None], step, torch.zeros_like(step))
    requantized = torch.round(x.view(n, 16, 16) / step).clamp(-4, 3) + 4
    codes = torch.where(step != 0, requantized, codes).reshape(n, SUPER).to(torch.uint8)
    scales = torch.cat(
        [
            (six[:, :8] & 0xF) | ((six[:, 8:] & 0xF) << 4),
            (
                (six >> 4).view(n, 4, 4)
                << (2 * torch.arange(4, device=x.device)).to(torch.uint8)[None, :, None]
            ).sum(1, dtype=torch.uint8),
        ],
        1,
    )
    zeros = torch.zeros_like(codes[:, :96])
    head = torch.cat([zeros, scales, d.view(torch.uint8).reshape(n, 2)], 1)
    return put_q3_k(head, codes)


def put_q3_k(raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``raw``'s scales and d (bytes 96–109) with ``codes`` (n, 256) in [0, 7]: hmask bit
    j // 32 of byte j % 32 holds code j's third bit, qs its two low bits."""
    high = codes.reshape(-1, 8, 32) >> 2
    bits = torch.arange(8, dtype=torch.uint8, device=codes.device)[None, :, None]
    hmask = (high << bits).sum(1, dtype=torch.uint8)
    return torch.cat([hmask, crumbs(codes), raw[:, 96:]], 1)


def decode_q3_k(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    hmask, packed = raw[:, :32], raw[:, 96:108]
    low = from_crumbs(raw[:, 32:96]).reshape(n, 8, 32)
    bits = torch.arange(8, device=raw.device)[None, :, None]
    high = (hmask[:, None, :].int() >> bits) & 1
    q = (low | (high << 2)).reshape(n, 16, 16).float() - 4
    nibbles = torch.cat([packed[:, :8] & 0xF, packed[:, :8] >> 4], 1).int()
    tops = (packed[:, 8:12, None].int() >> (2 * torch.arange(4, device=raw.device))) & 3
    sc = (nibbles | (tops.transpose(1, 2).reshape(n, 16) << 4)).float() - 32
    d = fp16_at(raw, 108)
    return ((d * sc)[..., None] * q).reshape(n, SUPER)
