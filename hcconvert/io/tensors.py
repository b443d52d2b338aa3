"""Tensor records shared by reading and writing: a stored tensor's place and shape, a planned
output tensor, and the safetensors dtype codes with their torch dtypes and sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Shape = tuple[int, ...]

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor with this safetensors dtype code and shape."""
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's place and shape, read from its shard's header."""

    shard: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)
