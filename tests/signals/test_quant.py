"""Id bit-packing and log-prob quantization (potstill.signals.quant).

The int8 bound is derived here from the code's definition, not copied from it:
the code is c = round(255 * sqrt(p / p_max)) with real slots clamped to c >= 1 and the
decoder returns p_hat = p_max * (c / 255)^2, so sqrt(p_hat / p_max) = c / 255 and
|sqrt(p / p_max) - c / 255| <= 0.5 / 255 wherever rounding (not the clamp) chose c.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from potstill.signals.quant import (
    decode_logprobs,
    encode_logprobs,
    id_bits,
    pack_ids,
    packed_nbytes,
    unpack_ids,
)

BITS = [*range(1, 25), 32]
# float32 decoding of an int8 code: a few ulps of the log-prob, mapped into sqrt(p / p_max) <= 1.
FP32_EPS = 4 * torch.finfo(torch.float32).eps


def _random_ids(bits: int, count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    ids = rng.integers(0, top, size=count, endpoint=True, dtype=np.int64)
    if count >= 2:
        ids[0], ids[-1] = 0, top  # both ends of the range, always
    return torch.from_numpy(ids)


# ----------------------------------------------------------------------------- ids


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("count", [0, 1, 7, 13, 64, 1001])
def test_pack_unpack_round_trip(bits, count):
    ids = _random_ids(bits, count, seed=bits * 10_000 + count)
    buf = pack_ids(ids, bits)
    assert buf.dtype == torch.uint8 and buf.numel() == packed_nbytes(count, bits) == math.ceil(count * bits / 8)
    out = unpack_ids(buf, bits, count)
    assert out.dtype == torch.int64
    assert torch.equal(out, ids)
    # numpy buffers (what a memory-mapped shard gives) decode the same
    assert torch.equal(unpack_ids(buf.numpy(), bits, count), ids)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_reads_only_the_first_count_ids_of_a_longer_buffer(bits):
    ids = _random_ids(bits, 19, seed=bits)
    buf = torch.cat([pack_ids(ids, bits), torch.full((5,), 0xFF, dtype=torch.uint8)])
    assert torch.equal(unpack_ids(buf, bits, 11), ids[:11])


def test_pack_flattens_row_major():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert torch.equal(unpack_ids(pack_ids(ids, 5), 5, 6), ids.reshape(-1))
    assert torch.equal(unpack_ids(pack_ids(ids.t(), 5), 5, 6), ids.t().reshape(-1))  # non-contiguous input


def test_packed_layout_is_little_endian():
    # The on-disk format: id i occupies bits [i*b, (i+1)*b), least significant bit first.
    assert pack_ids(torch.tensor([1, 2]), 3).tolist() == [0b0001_0001]
    assert pack_ids(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]
    assert pack_ids(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]
    assert pack_ids(torch.tensor([0x01020304]), 32).tolist() == [4, 3, 2, 1]


@pytest.mark.parametrize(
    ("vocab", "bits"),
    [
        (1, 1),
        (2, 1),
        (3, 2),
        (4, 2),
        (5, 3),
        (256, 8),
        (257, 9),
        (49152, 16),
        (65536, 16),
        (65537, 17),
        (262144, 18),
        (262145, 19),
    ],
)
def test_id_bits(vocab, bits):
    assert id_bits(vocab) == bits
    top = torch.tensor([vocab - 1])  # the largest id of the vocabulary fits
    assert torch.equal(unpack_ids(pack_ids(top, bits), bits, 1), top)


def test_id_bits_rejects_an_empty_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        id_bits(0)


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 16, 24, 32])
def test_pack_rejects_out_of_range_ids(bits):
    with pytest.raises(ValueError, match=rf"\[0, 2\^{bits}\)"):
        pack_ids(torch.tensor([0, 1 << bits]), bits)
    with pytest.raises(ValueError, match=rf"\[0, 2\^{bits}\)"):
        pack_ids(torch.tensor([3 % (1 << bits), -1]), bits)


@pytest.mark.parametrize("bits", [1, 5, 8, 16, 17, 32])
def test_unpack_rejects_a_short_buffer(bits):
    ids = _random_ids(bits, 10, seed=bits)
    buf = pack_ids(ids, bits)
    with pytest.raises(ValueError, match="needed"):
        unpack_ids(buf[:-1], bits, 10)
    with pytest.raises(ValueError, match="needed"):
        unpack_ids(torch.zeros(0, dtype=torch.uint8), bits, 1)


# ------------------------------------------------------------------------ float values


def _random_logprob_rows(rows: int, k: int, seed: int, spread: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(rows, 500, generator=g, dtype=torch.float64) * spread, -1)
    return lp.topk(k, dim=-1).values.float()  # the first k slots of real teacher rows


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_float_codes_round_trip_what_torch_casts_to(name, dtype):
    lp = _random_logprob_rows(17, 9, seed=1, spread=8.0)
    lp[3, 5:] = float("-inf")  # absent slots
    lp[4] = float("-inf")  # an all-absent row
    enc = encode_logprobs(lp, name)
    assert set(enc) == {"values"} and enc["values"].dtype == dtype
    dec = decode_logprobs(enc["values"], name)
    assert dec.dtype == torch.float32
    assert torch.equal(dec, lp.to(dtype).float())
    assert torch.equal(torch.isneginf(dec), torch.isneginf(lp))
    # a fixed point: the decoded values encode to the same bits
    assert torch.equal(encode_logprobs(dec, name)["values"], enc["values"])


def test_unknown_dtype_is_refused():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown value dtype"):
        encode_logprobs(lp, "int4")
    with pytest.raises(ValueError, match="unknown value dtype"):
        decode_logprobs(lp, "int4")
    with pytest.raises(ValueError, match="scale"):
        decode_logprobs(torch.ones(1, 2, dtype=torch.uint8), "int8")


# ------------------------------------------------------------------------- int8 values


def _int8_round_trip(lp: torch.Tensor):
    enc = encode_logprobs(lp, "int8")
    assert enc["values"].dtype == torch.uint8 and enc["scale"].shape == lp.shape[:-1]
    return enc, decode_logprobs(enc["values"], "int8", enc["scale"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spread", [0.5, 4.0, 20.0])
def test_int8_error_bound_in_sqrt_space(seed, spread):
    lp = _random_logprob_rows(64, 24, seed=seed, spread=spread)
    g = torch.Generator().manual_seed(100 + seed)
    lp = lp[:, torch.randperm(24, generator=g)]  # the max is not always in slot 0
    lp[::5, 17:] = float("-inf")
    _, dec = _int8_round_trip(lp)

    x = lp.double()
    pmax = x.amax(-1, keepdim=True)
    real = torch.isfinite(x)
    s = torch.exp(0.5 * (x - pmax))  # sqrt(p / p_max), float64
    s_hat = torch.exp(0.5 * (dec.double() - pmax))  # sqrt(p_hat / p_max)
    err = (s - s_hat).abs()
    rounded = real & (255 * s >= 0.5)
    assert rounded.sum() > 0
    assert err[rounded].max() <= 0.5 / 255 + FP32_EPS * 8
    # where rounding would give 0 the clamp keeps the slot at the smallest code, c = 1
    clamped = real & (255 * s < 0.5)
    assert torch.allclose(s_hat[clamped], torch.full_like(s_hat[clamped], 1 / 255), rtol=0, atol=FP32_EPS * 8)


def test_int8_absent_slots_decode_to_neg_inf_and_real_slots_never_do():
    lp = torch.tensor(
        [
            [0.0, -1.0, float("-inf"), -50.0, -1e4, float("-inf")],
            [-3e38, -1e30, -1e30, float("-inf"), float("-inf"), float("-inf")],  # tiny but real
            [-2.0, -2.0, -2.0, -2.0, -2.0, -2.0],  # all equal: all at the max
        ]
    )
    enc, dec = _int8_round_trip(lp)
    absent = torch.isneginf(lp)
    assert torch.equal(enc["values"] == 0, absent)
    assert torch.isneginf(dec[absent]).all()
    assert torch.isfinite(dec[~absent]).all(), dec
    assert (enc["values"][~absent] >= 1).all()
    # a slot far below the max is kept at the smallest code, i.e. p_max / 255^2
    assert dec[0, 4].item() == pytest.approx(0.0 - 2 * math.log(255), abs=1e-5)
    assert torch.equal(enc["values"][2], torch.full((6,), 255, dtype=torch.uint8))


@pytest.mark.parametrize("seed", range(3))
def test_int8_row_max_decodes_within_fp32_rounding(seed):
    lp = _random_logprob_rows(40, 16, seed=seed, spread=10.0)
    lp[7] = lp[7] - 80.0  # a row whose max is far from 0
    enc, dec = _int8_round_trip(lp)
    top = lp.amax(-1)
    assert torch.equal(enc["scale"], top)  # the scale is the row max itself, float32
    tol = FP32_EPS * top.abs().clamp(min=1.0)
    assert ((dec.amax(-1) - top).abs() <= tol).all()
    assert torch.equal(dec.argmax(-1), lp.argmax(-1))


def test_int8_rows_that_are_all_absent():
    lp = torch.full((3, 5), float("-inf"))
    lp[1, 2] = -0.7  # one live row between two dead ones
    enc, dec = _int8_round_trip(lp)
    assert torch.isneginf(dec[[0, 2]]).all()
    assert (enc["values"][[0, 2]] == 0).all()
    assert torch.isfinite(enc["scale"]).all()
    assert dec[1, 2].item() == pytest.approx(-0.7, abs=1e-6)
    assert torch.isneginf(dec[1, [0, 1, 3, 4]]).all()
    empty_enc, empty_dec = _int8_round_trip(torch.zeros(0, 4))
    assert empty_dec.shape == (0, 4) and empty_enc["scale"].shape == (0,)


@pytest.mark.parametrize("spread", [1.0, 10.0])
def test_int8_encode_decode_encode_is_a_fixed_point(spread):
    lp = _random_logprob_rows(50, 32, seed=7, spread=spread)
    lp[::3, 20:] = float("-inf")
    lp[4] = float("-inf")
    enc, dec = _int8_round_trip(lp)
    enc2, dec2 = _int8_round_trip(dec)
    assert torch.equal(enc2["values"], enc["values"])
    assert torch.equal(enc2["scale"], enc["scale"])
    assert torch.equal(dec2, dec)
