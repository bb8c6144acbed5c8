"""fp8 linears past the GEMV's rows on CUDA (torch._scaled_mm with per-token activation scales and
fast accumulation) against the W8A8 reference of the same quantized weights."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.models.quantization.fp8 import Fp8Linear
from pdserve.kernels.fp8_linear import fp8_linear_method
from pdserve.kernels.reference import fp8_linear_ref

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows, k, n, bias", [(64, 4096, 6144, False), (512, 14336, 4096, True), (33, 256, 320, False)])
def test_fp8_linear_above_the_gemv_rows(rows, k, n, bias):
    assert fp8_linear_method(rows) == "scaled_mm"
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    fp8 = Fp8Linear.from_linear(layer, use_triton=True).cuda()
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).cuda()
    got = fp8(x).float()
    want = fp8_linear_ref(x, fp8.weight, fp8.weight_scale, fp8.bias).float()
    assert got.shape == (rows, n)
    assert ((got - want).norm() / want.norm()).item() <= 1e-2
