"""Quantized weights as the Hub stores them: FP8 blocks, compressed-tensors INT4, MXFP4.

A quantized weight is several tensors whose names share a base and differ by suffix. Each
format reads its settings from config.json's `quantization_config`, names the tensors a weight
is stored as (with dtypes and shapes, before any is read, for the writer's plan), dequantizes
them to a float tensor, and quantizes a float tensor back with fresh scales.

Layouts, as the code that reads them on the Hub decodes them:

- `fp8` (DeepSeek-V3/R1, Kimi-K2; DeepSeek-V3 `inference/kernel.py` weight_dequant,
  transformers `integrations/finegrained_fp8.py`): `B.weight` F8_E4M3 [..., O, I] and
  `B.weight_scale_inv` F32 [..., ceil(O/bo), ceil(I/bi)] for `weight_block_size` [bo, bi];
  w = value * scale_inv over each block; edge blocks may be partial (DeepSeek-V3's
  kv_a_proj_with_mqa has 576 rows: 5 row blocks).
- `compressed-tensors` pack-quantized (Kimi-K2-Thinking; compressed-tensors
  `pack_quantized.py`, `lifecycle/forward.py`, `utils/helpers.py`): `B.weight_packed` I32
  [..., O, ceil(I/8)] holding columns 8p..8p+7 as unsigned nibbles q + 8 at bits 0, 4, ..., 28;
  `B.weight_scale` BF16 [..., O, I/g]; `B.weight_shape` [O, I]; w = q * scale per group.
- `mxfp4` (GPT-OSS; transformers `integrations/mxfp4.py` convert_moe_packed_tensors):
  `B_blocks` U8 [..., R, C/32, 16] and `B_scales` U8 [..., R, C/32]; byte k of a block holds
  values 2k (low nibble) and 2k+1 (high nibble) as e2m1 codes; w = value * 2**(scale - 127).
  The dequantized weight is [..., C, R], the transpose of the stored rows x blocked columns,
  as transformers' loader hands it to GPT-OSS's experts (x @ W): gate_up_proj_blocks
  [E, 2F, H/32, 16] is the weight gate_up_proj [E, H, 2F], down_proj_blocks [E, H, F/32, 16]
  the weight down_proj [E, F, H].
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UserError
from .tensors import TORCH_DTYPES, OutputTensor

Shape = tuple[int, ...]
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# e2m1 code -> value: codes 0-7 positive, 8-15 the same magnitudes negated.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Halfway points between consecutive e2m1 magnitudes: a magnitude at or above the k-th one
# rounds to code k + 1 or higher (ties away from zero, as triton_kernels' downcast_to_mxfp).
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
MX_BLOCK = 32  # values sharing one e8m0 exponent
INT4_OFFSET = 8  # stored nibble = q + 8 for q in [-8, 7]
# Scale = group amax / divisor. compressed-tensors uses 7.5 (half the int4 range); 7 and 8 fit
# groups stored with the largest value at +7 or -8, so those come back with the same bytes.
INT4_DIVISORS = (7.5, 7.0, 8.0)


class QuantFormat(ABC):
    """One quant_method's storage. `base` names a quantized weight: the name its stored tensors
    share before their suffix (`...experts.0.gate_proj` for fp8 and int4,
    `...mlp.experts.gate_up_proj` for mxfp4). Stored tensors travel in dicts keyed by suffix."""

    method: ClassVar[str]  # quantization_config's quant_method
    suffixes: ClassVar[tuple[str, ...]]
    dense_suffix: ClassVar[str]  # what base + suffix names once dequantized

    def stored_names(self, base: str) -> list[str]:
        return [base + suffix for suffix in self.suffixes]

    def dense_name(self, base: str) -> str:
        """The name the weight has when written unquantized (`--dtype bf16`)."""
        return base + self.dense_suffix

    @abstractmethod
    def excludes(self, module: str) -> bool:
        """Whether quantization_config leaves this module (full name) unquantized."""

    def base_of(self, name: str, dtype: str) -> str | None:
        """The base of a quantized weight this stored tensor belongs to, else None: by
        default, whatever precedes one of the format's suffixes."""
        for suffix in self.suffixes:
            if name.endswith(suffix):
                return name.removesuffix(suffix)
        return None

    @abstractmethod
    def logical_shape(self, base: str, shapes: Mapping[str, Shape]) -> Shape:
        """The dequantized weight's shape, from its stored tensors' shapes (by suffix)."""

    @abstractmethod
    def planned(self, base: str, shape: Shape) -> list[OutputTensor]:
        """The tensors `quantize` writes for a weight of this logical shape."""

    @abstractmethod
    def dequantize(self, base: str, parts: Mapping[str, torch.Tensor],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight from its stored tensors (by suffix)."""

    @abstractmethod
    def quantize(self, base: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors (by suffix) for a float weight, with fresh scales."""


def quantization_settings(config: Mapping) -> object:
    """config.json's quantization_config: at the top, or inside a wrapper's text_config
    (where some Kimi-K2.5-style checkpoints keep it); None for none."""
    text = config.get("text_config")
    if "quantization_config" not in config and isinstance(text, dict):
        return text.get("quantization_config")
    return config.get("quantization_config")


def without_quantization_config(config: dict) -> dict:
    """config.json with no quantization_config, at the top or in a wrapper's text_config."""
    config = {key: value for key, value in config.items() if key != "quantization_config"}
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = without_quantization_config(config["text_config"])
    return config


def quant_format(config: Mapping) -> QuantFormat | None:
    """The format config.json's quantization_config describes, or None for none."""
    settings = quantization_settings(config)
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise UserError("config.json's quantization_config is not a JSON object")
    method = settings.get("quant_method")
    readers = {"fp8": _fp8_format, "compressed-tensors": _packed_int4_format,
               "mxfp4": _mxfp4_format}
    if method not in readers:
        raise UserError(f"quantization method {method!r} is not supported; hcconvert reads "
                        "fp8 (block scales), compressed-tensors pack-quantized int4 and mxfp4")
    return readers[method](settings)


def quantized_weights(fmt: QuantFormat, dtypes: Mapping[str, str]) -> list[str]:
    """Bases of the weights stored quantized, given every tensor's name -> safetensors dtype.
    A weight with one of its tensors missing (a scale, say) is bad input, named."""
    bases = {base for name, dtype in dtypes.items()
             if (base := fmt.base_of(name, dtype)) is not None}
    for base in sorted(bases):
        present = [name for name in fmt.stored_names(base) if name in dtypes]
        for name in fmt.stored_names(base):
            if name not in dtypes:
                raise UserError(f"tensor {name} is missing: {present[0]} is stored as "
                                f"{fmt.method} and cannot be read without it")
    return sorted(bases)


def relative_error(reference: torch.Tensor, restored: torch.Tensor) -> float:
    """||restored - reference||_F / ||reference||_F (0 when both are zero)."""
    reference, restored = reference.double(), restored.double()
    norm = reference.norm()
    error = (restored - reference).norm()
    if norm == 0:
        return 0.0 if error == 0 else math.inf
    return float(error / norm)


def quantize_with_error(fmt: QuantFormat, base: str,
                        weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """quantize, and the relative Frobenius error of dequantizing the result (hcconvert.json)."""
    parts = fmt.quantize(base, weight)
    return parts, relative_error(weight, fmt.dequantize(base, parts))


# --- module exclusion lists -------------------------------------------------------------------

def _transformers_excludes(module: str, patterns: tuple[str, ...]) -> bool:
    """transformers' should_convert_module, negated: a pattern matches as a regex from the start
    up to a module boundary ("layers.1" takes "layers.1.attn", not "layers.11.attn"), or as a
    suffix of the name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def _compressed_tensors_ignores(module: str, ignore: tuple[str, ...]) -> bool:
    """compressed-tensors' match_name: "re:" entries match as a regex from the start, others only
    the exact name. (Entries naming a module class, like "Linear", need the model; a checkpoint's
    tensors show instead whether a module was quantized.)"""
    return any(re.match(entry.removeprefix("re:"), module) if entry.startswith("re:")
               else entry == module for entry in ignore)


def _string_list(settings: Mapping, key: str, method: str) -> tuple[str, ...]:
    value = settings.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"quantization_config ({method}) {key} is not a list of names")
    return tuple(value)


# --- fp8 with block scales --------------------------------------------------------------------

@dataclass(frozen=True)
class Fp8Block(QuantFormat):
    """float8_e4m3fn values, one float32 inverse scale per block."""

    block: tuple[int, int] = (128, 128)
    power_of_two_scales: bool = False  # scale_fmt "ue8m0" (DeepSeek-V3.1)
    not_converted: tuple[str, ...] = ()

    method: ClassVar[str] = "fp8"
    suffixes: ClassVar[tuple[str, ...]] = (".weight", ".weight_scale_inv")
    dense_suffix: ClassVar[str] = ".weight"

    def excludes(self, module: str) -> bool:
        return _transformers_excludes(module, self.not_converted)

    def base_of(self, name: str, dtype: str) -> str | None:
        if name.endswith(".weight_scale_inv"):
            return name.removesuffix("_scale_inv").removesuffix(".weight")
        if name.endswith(".weight") and dtype == "F8_E4M3":
            return name.removesuffix(".weight")
        return None

    def scale_grid(self, shape: Shape) -> Shape:
        """Scale shape for a weight shape: one per block, partial edge blocks included."""
        *lead, rows, cols = shape
        return (*lead, -(-rows // self.block[0]), -(-cols // self.block[1]))

    def logical_shape(self, base: str, shapes: Mapping[str, Shape]) -> Shape:
        shape = tuple(shapes[".weight"])
        self._check_scale(base, shape, tuple(shapes[".weight_scale_inv"]))
        return shape

    def planned(self, base: str, shape: Shape) -> list[OutputTensor]:
        self._check_whole_blocks(base, shape)
        return [OutputTensor(f"{base}.weight", "F8_E4M3", tuple(shape)),
                OutputTensor(f"{base}.weight_scale_inv", "F32", self.scale_grid(shape))]

    def dequantize(self, base: str, parts: Mapping[str, torch.Tensor],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values, scale = parts[".weight"], parts[".weight_scale_inv"]
        self._check_scale(base, tuple(values.shape), tuple(scale.shape))
        rows, cols = values.shape[-2:]
        out = values.float()
        # Scales spread over rows only ([..., O, Cb], 1/bi of the weight), then broadcast over
        # each block's columns through a view: no second weight-sized temporary.
        row_scale = scale.float().repeat_interleave(self.block[0], dim=-2)[..., :rows, :]
        whole, partial = divmod(cols, self.block[1])
        out[..., :whole * self.block[1]].unflatten(-1, (whole, self.block[1])).mul_(
            row_scale[..., :whole, None])
        if partial:
            out[..., whole * self.block[1]:].mul_(row_scale[..., whole:])
        return out.to(dtype)

    def quantize(self, base: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = tuple(weight.shape)
        self._check_whole_blocks(base, shape)
        *lead, rows, cols = shape
        block_rows, block_cols = self.block
        # [..., Rb, br, Cb, bc]: Rb x Cb blocks of br x bc values
        blocks = weight.float().reshape(*lead, rows // block_rows, block_rows,
                                        cols // block_cols, block_cols)
        amax = blocks.abs().amax(dim=(-3, -1))  # [..., Rb, Cb]
        # The block's largest magnitude lands on 448; an all-zero block keeps scale 1, as
        # transformers' Fp8Quantize does.
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        if self.power_of_two_scales:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        else:
            scale = _reproducing_scale(blocks, scale)
        return {".weight": _to_fp8(blocks, scale).reshape(shape), ".weight_scale_inv": scale}

    def _check_scale(self, base: str, shape: Shape, scale_shape: Shape) -> None:
        if scale_shape != self.scale_grid(shape):
            raise UserError(
                f"tensor {base}.weight_scale_inv has shape {list(scale_shape)}, but "
                f"{base}.weight {list(shape)} in weight_block_size {list(self.block)} blocks "
                f"needs {list(self.scale_grid(shape))}")

    def _check_whole_blocks(self, base: str, shape: Shape) -> None:
        # transformers' dequantizing loader (Fp8Dequantize) and quantizer (Fp8Quantize) both
        # refuse partial blocks, so hcconvert writes fp8 only in whole blocks.
        if len(shape) < 2 or shape[-2] % self.block[0] or shape[-1] % self.block[1]:
            raise UserError(f"weight_block_size {list(self.block)} does not divide "
                            f"{base}.weight {list(shape)}; it cannot be written as fp8 blocks")


def _to_fp8(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., Rb, br, Cb, bc] floats over [..., Rb, Cb] scales -> float8_e4m3fn, saturated
    (a plain cast turns values beyond 448 into NaN)."""
    scaled = blocks / scale[..., :, None, :, None]
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _reproducing_scale(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A block dequantized from fp8 in float32 (value * s, rounded) gives back amax / 448 up to
    one float32 step away from s. Of the scale and its two neighbours, keep one whose
    quantize-dequantize reproduces the block exactly where one does: s does, so an unchanged
    dequantized weight gets its own bytes back."""
    def reproduces(candidate: torch.Tensor) -> torch.Tensor:
        restored = _to_fp8(blocks, candidate).float() * candidate[..., :, None, :, None]
        return (restored == blocks).all(dim=-1).all(dim=-2)  # [..., Rb, Cb]

    found = reproduces(scale)
    for direction in (0.0, math.inf):
        neighbour = torch.nextafter(scale, torch.full_like(scale, direction))
        better = ~found & reproduces(neighbour)
        scale = torch.where(better, neighbour, scale)
        found |= better
    return scale


def _fp8_format(settings: Mapping) -> Fp8Block:
    block = settings.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise UserError(f"quantization_config (fp8) weight_block_size is {block!r}; hcconvert "
                        "reads fp8 with block scales, weight_block_size a pair of positive ints")
    # DeepSeek's configs write fmt "e4m3", MiniMax-M2's "float8_e4m3fn": the same format.
    for key, allowed in (("fmt", ("e4m3", "float8_e4m3fn")), ("activation_scheme", ("dynamic",)),
                         ("scale_fmt", ("float", "ue8m0"))):
        if settings.get(key) not in (None, *allowed):
            raise UserError(f"quantization_config (fp8) {key} {settings[key]!r} is not "
                            f"supported (only {', '.join(allowed)})")
    return Fp8Block(block=(block[0], block[1]),
                    power_of_two_scales=settings.get("scale_fmt") == "ue8m0",
                    not_converted=_string_list(settings, "modules_to_not_convert", "fp8"))


# --- compressed-tensors pack-quantized int4 ---------------------------------------------------

@dataclass(frozen=True)
class PackedInt4(QuantFormat):
    """Symmetric int4 in groups along the input dimension, eight values per int32."""

    group_size: int = 32
    ignore: tuple[str, ...] = ()
    # Dtypes of the scale and shape tensors: the source's, when it has quantized weights.
    scale_dtype: str = "BF16"
    shape_dtype: str = "I32"

    method: ClassVar[str] = "compressed-tensors"
    suffixes: ClassVar[tuple[str, ...]] = (".weight_packed", ".weight_scale", ".weight_shape")
    dense_suffix: ClassVar[str] = ".weight"

    def excludes(self, module: str) -> bool:
        return _compressed_tensors_ignores(module, self.ignore)

    def logical_shape(self, base: str, shapes: Mapping[str, Shape]) -> Shape:
        *lead, rows, groups = shapes[".weight_scale"]
        shape = (*lead, rows, groups * self.group_size)
        self._check_parts(base, shape, shapes)
        return shape

    def planned(self, base: str, shape: Shape) -> list[OutputTensor]:
        self._check_groups(base, shape)
        *lead, rows, cols = shape
        return [OutputTensor(f"{base}.weight_packed", "I32", (*lead, rows, -(-cols // 8))),
                OutputTensor(f"{base}.weight_scale", self.scale_dtype,
                             (*lead, rows, cols // self.group_size)),
                OutputTensor(f"{base}.weight_shape", self.shape_dtype, (len(shape),))]

    def dequantize(self, base: str, parts: Mapping[str, torch.Tensor],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(int(v) for v in parts[".weight_shape"].tolist())
        self._check_parts(base, shape, {k: tuple(v.shape) for k, v in parts.items()})
        cols = shape[-1]
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=parts[".weight_packed"].device)
        # [..., O, P, 8] -> [..., O, 8P]: nibble j of int32 p is column 8p + j
        nibbles = (parts[".weight_packed"].unsqueeze(-1) >> shifts) & 0xF
        q = nibbles.flatten(-2)[..., :cols].float() - INT4_OFFSET
        scale = parts[".weight_scale"].float().unsqueeze(-1)  # [..., O, G, 1]
        # int4 times a bf16 scale is exact in float32.
        return (q.unflatten(-1, (-1, self.group_size)) * scale).flatten(-2).to(dtype)

    def quantize(self, base: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = tuple(weight.shape)
        self._check_groups(base, shape)
        groups = weight.float().unflatten(-1, (-1, self.group_size))  # [..., O, G, g]
        q, scale = self._best_scales(groups)
        return {".weight_packed": _pack_nibbles(q.flatten(-2) + INT4_OFFSET),
                ".weight_scale": scale.squeeze(-1).to(TORCH_DTYPES[self.scale_dtype]),
                ".weight_shape": torch.tensor(shape, dtype=TORCH_DTYPES[self.shape_dtype])}

    def _best_scales(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, of the scales amax / d for d in INT4_DIVISORS (rounded to the stored
        dtype), the one with the least squared error; ties keep compressed-tensors' 7.5.
        Returns int codes [..., O, G, g] in [-8, 7] and float32 scales [..., O, G, 1]."""
        amax = groups.abs().amax(dim=-1, keepdim=True)
        scale_dtype = TORCH_DTYPES[self.scale_dtype]
        # An all-zero group gets the dtype's eps, as compressed-tensors' calculate_qparams.
        eps = torch.finfo(scale_dtype).eps
        best_q = best_scale = best_error = None
        for divisor in INT4_DIVISORS:
            scale = (amax / divisor).to(scale_dtype).float()
            scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
            q = torch.round(groups / scale).clamp(-INT4_OFFSET, INT4_OFFSET - 1)
            error = (q * scale - groups).square().sum(dim=-1, keepdim=True)
            if best_error is None:
                best_q, best_scale, best_error = q, scale, error
                continue
            better = error < best_error
            best_q = torch.where(better, q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_error = torch.minimum(error, best_error)
        return best_q.to(torch.int32), best_scale

    def _check_groups(self, base: str, shape: Shape) -> None:
        if len(shape) < 2 or shape[-1] % self.group_size:
            raise UserError(f"group_size {self.group_size} does not divide the columns of "
                            f"{base}.weight {list(shape)}")

    def _check_parts(self, base: str, shape: Shape, shapes: Mapping[str, Shape]) -> None:
        self._check_groups(base, shape)
        expected = {plan.name.removeprefix(base): plan.shape for plan in self.planned(base, shape)}
        for suffix, dims in expected.items():
            if tuple(shapes[suffix]) != dims:
                raise UserError(f"tensor {base}{suffix} has shape {list(shapes[suffix])}, "
                                f"expected {list(dims)} for a {list(shape)} weight in groups "
                                f"of {self.group_size}")


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., O, I] ints in [0, 15] -> int32 [..., O, ceil(I/8)], column 8p + j at bits 4j."""
    pad = -codes.shape[-1] % 8
    codes = torch.nn.functional.pad(codes, (0, pad)).unflatten(-1, (-1, 8))  # [..., O, P, 8]
    packed = torch.zeros(codes.shape[:-1], dtype=torch.int32, device=codes.device)
    for j in range(8):
        packed |= codes[..., j] << (4 * j)  # j = 7 sets the sign bit: int32 wraps, bits intact
    return packed


def _packed_int4_format(settings: Mapping) -> PackedInt4:
    groups = settings.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UserError("quantization_config (compressed-tensors) has no config_groups")
    schemes = [_int4_scheme(name, group, settings.get("format")) for name, group
               in groups.items()]
    if len(set(schemes)) != 1:
        raise UserError("quantization_config (compressed-tensors) config_groups quantize "
                        "weights differently; hcconvert reads one int4 scheme")
    return PackedInt4(group_size=schemes[0],
                      ignore=_string_list(settings, "ignore", "compressed-tensors"))


def _int4_scheme(name: str, group: Mapping, default_format: str | None) -> int:
    """A config group's group size, once its scheme is checked to be symmetric int4 groups,
    weight-only, packed."""
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise UserError(f"quantization_config (compressed-tensors) group {name} has no weights")
    wanted = {"type": "int", "num_bits": 4, "symmetric": True, "strategy": "group"}
    found = {key: weights.get(key) for key in wanted}
    if found != wanted or not isinstance(weights.get("group_size"), int) \
            or weights["group_size"] <= 0 or weights.get("actorder") or weights.get("dynamic"):
        raise UserError(f"quantization_config (compressed-tensors) group {name} quantizes "
                        f"weights as {found | {'group_size': weights.get('group_size')}}; "
                        "hcconvert reads symmetric 4-bit int groups only")
    if group.get("input_activations") or group.get("output_activations"):
        raise UserError(f"quantization_config (compressed-tensors) group {name} quantizes "
                        "activations; hcconvert reads weight-only int4 only")
    fmt = group.get("format") or default_format
    if fmt != "pack-quantized":
        raise UserError(f"quantization_config (compressed-tensors) format {fmt!r} is not "
                        "supported; hcconvert reads pack-quantized")
    return weights["group_size"]


# --- mxfp4 ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mxfp4(QuantFormat):
    """e2m1 values, two per byte, 32 sharing one e8m0 exponent, blocked along the stored rows'
    columns; the weight is the transpose of the stored [..., R, C] (the module docstring)."""

    not_converted: tuple[str, ...] = ()
    rows_per_chunk: int = 1 << 16  # blocks decoded at once: bounds dequantize's temporaries

    method: ClassVar[str] = "mxfp4"
    suffixes: ClassVar[tuple[str, ...]] = ("_blocks", "_scales")
    dense_suffix: ClassVar[str] = ""

    def excludes(self, module: str) -> bool:
        return _transformers_excludes(module, self.not_converted)

    def logical_shape(self, base: str, shapes: Mapping[str, Shape]) -> Shape:
        blocks, scales = tuple(shapes["_blocks"]), tuple(shapes["_scales"])
        if len(blocks) < 3 or blocks[-1] != MX_BLOCK // 2 or scales != blocks[:-1]:
            raise UserError(f"tensors {base}_blocks {list(blocks)} and {base}_scales "
                            f"{list(scales)} are not an mxfp4 pair ([..., R, G, 16], [..., R, G])")
        return (*blocks[:-3], blocks[-2] * MX_BLOCK, blocks[-3])

    def planned(self, base: str, shape: Shape) -> list[OutputTensor]:
        self._check_blocks(base, shape)
        *lead, cols, rows = shape
        return [OutputTensor(f"{base}_blocks", "U8", (*lead, rows, cols // MX_BLOCK,
                                                      MX_BLOCK // 2)),
                OutputTensor(f"{base}_scales", "U8", (*lead, rows, cols // MX_BLOCK))]

    def dequantize(self, base: str, parts: Mapping[str, torch.Tensor],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        blocks, scales = parts["_blocks"], parts["_scales"]
        *lead, cols, rows = self.logical_shape(base, {"_blocks": blocks.shape,
                                                      "_scales": scales.shape})
        packed = blocks.reshape(-1, MX_BLOCK // 2)  # one row per block of 32 values
        exponents = scales.reshape(-1, 1).float() - 127
        table = torch.tensor(E2M1_VALUES, device=blocks.device)
        out = torch.empty(packed.shape[0], MX_BLOCK, dtype=dtype, device=blocks.device)
        for start in range(0, packed.shape[0], self.rows_per_chunk):
            chunk = packed[start:start + self.rows_per_chunk].long()
            # [n, 16, 2] -> [n, 32]: low nibble first
            values = torch.stack((table[chunk & 0xF], table[chunk >> 4]), dim=-1).flatten(-2)
            # A power of two times an e2m1 value is exact in float32.
            out[start:start + len(chunk)] = values * torch.exp2(
                exponents[start:start + len(chunk)])
        # Contiguous, as transformers' loader gives it: a merge then reads it row by row.
        return out.reshape(*lead, rows, cols).transpose(-1, -2).contiguous()

    def quantize(self, base: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_blocks(base, tuple(weight.shape))
        stored = weight.float().transpose(-1, -2).contiguous()  # [..., R, C]: blocked along C
        blocks = stored.unflatten(-1, (-1, MX_BLOCK))  # [..., R, G, 32]
        biased = _mx_exponents(blocks.abs().amax(dim=-1, keepdim=True))  # [..., R, G, 1]
        scaled = blocks / torch.exp2(biased.float() - 127)
        magnitude = torch.tensor(E2M1_MIDPOINTS, device=weight.device)
        codes = torch.bucketize(scaled.abs(), magnitude, right=True)  # ties round up
        codes = codes | (torch.signbit(scaled).long() << 3)
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., R, G, 16]
        return {"_blocks": packed.to(torch.uint8), "_scales": biased.squeeze(-1).to(torch.uint8)}

    def _check_blocks(self, base: str, shape: Shape) -> None:
        if len(shape) < 2 or shape[-2] % MX_BLOCK:
            raise UserError(f"{base} {list(shape)}: mxfp4 stores the weight transposed in "
                            f"blocks along its second-to-last dimension, which must be a "
                            f"multiple of {MX_BLOCK}")


def _mx_exponents(amax: torch.Tensor) -> torch.Tensor:
    """Biased e8m0 exponents: the smallest power of two at or above amax / 6, so that no value
    clips, rounded on the float32 bits as triton_kernels' downcast_to_mxfp (ROUND_UP) does."""
    bits = (amax / 6.0).view(torch.int32)
    return ((bits + 0x007FFFFF) & 0x7F800000) >> 23


def _mxfp4_format(settings: Mapping) -> Mxfp4:
    return Mxfp4(not_converted=_string_list(settings, "modules_to_not_convert", "mxfp4"))
