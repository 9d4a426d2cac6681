"""The baselines: plain transformers `generate` and HF PEFT, on the same quantized base.

  hf_generate_base    transformers `generate` on the base alone: all requests in one
                      left-padded batch, no adapters (on a CPU with AVX512-BF16, bitsandbytes
                      computes its 4-bit projections in bf16 whatever the compute dtype: its
                      input and block scales rounded to bf16)
  hf_generate_base_fp32_kernels
                      the same with that bf16 path off (`bf16_cpu_path=False`): bitsandbytes
                      dequantizes and multiplies in the compute dtype, as on every other CPU
  peft_mixed_batch    PEFT `generate(adapter_names=...)`: all requests in one left-padded batch,
                      each row on its own adapter (its base as hf_generate_base's)
  peft_mixed_batch_fp32_kernels
                      the same with bitsandbytes' bf16 CPU path off
  peft_sequential     PEFT one request at a time, `set_adapter` before each

Every request generates exactly the workload's number of tokens (greedy,
`min_new_tokens == max_new_tokens`). Knows nothing about loraserve's engine.
"""

from __future__ import annotations

from pathlib import Path

from loraserve.model.bitsandbytes_offline import bnb

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from common import Workload, check_generated
from loraserve.model.loading import LoadedModel, load_base_model


def load_hf(
    model_dir: Path, quantization: str, compute_dtype: str, device: str, bf16_cpu_path: bool = True
) -> LoadedModel:
    """A fresh quantized base, loaded as the engine loads it, for `generate` alone; without
    `bf16_cpu_path`, bitsandbytes' AVX512-BF16 path for its 4-bit projections is off."""
    loaded = load_base_model(str(model_dir), quantization, compute_dtype, device)
    if not bf16_cpu_path:
        for module in loaded.model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return loaded


def load_peft(
    model_dir: Path, adapter_dirs: dict[str, Path], quantization: str, compute_dtype: str,
    device: str, bf16_cpu_path: bool = True,
) -> tuple[PeftModel, LoadedModel]:  # fmt: skip
    """A fresh quantized base with every adapter loaded, LoRA weights in the compute dtype
    (`bf16_cpu_path`: as `load_hf`)."""
    loaded = load_hf(model_dir, quantization, compute_dtype, device, bf16_cpu_path)
    (first_name, first_dir), *rest = adapter_dirs.items()
    model = PeftModel.from_pretrained(loaded.model, first_dir, adapter_name=first_name)
    for name, directory in rest:
        model.load_adapter(directory, adapter_name=name)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(loaded.compute_dtype)
    model.eval()
    return model, loaded


def generate_kwargs(new_tokens: int, pad_token_id: int) -> dict:
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": pad_token_id,
    }


def _batched(model: PreTrainedModel, loaded: LoadedModel, workload: Workload, **kwargs) -> int:
    """All requests in one left-padded `generate`; returns the tokens generated."""
    pad = loaded.tokenizer.pad_token_id
    width = max(len(p) for p in workload.prompts)
    input_ids = torch.full((len(workload.prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(workload.prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=input_ids.to(loaded.device),
        attention_mask=attention_mask.to(loaded.device),
        **generate_kwargs(workload.new_tokens, pad),
        **kwargs,
    )
    return (out.shape[1] - width) * len(workload.prompts)


def run_hf_generate(loaded: LoadedModel, workload: Workload) -> int:
    """Plain transformers `generate` on the base, every request in one batch."""
    generated = _batched(loaded.model, loaded, workload)
    check_generated("hf_generate_base", [generated // len(workload.prompts)], workload.new_tokens)
    return generated


def run_peft_mixed(model: PeftModel, loaded: LoadedModel, workload: Workload) -> int:
    """All requests in one left-padded batch, each row on its own adapter."""
    generated = _batched(model, loaded, workload, adapter_names=list(workload.adapters))
    check_generated("peft_mixed_batch", [generated // len(workload.prompts)], workload.new_tokens)
    return generated


def run_peft_sequential(model: PeftModel, loaded: LoadedModel, workload: Workload) -> int:
    """One request at a time, switching the active adapter before each."""
    pad = loaded.tokenizer.pad_token_id
    generated = []
    for prompt, adapter in zip(workload.prompts, workload.adapters):
        model.set_adapter(adapter)
        input_ids = torch.tensor([prompt], device=loaded.device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **generate_kwargs(workload.new_tokens, pad),
        )
        generated.append(out.shape[1] - len(prompt))
    check_generated("peft_sequential", generated, workload.new_tokens)
    return sum(generated)
