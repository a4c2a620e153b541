"""Which quantization a checkpoint's weights carry, read once from its config.json.

The loader (model/quantized_checkpoint.py), the planner and the simulated GPU all
ask the same questions of a quantized model: which format, how many bits a
weight, in groups of how many input features, with zero points or not, and how
many bytes that holds. The answer is a `WeightScheme`, made here from
config.json's `quantization_config` (or from `model.quantization="fp8"`, which
quantizes a float checkpoint at load). A format or scheme that no kernel of ours
runs is refused here, at start, naming it and what we do run. Pure: no torch.

    quant_method         stored as                                           scheme
    compressed-tensors   pack-quantized: int32 words of 4- or 8-bit values    int 4/8, group or
                         (weight_packed, weight_scale, weight_zero_point)     channel, sym/asym
                         naive-quantized: int8 `weight`, weight_scale         int 8
                         float-quantized: float8_e4m3fn `weight`,              fp8, channel or
                         weight_scale (input_scale when static)               tensor
    awq                  qweight [K, N/8] int32, qzeros, scales [K/G, N]      int 4, group, asym
    gptq                 qweight [K/8, N] int32, qzeros, scales, g_idx        int 4/8, group
    fp8                  float8_e4m3fn weight, weight_scale_inv per           fp8, blocks
                         [128, 128] block (Qwen3-*-FP8, DeepSeek's layout)
    (model.quantization="fp8", no quantization_config)                       fp8, channel
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RUNS = ("compressed-tensors W4A16, W8A16 (pack-quantized or naive-quantized, grouped or "
        "per channel, symmetric or not) and FP8 (float-quantized, per channel or tensor), "
        "AWQ and GPTQ (4-bit, GEMM layout), fp8 with block scales, and GGUF files")


@dataclass(frozen=True)
class WeightScheme:
    """How a checkpoint's linear weights are quantized."""

    method: str  # "compressed-tensors", "awq", "gptq", "fp8" (block scales), "online-fp8"
    kind: str  # "int" or "float"
    bits: int  # 4 or 8
    group: int | None  # input features per scale; None: one scale per output channel
    symmetric: bool  # False: a zero point per group
    # Activations as the checkpoint's authors quantized them: None (weight-only),
    # "dynamic" (per token, at run time) or "static" (the checkpoint's input_scale).
    activations: str | None = None
    format: str = ""  # compressed-tensors' format; GPTQ's checkpoint_format
    block: tuple[int, int] | None = None  # fp8 block scales: [rows, cols] a scale

    @property
    def name(self) -> str:
        """As users say it: W4A16, W8A16, FP8."""
        if self.kind == "float":
            return "FP8"
        return f"W{self.bits}A16"

    def bytes_per_weight(self, scale_bytes: int = 2) -> float:
        """Bytes one weight holds, with its share of the scales and zero points (stored
        as `scale_bytes` each) of its group (a channel counted as a group of 4096; a
        block's float32 scale shared by its rows x columns)."""
        if self.block is not None:
            return self.bits / 8 + 4 / (self.block[0] * self.block[1])
        group = self.group or 4096
        per_group = scale_bytes * (1 if self.symmetric else 2)
        return self.bits / 8 + per_group / group


def scheme_of(hf_config: dict[str, Any], requested: str = "auto",
              source: str = "the model") -> WeightScheme | None:
    """The scheme of a config.json's dict, or None for a float checkpoint.

    `requested` is model.quantization: "fp8" asks for a float checkpoint quantized at
    load (refused for one already quantized); "auto" and "dequantize" take the
    checkpoint's own (the loader decides whether it stays quantized).
    """
    config = hf_config.get("quantization_config")
    if requested == "fp8":
        if config:
            raise ValueError(
                f"model.quantization='fp8' quantizes a float checkpoint at load, and "
                f"{source} is already quantized ({_method(config)}): leave "
                "model.quantization at 'auto' to serve it as it is")
        return WeightScheme("online-fp8", "float", 8, None, True, activations="dynamic")
    if not config:
        return None
    method = _method(config)
    if method == "compressed-tensors":
        return _compressed_tensors(config, source)
    if method == "awq":
        return _awq(config, source)
    if method == "gptq":
        return _gptq(config, source)
    if method == "fp8":
        return _block_fp8(config, source)
    raise ValueError(f"{source}: quantization_config.quant_method={method!r} is not run; "
                     f"pagedserve runs {RUNS}")


