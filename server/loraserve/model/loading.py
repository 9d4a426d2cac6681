"""Load one base causal LM, quantized with bitsandbytes, and its tokenizer.

Accepts a local Hugging Face directory (or a hub id, for users who are online), plain or already
bnb-quantized. Never runs remote code. The attention implementation the model is loaded with is
the best its architecture supports (`attention_implementation`: flash attention on CUDA where
installed, SDPA where the architecture allows it, eager otherwise), and the log says which; the
engine's runner then switches it to the paged implementation for serving.

On the CPU, bitsandbytes needs each quantized layer's in-features to be a multiple of its block
size (64) and out-features a multiple of 32: layers that do not fit stay in the compute dtype,
and a warning names them.

The output projection (lm_head) stays in the compute dtype, as bitsandbytes and PEFT leave it,
unless `quantize_output` asks for it in 4 bits too (`quantize_output_projection`): 0.28 of the
bytes each decode step reads for it in bf16 (0.14 in fp32), or in 8 bits on CPUs
(`int8_output.Int8Linear`: 0.5 and 0.25), at the price of logits that no longer match the
unquantized projection's.

Knows nothing about adapters, batching or serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from loraserve.model.bitsandbytes_offline import bnb

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import is_flash_attn_2_available

from loraserve.model.host_memory import keep_freed_memory, one_arena, warn_if_arenas_came_first
from loraserve.model.int8_output import Int8Linear
from loraserve.model.linear import amx_tiles, bf16_pairs, cpu_vendor, pairs_beat_widening

log = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
OUTPUT_QUANTIZATIONS = ("off", "4bit", "int8")  # quantize_output: none, the base's, 8 bits
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BLOCK_IN, CPU_BLOCK_OUT = 64, 32
QUANTIZED_OUTPUT_BLOCK = 64  # bitsandbytes' 4-bit block, as from_pretrained quantizes the rest


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    quantization: str  # what the weights really are: one of QUANTIZATIONS
    compute_dtype: torch.dtype
    device: torch.device
    unquantized_layers: tuple[str, ...]  # layers kept in compute dtype (bnb CPU shape limits)
    output_projection: str  # nf4 / fp4 / int8 (quantize_output), else the dtype it computes in


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lora_target_shapes(model: str) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every module an adapter may target, from the config alone
    (no weights are read): what the engine wraps by default, the projections and the input
    embedding as (vocabulary, hidden size)."""
    config = AutoConfig.from_pretrained(model, trust_remote_code=False)
    shapes, _ = _linear_layout(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    embedding = skeleton.get_input_embeddings()
    for name, module in skeleton.named_modules():
        if module is embedding and isinstance(module, nn.Embedding):
            shapes[name] = (module.num_embeddings, module.embedding_dim)
    return shapes


def _linear_layout(config) -> tuple[dict[str, tuple[int, int]], str]:
    """(module path -> (in, out) of every nn.Linear, path of the output embedding), on meta."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    output = skeleton.get_output_embeddings()
    shapes, output_name = {}, "lm_head"
    for name, module in skeleton.named_modules():
        if module is output:
            output_name = name
        elif isinstance(module, nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
    return shapes, output_name


def attention_implementation(config, device: torch.device) -> str:
    """The attention transformers runs this architecture with until the engine takes over:
    flash attention on CUDA where it is installed and the architecture supports it, else SDPA
    where the architecture supports it (attention variants such as logit softcapping or
    attention sinks rule it out), else eager, which every architecture has."""
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if device.type == "cuda" and model_class._supports_flash_attn and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa" if model_class._supports_sdpa else "eager"


def _quantization_config(
    config,
    quantization: str,
    compute_dtype: torch.dtype,
    device: torch.device,
    double_quant: bool = False,
) -> BitsAndBytesConfig:
    shapes, output_name = _linear_layout(config)
    misfits = ()
    if device.type == "cpu" and quantization in ("nf4", "fp4"):
        misfits = tuple(
            name
            for name, (fan_in, fan_out) in shapes.items()
            if fan_in % CPU_BLOCK_IN or fan_out % CPU_BLOCK_OUT
        )
        if misfits:
            log.warning(
                "bitsandbytes on the CPU needs in-features %% %d == 0 and out-features %% %d == 0; "
                "keeping %d layer(s) in the compute dtype: %s",
                CPU_BLOCK_IN,
                CPU_BLOCK_OUT,
                len(misfits),
                ", ".join(misfits[:8]),
            )
    skip = [output_name, *misfits]
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=skip,
    )


def _prequantized(config) -> str | None:
    """The quantization of a checkpoint saved already bnb-quantized, else None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise ValueError(
            f"checkpoint is quantized with {qc.get('quant_method')!r}; loraserve serves "
            "bitsandbytes (nf4 / fp4 / int8) or unquantized checkpoints"
        )
    if qc.get("load_in_8bit"):
        return "int8"
    return qc.get("bnb_4bit_quant_type", "fp4")


def bf16_compute_hint(tiles: bool, pairs: bool, vendor: str) -> str | None:
    """What --compute-dtype bf16 buys over fp32 on a CPU whose kernels multiply bf16 in AMX
    tiles (`tiles`) or by AVX512-BF16's pair dot products (`pairs`), made by `vendor`, where it
    was measured faster (docs/performance.md); None elsewhere. On the Intel Xeon with its tiles
    turned off, bf16 by pair dot products took 1.3-1.4x fp32's time for a full decode step."""
    if tiles:
        how, speed = "in AMX tiles", "twice"
    elif pairs and pairs_beat_widening(vendor):
        how, speed = "with AVX512-BF16", "1.6 times"
    else:
        return None
    return (
        f"this CPU multiplies bf16 {how}: --compute-dtype bf16 runs about {speed} as fast as "
        "fp32 (outputs then match PEFT computing in bf16, not in fp32; docs/performance.md)"
    )


def load_base_model(
    model: str,
    quantization: str = "nf4",
    compute_dtype: str = "fp32",
    device: str = "auto",
    double_quant: bool = False,
    quantize_output: str = "off",
) -> LoadedModel:
    """Load `model` (a local directory or hub id) quantized as asked, in eval mode.

    double_quant: QLoRA's double quantization of the 4-bit block scales (nf4 and fp4 only).
    quantize_output: the output projection as it is ("off"), in the base's 4-bit format
    ("4bit": nf4 and fp4 only) or in 8 bits, one scale an output ("int8": CPUs only).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if double_quant and quantization not in ("nf4", "fp4"):
        raise ValueError(f"double quantization applies to nf4 and fp4, not {quantization!r}")
    if quantize_output not in OUTPUT_QUANTIZATIONS:
        raise ValueError(
            f"quantize_output must be one of {OUTPUT_QUANTIZATIONS}, got {quantize_output!r}"
        )
    if quantize_output == "4bit" and quantization not in ("nf4", "fp4"):
        raise ValueError(f"quantize_output 4bit applies to nf4 and fp4, not {quantization!r}")
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute dtype must be one of {tuple(DTYPES)}, got {compute_dtype!r}")
    dtype = DTYPES[compute_dtype]
    target = resolve_device(device)
    if quantize_output == "int8" and target.type != "cpu":
        raise ValueError(
            "quantize_output int8 runs on CPUs (its kernel is the CPU's); on a GPU use 4bit"
        )
    one_arena()  # before the load starts threads that allocate (host_memory)
    warn_if_arenas_came_first()
    if target.type == "cpu":
        keep_freed_memory()
    config = AutoConfig.from_pretrained(model, trust_remote_code=False)
    kwargs: dict = {}
    actual = _prequantized(config)
    if actual is not None:
        if actual != quantization:
            log.warning("checkpoint is already %s-quantized; serving it as such", actual)
    elif quantization != "none":
        kwargs["quantization_config"] = _quantization_config(
            config, quantization, dtype, target, double_quant
        )
        actual = quantization
    else:
        actual = "none"
    if target.type == "cpu" and dtype == torch.float32:
        hint = bf16_compute_hint(amx_tiles(), bf16_pairs(), cpu_vendor())
        if hint is not None:
            log.info(hint)
    attention = attention_implementation(config, target)
    log.info("%s: loading with %s attention", type(config).__name__, attention)
    loaded = AutoModelForCausalLM.from_pretrained(
        model,
        dtype=dtype,
        device_map={"": target},
        attn_implementation=attention,
        trust_remote_code=False,
        **kwargs,
    )
    loaded.eval()
    loaded.requires_grad_(False)
    output_projection = compute_dtype  # a DTYPES name, checked above
    if quantize_output == "4bit":
        if actual not in ("nf4", "fp4"):
            raise ValueError(f"quantize_output 4bit applies to nf4 and fp4 bases, not {actual!r}")
        if quantize_output_projection(loaded, actual, dtype, double_quant):
            output_projection = actual
    elif quantize_output == "int8":
        quantize_output_int8(loaded)
        output_projection = "int8"
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    return LoadedModel(
        loaded, tokenizer, actual, dtype, target, _unquantized_layers(loaded, actual),
        output_projection,
    )  # fmt: skip


def quantize_output_projection(
    model: PreTrainedModel, quant_type: str, compute_dtype: torch.dtype, double_quant: bool
) -> bool:
    """Put the output projection in `quant_type` (nf4 / fp4) 4-bit blocks of
    `QUANTIZED_OUTPUT_BLOCK`, by bitsandbytes' own quantization of its weight [vocab, hidden];
    left as it is, with a warning, where bitsandbytes cannot quantize it on its device (False
    returned). Tied to the input embedding, it becomes a quantized copy: the embedding keeps
    its weight."""
    output = _linear_output(model)
    weight = output.weight
    fan_in, fan_out = output.in_features, output.out_features
    if weight.device.type == "cpu" and (fan_in % CPU_BLOCK_IN or fan_out % CPU_BLOCK_OUT):
        log.warning("quantize_output: bitsandbytes on the CPU needs in-features %% %d == 0 and "
                    "out-features %% %d == 0; the output projection (%d x %d) stays in %s",
                    CPU_BLOCK_IN, CPU_BLOCK_OUT, fan_out, fan_in, weight.dtype)  # fmt: skip
        return False
    quantized = bnb.nn.Linear4bit(
        fan_in,
        fan_out,
        bias=output.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    params: Any = bnb.nn.Params4bit(  # quantized as it moves to a device
        weight.data,
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
        blocksize=QUANTIZED_OUTPUT_BLOCK,
    )
    quantized.weight = params.to(weight.device)
    if output.bias is not None:
        quantized.bias = nn.Parameter(output.bias.data, requires_grad=False)
    model.set_output_embeddings(quantized)
    log.info("output projection (%d x %d) in %s: %.1f MiB", fan_out, fan_in, quant_type,
             sum(t.nbytes for t in (params.data, params.quant_state.absmax)) / 2**20)  # fmt: skip
    return True


def _linear_output(model: PreTrainedModel) -> nn.Linear:
    """The output projection, which quantize_output needs to be a plain linear layer."""
    output = model.get_output_embeddings()
    if type(output) is not nn.Linear:
        raise ValueError(
            f"quantize_output: {type(model).__name__}'s output projection is a "
            f"{type(output).__name__}, not a linear layer"
        )
    return output


def quantize_output_int8(model: PreTrainedModel) -> None:
    """Put the output projection in 8 bits (`Int8Linear`). Tied to the input embedding, it
    becomes a quantized copy: the embedding keeps its weight."""
    output = _linear_output(model)
    quantized = Int8Linear.quantize(output)
    model.set_output_embeddings(quantized)
    held = sum(p.nbytes for p in quantized.parameters())
    log.info("output projection (%d x %d) in int8: %.1f MiB", quantized.out_features,
             quantized.in_features, held / 2**20)  # fmt: skip


@dataclass(frozen=True)
class QuantizedBytes:
    """What the 4-bit projections hold (packed weights, scales, nested statistics) against what
    the same projections take in bf16."""

    quantized: int
    bf16: int


def quantized_bytes(model: nn.Module) -> QuantizedBytes:
    """Every tensor counted once (bitsandbytes shares its code tables between layers)."""
    held: dict[int, int] = {}
    bf16 = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        params: Any = module.weight  # a bitsandbytes Params4bit
        state = params.quant_state
        tensors = [params.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        held.update((t.data_ptr(), t.nbytes) for t in tensors)
        bf16 += 2 * module.in_features * module.out_features
    return QuantizedBytes(sum(held.values()), bf16)


def _unquantized_layers(model: PreTrainedModel, quantization: str) -> tuple[str, ...]:
    """Linear layers a quantized model kept in the compute dtype (the output embedding aside)."""
    if quantization == "none":
        return ()
    output = model.get_output_embeddings()
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return tuple(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, quantized)
        and module is not output
    )
