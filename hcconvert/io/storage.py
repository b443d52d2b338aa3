"""A checkpoint's quantized storage as a conversion sees it: which weights are stored quantized,
their dense view for the forward, and what is written back.

Outside this module a quantized weight is one dense tensor: under its dense name (`B.weight`)
with its dequantized shape in the plan's checks, and dequantized on the compute device, one
weight at a time, in the forward. Written back, by default, in the source's format: tensors a
conversion does not change are copied as stored (scales included), merged experts quantized
again with fresh scales, and an expert equal to a source expert (one kept by pruning, a
singleton group) copied from that expert's stored bytes. With `--dtype bf16` every quantized
weight is written dequantized in bf16 and config.json loses its quantization_config.
Which weights are quantized is what the headers store, so a module the format's exclusion list
names stays as it is stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..errors import UserError
from .quantization import (
    PackedInt4,
    QuantFormat,
    quant_format,
    quantize_with_error,
    quantized_weights,
    without_quantization_config,
)
from .source import Checkpoint
from .tensors import SAFETENSORS_DTYPES, OutputTensor, TensorInfo

Shape = tuple[int, ...]
DENSE_DTYPE = "BF16"  # what --dtype bf16 writes a quantized weight as
FP8_CODES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Storage:
    """The quantized weights of one checkpoint (full base names) in one format, and whether
    the output writes them dense (--dtype bf16)."""

    fmt: QuantFormat | None = None
    bases: frozenset[str] = frozenset()
    dense_output: bool = False

    @classmethod
    def of(cls, ckpt: Checkpoint) -> Storage:
        """From config.json's quantization_config and the headers: a quantized weight with a
        tensor missing, or fp8 tensors without a quantization_config, is bad input."""
        dtypes = {name: info.dtype for name, info in ckpt.tensors.items()}
        fmt = quant_format(ckpt.config)
        if fmt is None:
            fp8 = next((n for n, dtype in dtypes.items() if dtype in FP8_CODES), None)
            if fp8 is not None:
                raise UserError(f"tensor {fp8} is stored as {dtypes[fp8]}, but config.json has "
                                "no quantization_config to say how it is scaled")
            return cls()
        bases = quantized_weights(fmt, dtypes)
        return cls(_with_source_dtypes(fmt, bases, ckpt.tensors), frozenset(bases))

    def writing(self, dtype: str) -> Storage:
        """This storage as an output with --dtype `dtype` writes it."""
        if dtype == "source":
            return self
        if self.fmt is None:
            raise UserError(f"--dtype {dtype} writes quantized weights dequantized, and this "
                            "checkpoint stores none quantized; leave --dtype out")
        return dataclasses.replace(self, dense_output=True)

    def describe(self) -> str | None:
        """One line for the plan: the source's format and what is written back."""
        if self.fmt is None:
            return None
        written = "bf16 (dequantized)" if self.dense_output else f"{self.fmt.method} (merged " \
            "experts requantized, the rest copied as stored)"
        return f"{self.fmt.method}, {len(self.bases)} quantized weights -> {written}"

    # -- names -----------------------------------------------------------------------------

    def base(self, dense_name: str) -> str | None:
        """The quantized weight a dense name stands for, None for a tensor stored unquantized."""
        if self.fmt is None:
            return None
        base = dense_name.removesuffix(self.fmt.dense_suffix)
        return base if base in self.bases and self.fmt.dense_name(base) == dense_name else None

    def stored_base(self, name: str, dtype: str) -> str | None:
        """The quantized weight a stored tensor (safetensors dtype code) belongs to, if any."""
        if self.fmt is None:
            return None
        base = self.fmt.base_of(name, dtype)
        return base if base in self.bases else None

    def stored_names(self, dense_name: str) -> list[str]:
        """The tensors a weight is stored as."""
        base = self.base(dense_name)
        return [dense_name] if base is None else self.fmt.stored_names(base)

    def logical(self, names: Iterable[str],
                infos: Mapping[str, TensorInfo]) -> dict[str, tuple[str, Shape]]:
        """Stored tensors as the model sees them, name -> (dtype, shape), in order: each
        quantized weight once, where its first tensor is, under its dense name, with its
        dequantized shape and the format's method for dtype."""
        tensors: dict[str, tuple[str, Shape]] = {}
        for name in names:
            base = self.stored_base(name, infos[name].dtype)
            if base is None:
                tensors[name] = (infos[name].dtype, infos[name].shape)
            elif self.fmt.dense_name(base) not in tensors:
                shapes = {suffix: infos[base + suffix].shape for suffix in self.fmt.suffixes}
                tensors[self.fmt.dense_name(base)] = (self.fmt.method,
                                                      self.fmt.logical_shape(base, shapes))
        return tensors

    # -- the plan --------------------------------------------------------------------------

    def copied(self, names: Iterable[str],
               infos: Mapping[str, TensorInfo]) -> list[OutputTensor]:
        """The outputs of stored tensors a conversion does not change: as stored, or with
        --dtype bf16 each quantized weight dense in bf16."""
        if not self.dense_output:
            return [OutputTensor(name, infos[name].dtype, infos[name].shape) for name in names]
        return [OutputTensor(name, DENSE_DTYPE if self.base(name) else dtype, shape)
                for name, (dtype, shape) in self.logical(names, infos).items()]

    def requantizes(self, source: str) -> bool:
        """Whether new weights replacing the source's weight `source` (a dense name) are
        written quantized."""
        return not self.dense_output and self.base(source) is not None

    def replacing(self, name: str, shape: Shape,
                  infos: Mapping[str, TensorInfo]) -> list[OutputTensor]:
        """The outputs of a new weight replacing the source's weight of the same (dense) name:
        in the source's format where that is quantized (bf16 with --dtype bf16), else in the
        source's dtype."""
        if self.requantizes(name):
            return self.fmt.planned(name.removesuffix(self.fmt.dense_suffix), shape)
        dtype = DENSE_DTYPE if self.base(name) else infos[name].dtype
        return [OutputTensor(name, dtype, shape)]

    def output_config(self, config: dict) -> dict:
        """config.json for the output: without quantization_config once nothing is quantized."""
        if not self.dense_output:
            return config
        return without_quantization_config(config)

    # -- values ----------------------------------------------------------------------------

    def dequantize(self, base: str, stored: Mapping[str, torch.Tensor], prefix: str,
                   dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """A quantized weight (full base name) from its tensors in `stored`, keyed below
        prefix, dequantized on device."""
        local = base.removeprefix(prefix)
        parts = {suffix: stored[local + suffix].to(device, non_blocking=True)
                 for suffix in self.fmt.suffixes}
        return self.fmt.dequantize(base, parts, dtype)

    def dense(self, stored: Mapping[str, torch.Tensor], prefix: str, device: torch.device,
              dtype: torch.dtype) -> Mapping[str, torch.Tensor]:
        """Stored tensors (keyed below prefix) as the forward reads them (DenseTensors)."""
        if self.fmt is None:
            return stored
        return DenseTensors(self, stored, prefix, device, dtype)

    def copied_value(self, name: str, stored: Mapping[str, torch.Tensor],
                     prefix: str = "") -> torch.Tensor:
        """What a copied output (full name) holds, from tensors keyed below prefix."""
        base = self.base(name) if self.dense_output else None
        if base is None:
            return stored[name.removeprefix(prefix)]
        return self.dequantize(base, stored, prefix, torch.bfloat16)

    def requantize(self, dense: Mapping[str, torch.Tensor], unchanged: Mapping[str, str],
                   stored: Mapping[str, torch.Tensor],
                   prefix: str) -> tuple[dict[str, torch.Tensor], list[float]]:
        """New weights (dense full names) in the source's format: one equal to a source weight
        (unchanged: its dense name -> the source weight's) as that weight is stored, the rest
        quantized with fresh scales; and each of those one's relative Frobenius error. A new
        tensor whose source is not quantized (GPT-OSS's expert biases) is passed through."""
        fmt, written, errors = self.fmt, {}, []
        for name, weight in dense.items():
            base = name.removesuffix(fmt.dense_suffix)
            if self.base(name) is None:
                written[name] = weight
                continue
            if name in unchanged:
                source = unchanged[name].removesuffix(fmt.dense_suffix).removeprefix(prefix)
                parts = {suffix: stored[source + suffix] for suffix in fmt.suffixes}
            else:
                parts, error = quantize_with_error(fmt, base, weight)
                errors.append(error)
            written.update({base + suffix: tensor for suffix, tensor in parts.items()})
        return written, errors


class DenseTensors(Mapping):
    """Stored tensors (keyed below a prefix) with each quantized weight under its dense name,
    dequantized onto the device in the compute dtype when it is looked up: a layer's experts
    are stacked one dequantized weight at a time, never all of them dequantized at once."""

    def __init__(self, storage: Storage, stored: Mapping[str, torch.Tensor], prefix: str,
                 device: torch.device, dtype: torch.dtype):
        self.storage, self.stored, self.prefix = storage, stored, prefix
        self.device, self.dtype = device, dtype
        self.plain: dict[str, torch.Tensor] = {}
        self.quantized: dict[str, str] = {}  # dense name below prefix -> full base
        for name, tensor in stored.items():
            base = storage.stored_base(prefix + name, SAFETENSORS_DTYPES[tensor.dtype])
            if base is None:
                self.plain[name] = tensor
            else:
                self.quantized[storage.fmt.dense_name(base).removeprefix(prefix)] = base

    def __getitem__(self, name: str) -> torch.Tensor:
        base = self.quantized.get(name)
        if base is None:
            return self.plain[name]
        return self.storage.dequantize(base, self.stored, self.prefix, self.dtype, self.device)

    def __iter__(self) -> Iterator[str]:
        yield from self.plain
        yield from self.quantized

    def __contains__(self, name: object) -> bool:
        # Mapping's own would look the weight up, dequantizing it to answer.
        return name in self.plain or name in self.quantized

    def __len__(self) -> int:
        return len(self.plain) + len(self.quantized)


def _with_source_dtypes(fmt: QuantFormat, bases: list[str],
                        infos: Mapping[str, TensorInfo]) -> QuantFormat:
    """int4's scale and shape tensors written in the dtypes the source stores them in."""
    if not isinstance(fmt, PackedInt4) or not bases:
        return fmt
    return dataclasses.replace(fmt, scale_dtype=infos[bases[0] + ".weight_scale"].dtype,
                               shape_dtype=infos[bases[0] + ".weight_shape"].dtype)
