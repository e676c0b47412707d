"""The few-row int4/int8 kernels (service/sinkserve/engine/cpu_matvec.cpp) against ATen's
kernels for the same weights and against float64 products of the values the codes stand
for, and `quant.linear`'s choice between them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sinkserve.engine import cpu_ext, quant

# Only the CPU decides: where it has AVX-512 BF16 the kernels must build and run.
needs_kernels = pytest.mark.skipif(
    not torch.cpu.get_capabilities().get("avx512_bf16", False),
    reason="this CPU has no AVX-512 BF16",
)
SHAPES = [(16, 32), (960, 576), (576, 1536), (3072, 576)]


def bf16_tolerance(exact: torch.Tensor) -> torch.Tensor:
    """Two bfloat16 roundings of each value (the output's, plus float32 sums' slack)."""
    return exact.abs() * 2**-7 + exact.abs().amax() * 2**-12


def int4_values(w: quant.Int4Weight, k: int) -> torch.Tensor:
    """The float64 weight [N, K] the codes stand for (the dense copy holds it exactly)."""
    dense: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        torch.eye(k), w.dense.packed, None, "none", [], ""
    )
    return dense.double().t()


@needs_kernels
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int4_rows_match_the_exact_product_and_aten(n: int, k: int) -> None:
    torch.manual_seed(n + k)
    w = quant.quantize_int4(torch.randn(n, k), torch.bfloat16, quant.PLAIN_DENSE)
    assert w.rowpack is not None
    values = int4_values(w, k)
    for rows in range(1, quant.MATVEC_ROWS):
        x = torch.randn(rows, k).bfloat16()
        exact = x.double() @ values.t()
        got = quant.matvec(x, w).double()
        aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.scales_zeros)
        assert ((got - exact).abs() <= bf16_tolerance(exact)).all()
        assert ((got - aten.double()).abs() <= 2 * bf16_tolerance(exact)).all()


@needs_kernels
@pytest.mark.parametrize(("n", "k"), [*SHAPES, (49152, 576)])
def test_int8_rows_match_the_exact_product_and_aten(n: int, k: int) -> None:
    torch.manual_seed(n * k)
    w = quant.quantize_int8(torch.randn(n, k), torch.bfloat16)
    assert w.rowpack is not None
    values = w.codes.double() * w.scales.double()[:, None]
    for rows in (1, 2, 5, 7):
        x = torch.randn(rows, k).bfloat16()
        exact = x.double() @ values.t()
        got = quant.matvec(x, w).double()
        aten = torch.ops.aten._weight_int8pack_mm(x, w.codes, w.scales)
        assert ((got - exact).abs() <= bf16_tolerance(exact)).all()
        assert ((got - aten.double()).abs() <= 2 * bf16_tolerance(exact)).all()


@needs_kernels
def test_linear_takes_the_kernels_below_eight_bfloat16_rows_only() -> None:
    torch.manual_seed(1)
    w = quant.quantize_int4(torch.randn(64, 64), torch.bfloat16, quant.PLAIN_DENSE)
    aten_only = dataclasses.replace(w, rowpack=None)
    x = torch.randn(7, 64).bfloat16()
    assert torch.equal(quant.linear(x, w), quant.matvec(x, w))
    eight = torch.randn(8, 64).bfloat16()
    assert torch.equal(quant.linear(eight, w), quant.linear(eight, aten_only))
    with pytest.raises(RuntimeError, match="1 to 7 rows"):
        quant.matvec(eight, w)


def test_without_the_kernels_weights_keep_atens_layout_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu_ext, "matvec_supported", lambda: False)
    w4 = quant.quantize_int4(torch.randn(64, 64), torch.bfloat16, quant.PLAIN_DENSE)
    w8 = quant.quantize_int8(torch.randn(64, 64), torch.bfloat16)
    assert w4.rowpack is None and w8.rowpack is None
    x = torch.randn(3, 64).bfloat16()
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4.packed, w4.group, w4.scales_zeros)
    assert torch.equal(quant.linear(x, w4), expected)
    assert torch.equal(
        quant.linear(x, w8), torch.ops.aten._weight_int8pack_mm(x, w8.codes, w8.scales)
    )


def test_float32_models_and_odd_widths_keep_atens_layout() -> None:
    f32 = quant.quantize_int4(torch.randn(64, 64), torch.float32, quant.PLAIN_DENSE)
    assert f32.rowpack is None
    assert quant.quantize_int8(torch.randn(64, 40), torch.bfloat16).rowpack is None


@needs_kernels
def test_linear_answers_no_rows_with_no_rows() -> None:
    w = quant.quantize_int8(torch.randn(64, 64), torch.bfloat16)
    assert quant.linear(torch.randn(0, 64), w).shape == (0, 64)


@needs_kernels
def test_the_int8_head_takes_float32_rows_as_bfloat16() -> None:
    w = quant.quantize_int8(torch.randn(64, 64), torch.bfloat16)
    x = torch.randn(3, 64)  # the final norm's float32 output
    assert torch.equal(quant.linear(x, w), quant.matvec(x.bfloat16(), w))
