"""FLARE's quantisation filters, with their 8-bit type also on machines without CUDA.

FLARE 2.9's ``ModelQuantizer`` and ``ModelDequantizer`` (``nvflare/app_opt/pt/quantization``) move every tensor to
CUDA for ``blockwise8`` (``values.cuda()`` in ``quantization`` and ``dequantization``), so a CPU-only server or
site, which many hospital FL servers are, cannot use 8-bit transfer at all. bitsandbytes' blockwise quantisation,
the call FLARE makes, also runs on the CPU. These subclasses replace only that one path, when CUDA is absent, and
leave everything else to FLARE: float16, the 4-bit types (still CUDA only), the wire format (uint8 codes, each
tensor's per-block ``absmax`` and 256-entry ``code`` in the DXO's ``quant_state``) and the filters' bookkeeping. A
side with CUDA runs FLARE's own code, and either side can read what the other sent.
"""

from __future__ import annotations

import numpy as np
import torch
from bitsandbytes.functional import dequantize_blockwise, quantize_blockwise
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

BLOCKWISE8 = "blockwise8"


def _on_cpu(quantization_type: str) -> bool:
    return quantization_type == BLOCKWISE8 and not torch.cuda.is_available()


class Quantizer(ModelQuantizer):
    """FLARE's ``ModelQuantizer``; ``blockwise8`` without CUDA is quantised on the CPU."""

    def quantization(self, params: dict, fl_ctx: FLContext) -> tuple[dict, dict, dict]:
        if not _on_cpu(self.quantization_type):
            return super().quantization(params, fl_ctx)
        quant_state: dict = {}
        source_datatype: dict = {}
        for name, values in params.items():
            tensor = torch.as_tensor(values)
            source_datatype[name] = str(tensor.dtype).removeprefix("torch.")
            quant_state[name] = {}
            if not tensor.is_floating_point():  # sent as it is, with an empty state, as FLARE sends a bool tensor
                continue
            codes, state = quantize_blockwise(tensor.float().contiguous())
            sent = {"values": codes, "absmax": state.absmax, "code": state.code}
            if isinstance(values, np.ndarray):  # what came as numpy leaves as numpy, as in FLARE's filter
                sent = {k: v.numpy() for k, v in sent.items()}
            params[name] = sent.pop("values")
            quant_state[name] = sent
        self.log_info(fl_ctx, f"Quantized {len(params)} params to {BLOCKWISE8} on the CPU")
        return params, quant_state, source_datatype


class Dequantizer(ModelDequantizer):
    """FLARE's ``ModelDequantizer``; ``blockwise8`` without CUDA is restored on the CPU."""

    def dequantization(
        self, params: dict, quant_state: dict, quantization_type: str, source_datatype: dict, fl_ctx: FLContext
    ) -> dict:
        if not _on_cpu(quantization_type):
            return super().dequantization(params, quant_state, quantization_type, source_datatype, fl_ctx)
        for name, values in params.items():
            state = quant_state.get(name)
            if not state:  # sent unquantised
                continue
            restored = dequantize_blockwise(
                torch.as_tensor(values),
                absmax=torch.as_tensor(state["absmax"]),
                code=torch.as_tensor(state["code"]),
            ).to(getattr(torch, source_datatype[name]))
            params[name] = restored.numpy() if isinstance(values, np.ndarray) else restored
        self.log_info(fl_ctx, f"Dequantized {len(params)} params from {BLOCKWISE8} on the CPU")
        return params