def _method(config: dict[str, Any]) -> str:
    return str(config.get("quant_method", "?")).replace("_", "-")


def _refuse(source: str, what: str) -> ValueError:
    return ValueError(f"{source}: {what} is not run; pagedserve runs {RUNS}")


def _compressed_tensors(config: dict[str, Any], source: str) -> WeightScheme:
    groups = list((config.get("config_groups") or {}).values())
    if not groups:
        raise _refuse(source, "a compressed-tensors quantization_config without config_groups")
    schemes = {_ct_group(group, config.get("format"), source) for group in groups}
    if len(schemes) > 1:
        raise _refuse(source, f"a compressed-tensors checkpoint mixing {len(schemes)} schemes "
                              f"({', '.join(sorted(s.name for s in schemes))})")
    return schemes.pop()


def _ct_group(group: dict[str, Any], default_format: str | None, source: str) -> WeightScheme:
    weights = group.get("weights") or {}
    fmt = group.get("format") or default_format or ""
    kind, bits = weights.get("type", "int"), weights.get("num_bits")
    strategy = weights.get("strategy", "tensor")
    what = f"compressed-tensors weights of {bits}-bit {kind}, strategy {strategy!r}, format {fmt!r}"
    activations = group.get("input_activations")
    if kind == "int":
        if bits not in (4, 8) or strategy not in ("group", "channel"):
            raise _refuse(source, what)
        if fmt not in ("pack-quantized", "naive-quantized") or (
                fmt == "naive-quantized" and bits != 8):
            raise _refuse(source, what)
        if activations:
            raise _refuse(source, f"{what} with {activations.get('num_bits')}-bit "
                                  f"{activations.get('type')} activations (W{bits}A8)")
        if weights.get("actorder") not in (None, "weight", False):
            raise _refuse(source, f"{what} with actorder={weights.get('actorder')!r}")
        group_size = weights.get("group_size") if strategy == "group" else None
        return WeightScheme("compressed-tensors", "int", bits, group_size,
                            bool(weights.get("symmetric", True)), None, fmt)
    if kind == "float" and bits == 8 and strategy in ("channel", "tensor"):
        if fmt not in ("float-quantized", "naive-quantized"):
            raise _refuse(source, what)
        act = None
        if activations:
            if activations.get("type") != "float" or activations.get("num_bits") != 8:
                raise _refuse(source, f"{what} with {activations.get('num_bits')}-bit "
                                      f"{activations.get('type')} activations")
            act = "dynamic" if activations.get("dynamic") else "static"
        return WeightScheme("compressed-tensors", "float", 8, None, True, act, fmt)
    raise _refuse(source, what)


def _awq(config: dict[str, Any], source: str) -> WeightScheme:
    bits, version = config.get("bits", config.get("w_bit")), str(config.get("version", "gemm"))
    if bits != 4 or version.lower() != "gemm":
        raise _refuse(source, f"AWQ with bits={bits}, version={version!r}")
    group = config.get("group_size", config.get("q_group_size", 128))
    return WeightScheme("awq", "int", 4, None if group in (-1, None) else int(group),
                        not config.get("zero_point", True), format="gemm")


def _gptq(config: dict[str, Any], source: str) -> WeightScheme:
    bits = config.get("bits")
    fmt = config.get("checkpoint_format", "gptq")
    if bits not in (4, 8) or fmt not in ("gptq", "gptq_v2"):
        raise _refuse(source, f"GPTQ with bits={bits}, checkpoint_format={fmt!r}")
    group = config.get("group_size", 128)
    return WeightScheme("gptq", "int", bits, None if group in (-1, None) else int(group),
                        bool(config.get("sym", True)), format=fmt)


def _block_fp8(config: dict[str, Any], source: str) -> WeightScheme:
    block = config.get("weight_block_size")
    if config.get("fmt", "e4m3") != "e4m3" or not block or len(block) != 2:
        raise _refuse(source, f"fp8 with fmt={config.get('fmt')!r}, weight_block_size={block!r}")
    act = config.get("activation_scheme", "dynamic")
    return WeightScheme("fp8", "float", 8, int(block[1]), True, act, block=(int(block[0]),
                                                                            int(block[1])))
