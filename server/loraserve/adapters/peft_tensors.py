"""The tensors of a PEFT LoRA file: what each name means, and the checks on one module's set.

PEFT saves, per module path (after `base_model.model.`, an adapter name may precede the
suffix):

- `lora_A.weight` [r, in] and `lora_B.weight` [out, r] on a projection;
- `lora_embedding_A` [r, vocab] and `lora_embedding_B` [hidden, r] on the input embedding, and
  `base_layer.weight` [vocab, hidden] there: its copy of the base embedding;
- `lora_magnitude_vector` [out] with `use_dora`;
- `lora_B.bias` [out] with `lora_bias`;
- `base_layer.bias` or `bias` [out], a trained bias replacing the base module's, with
  `bias="lora_only"` (targeted modules only) or `bias="all"` (any module).

`checked_module` checks one module's tensors against each other, the config and the base's
target shape, every problem appended to the caller's lists; `module_weights` converts the
checked modules of an adapter to the compute dtype with the scaling folded into B and into
lora_B's bias (under fp32 compute a plain pair stored in 16 bits stays as stored, B without the
scaling: `held_as_stored`), and finds those that hold a NaN or an infinity.

Knows nothing about files, slots or the base model's weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from loraserve.adapters.peft_config import CONFIG_FILE, AdapterConfig
from loraserve.model.kernels import native
from loraserve.model.lora import transposed_bs
from loraserve.model.slot_terms import ModuleWeights

ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)
PEFT_PREFIX = "base_model.model."
LORA_TENSOR = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector)(?:\.(?P<adapter>[^.]+))??(?:\.(?P<param>weight|bias))?$"
)
BASE_TENSOR = re.compile(r"^(?P<module>.+?)(?P<wrapped>\.base_layer)?\.(?P<param>weight|bias)$")
# (kind, param) of a LORA_TENSOR match -> the tensor's role
LORA_ROLES = {
    ("lora_A", "weight"): "lora_A",
    ("lora_B", "weight"): "lora_B",
    ("lora_B", "bias"): "lora_bias",
    ("lora_embedding_A", None): "lora_embedding_A",
    ("lora_embedding_B", None): "lora_embedding_B",
    ("lora_magnitude_vector", None): "magnitude",
    ("lora_magnitude_vector", "weight"): "magnitude",
}
PAIRS = {False: ("lora_A", "lora_B"), True: ("lora_embedding_A", "lora_embedding_B")}
SAVED_AS = {  # role -> how PEFT names it, for messages
    "magnitude": "lora_magnitude_vector",
    "lora_bias": "lora_B.bias",
    "bias": "bias",
    "base_copy": "base_layer.weight",
}


def tensor_role(name: str) -> tuple[str, str] | None:
    """(module path, role) of a tensor PEFT's LoRA saves, or None for any other name."""
    match = LORA_TENSOR.match(name)
    if match is not None:
        role = LORA_ROLES.get((match["kind"], match["param"]))
        return None if role is None else (match["module"].removeprefix(PEFT_PREFIX), role)
    match = BASE_TENSOR.match(name)
    if match is None or (match["param"] == "weight" and not match["wrapped"]):
        return None
    role = "bias" if match["param"] == "bias" else "base_copy"
    return match["module"].removeprefix(PEFT_PREFIX), role


def _config_problems(module: str, parts: dict, has_pair: bool, config: AdapterConfig) -> list:
    """What the module's tensors say that the config denies, or the reverse."""
    fields, found = config.fields, []
    if "magnitude" in parts and not fields.use_dora:
        found.append(f"{module}: has a lora_magnitude_vector, but use_dora is false")
    if has_pair and fields.use_dora and "magnitude" not in parts:
        found.append(f"{module}: use_dora is set, but it has no lora_magnitude_vector")
    if "lora_bias" in parts and not fields.lora_bias:
        found.append(f"{module}: has a lora_B bias, but lora_bias is false")
    if "bias" in parts and fields.bias == "none":
        found.append(f"{module}: has a trained bias, but bias is 'none'")
    if "bias" in parts and fields.bias == "lora_only" and not has_pair:
        found.append(f"{module}: has a trained bias but no LoRA, and bias is 'lora_only'")
    return found


def _shape_problems(module: str, parts: dict, embedding: bool, target: tuple[int, int]) -> list:
    """Where the module's tensors do not fit the base module's (in, out)."""
    fan_in, fan_out = target
    a_role, b_role = PAIRS[embedding]
    found = []
    if a_role in parts and (parts[a_role].shape[1] != fan_in or parts[b_role].shape[0] != fan_out):
        found.append(
            f"{module}: adapter is [in={parts[a_role].shape[1]}, out={parts[b_role].shape[0]}], "
            f"base module is [in={fan_in}, out={fan_out}]"
        )
    for role in ("magnitude", "lora_bias", "bias"):
        if role in parts and tuple(parts[role].shape) != (fan_out,):
            found.append(
                f"{module}: {SAVED_AS[role]} is {tuple(parts[role].shape)}, the base module has "
                f"{fan_out} outputs"
            )
    if "base_copy" in parts and tuple(parts["base_copy"].shape) != target:
        found.append(
            f"{module}: the saved base embedding is {tuple(parts['base_copy'].shape)}, the "
            f"base's is {target}"
        )
    return found


def _form_problems(module: str, parts: dict[str, torch.Tensor], embedding: bool) -> list[str]:
    """What is wrong with the module's tensors on their own: missing halves, kinds that do not
    go together, dtypes, ranks and values."""
    a_role, b_role = PAIRS[embedding]
    other = PAIRS[not embedding]
    if embedding and (other[0] in parts or other[1] in parts):
        return [f"{module}: mixes lora_A / lora_B with lora_embedding_A / lora_embedding_B"]
    if (a_role in parts) != (b_role in parts):
        found = a_role.removeprefix("lora_") if a_role in parts else b_role.removeprefix("lora_")
        return [f"{module}: needs both {a_role} and {b_role}, found only lora_{found}"]
    extras = set(parts) - {"bias"} if a_role not in parts else set()
    if extras:
        named = ", ".join(SAVED_AS[role] for role in sorted(extras))
        return [f"{module}: {named} without {a_role} and {b_role}"]
    if embedding and "lora_bias" in parts:
        return [f"{module}: PEFT has no lora_bias on embeddings"]
    if "base_copy" in parts and not embedding:
        return [f"{module}: a saved base weight is only served next to an embedding LoRA"]
    dtypes = {t.dtype for t in parts.values()}
    if not dtypes <= set(ALLOWED_DTYPES):
        a, b = parts.get(a_role), parts.get(b_role)
        shown = f"{a.dtype}/{b.dtype}" if a is not None and b is not None else str(dtypes)
        return [f"{module}: dtype {shown} not allowed (fp16, bf16, fp32)"]
    if a_role in parts:
        a, b = parts[a_role], parts[b_role]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            return [
                f"{module}: {a_role} {tuple(a.shape)} and {b_role} {tuple(b.shape)} "
                "are not [r, in] and [out, r]"
            ]
    return []


def _terms_not_finite(modules: dict[str, ModuleWeights]) -> list[str]:
    """The modules whose DoRA magnitude, biases or base embedding copy hold a NaN or an
    infinity: one pass over every such tensor (the pairs are checked as they are converted)."""
    owners, tensors = [], []
    for name, weights in modules.items():
        for t in (weights.magnitude, weights.bias, weights.lora_bias, weights.base_copy):
            if t is not None and t.numel():
                owners.append(name)
                tensors.append(t)
    return [owners[i] for i in _nonfinite(tensors)]


def _nonfinite(tensors: list[torch.Tensor]) -> list[int]:
    """The positions in `tensors` of those holding a NaN or an infinity: the compiled pass
    for contiguous float32 CPU tensors, torch's otherwise."""
    if not tensors:
        return []
    ops = native()
    if ops is not None and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors
    ):
        return ops.nonfinite(tensors)
    return nonfinite_reference(tensors)


def nonfinite_reference(tensors: list[torch.Tensor]) -> list[int]:
    """The positions in `tensors` of those holding a NaN or an infinity, by torch: the compiled
    `nonfinite`'s oracle, and its stand-in for other dtypes and devices."""
    # The 2-norm is a fast filter (one fused pass; the inf-norm is ten times slower on CPUs):
    # a NaN or infinity makes it non-finite, and so does a finite value past ~1e19, which the
    # exact check of the few flagged tensors then clears.
    norms = torch.stack(torch._foreach_norm(tensors, ord=2))
    flagged = (~norms.isfinite()).nonzero().flatten().tolist()
    return [i for i in flagged if not bool(tensors[i].isfinite().all())]


@dataclass(frozen=True)
class CheckedModule:
    """One module's tensors (role -> tensor, see `tensor_role`) once every check passed."""

    parts: dict[str, torch.Tensor]
    embedding: bool
    target: tuple[int, int]  # the base module's (in_features, out_features)
    scale: float  # what PEFT multiplies its delta by (1.0 without a pair)

    @property
    def has_pair(self) -> bool:
        return PAIRS[self.embedding][0] in self.parts


def checked_module(
    module: str,
    parts: dict[str, torch.Tensor],
    targets: dict[str, tuple[int, int]],
    config: AdapterConfig,
    max_rank: int,
    problems: list[str],
    incompatible: list[str],
) -> CheckedModule | None:
    """The module's tensors checked against each other, the config and the base's target
    shape; None after adding what is wrong to `problems` (malformed) or `incompatible` (not
    this base)."""
    embedding = any(role in parts for role in PAIRS[True])
    a_role, b_role = PAIRS[embedding]
    found = _form_problems(module, parts, embedding)
    if found:
        problems.extend(found)
        return None
    if module not in targets:
        incompatible.append(f"{module}: the base model has no LoRA-targetable module there")
        return None
    has_pair = a_role in parts
    found = _config_problems(module, parts, has_pair, config)
    shapes = _shape_problems(module, parts, embedding, targets[module])
    problems.extend(found)
    incompatible.extend(shapes)
    if found or shapes:
        return None
    if not has_pair:
        return CheckedModule(parts, embedding, targets[module], 1.0)
    rank = parts[a_role].shape[0]
    if rank > max_rank:
        incompatible.append(f"{module}: rank {rank} exceeds the server's max rank {max_rank}")
        return None
    if rank != config.rank(module):
        problems.append(
            f"{module}: {a_role} and {b_role} have rank {rank}, but {CONFIG_FILE} gives "
            f"r={config.rank(module)} (r or rank_pattern) for this module"
        )
        return None
    return CheckedModule(parts, embedding, targets[module], config.scale(module, rank))


@dataclass(frozen=True)
class ConvertedModules:
    """An adapter's checked modules in the compute dtype, and which of them hold a NaN or an
    infinity (as stored, or once scaled), in the order met."""

    modules: dict[str, ModuleWeights]
    not_finite: list[str]


@dataclass(frozen=True)
class PairFactors:
    """Each pair's A [r, in] and B [r, out] (transposed, times its scale) in the compute dtype,
    or as stored (`stored_pairs`), and the positions of the pairs either of which holds a NaN
    or an infinity."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    not_finite: list[int]


def module_weights(checked: dict[str, CheckedModule], dtype: torch.dtype) -> ConvertedModules:
    """Checked modules in the compute dtype `dtype`, with the scaling folded into B and into
    lora_B's bias, except the pairs `held_as_stored`; and which are not finite. The pairs in
    one pass each (`pair_factors`, `stored_pairs`)."""
    paired = [name for name, module in checked.items() if module.has_pair]
    as_stored = [name for name in paired if held_as_stored(checked[name], dtype)]
    folded = [name for name in paired if name not in as_stored]
    roles = [PAIRS[checked[name].embedding] for name in folded]
    pairs = pair_factors(
        [checked[name].parts[a_role] for name, (a_role, _) in zip(folded, roles)],
        [checked[name].parts[b_role] for name, (_, b_role) in zip(folded, roles)],
        [checked[name].scale for name in folded],
        dtype,
    )
    stored = stored_pairs(
        [checked[name].parts["lora_A"] for name in as_stored],
        [checked[name].parts["lora_B"] for name in as_stored],
        [checked[name].scale for name in as_stored],
    )
    factors = dict(zip(folded, zip(pairs.a, pairs.b))) | dict(
        zip(as_stored, zip(stored.a, stored.b))
    )
    modules = {
        name: _converted(checked[name], factors.get(name), dtype, name in as_stored)
        for name in checked
    }
    flagged = (
        {folded[i] for i in pairs.not_finite}
        | {as_stored[i] for i in stored.not_finite}
        | set(_terms_not_finite(modules))
    )
    return ConvertedModules(modules, [name for name in modules if name in flagged])


def held_as_stored(module: CheckedModule, dtype: torch.dtype) -> bool:
    """Whether the module's pair is kept as the adapter stores it, in 16 bits with B not yet
    scaled (the slot write scales it, or keeps the scaling apart): a plain projection pair
    (no DoRA or bias terms, which are computed in the compute dtype) stored in bf16 or fp16
    under fp32 compute. Exact, and half the host tier's bytes of fp32 copies."""
    parts = module.parts
    return (
        dtype == torch.float32
        and not module.embedding
        and parts.keys() == {"lora_A", "lora_B"}
        and parts["lora_A"].dtype == parts["lora_B"].dtype
        and parts["lora_A"].dtype in HALF_DTYPES
    )


def stored_pairs(
    a_parts: list[torch.Tensor], b_parts: list[torch.Tensor], scales: list[float]
) -> PairFactors:
    """Each 16-bit A [r, in] copied and each B [out, r] transposed, in its own dtype and not
    scaled, in new buffers (one per dtype); and which hold a NaN or an infinity as stored, or
    once B is scaled into float32 (`scales`: each pair's alpha / r). On CPUs one compiled call
    per dtype (`lora_pairs_16`); torch otherwise, which is also its oracle."""
    a: list[torch.Tensor] = [torch.empty(0)] * len(a_parts)
    b: list[torch.Tensor] = [torch.empty(0)] * len(b_parts)
    flagged: list[int] = []
    ops = native()
    for half in {t.dtype for t in a_parts}:
        mine = [i for i, t in enumerate(a_parts) if t.dtype == half]
        parts = ([a_parts[i] for i in mine], [b_parts[i] for i in mine], [scales[i] for i in mine])
        if ops is not None and all(t.device.type == "cpu" for t in (*parts[0], *parts[1])):
            got = PairFactors(*ops.lora_pairs_16(*parts))
        else:
            got = stored_pairs_reference(*parts)
        for j, i in enumerate(mine):
            a[i], b[i] = got.a[j], got.b[j]
        flagged += [mine[j] for j in got.not_finite]
    return PairFactors(a, b, sorted(flagged))


def stored_pairs_reference(
    a_parts: list[torch.Tensor], b_parts: list[torch.Tensor], scales: list[float]
) -> PairFactors:
    """`stored_pairs` for pairs of one 16-bit dtype, by torch: the compiled call's oracle, and
    its stand-in elsewhere."""
    half = a_parts[0].dtype
    copies = in_one_buffer([*a_parts, *(t.t() for t in b_parts)], half)
    a, b = copies[: len(a_parts)], copies[len(a_parts) :]
    flagged = [
        i
        for i, scale in enumerate(scales)
        if not (a[i].isfinite().all() and (b[i].float() * scale).isfinite().all())
    ]
    return PairFactors(a, b, flagged)


def pair_factors(
    a_parts: list[torch.Tensor],
    b_parts: list[torch.Tensor],
    scales: list[float],
    dtype: torch.dtype,
) -> PairFactors:
    """Each A [r, in] copied and each B [out, r] transposed and times its scale, in `dtype`, all
    in new buffers (as read, each is a view of the file's buffer, which would otherwise stay
    alive as long as the adapter stays in the host tier, B as stored too), and which hold a NaN
    or an infinity. On CPUs in float32 or bf16 one compiled call writes them into one buffer
    and checks each while it is in cache (`lora_factors`); torch otherwise, which is also its
    oracle."""
    ops = native()
    if (
        ops is not None
        and a_parts
        and dtype in (torch.float32, torch.bfloat16)
        and all(t.device.type == "cpu" for t in (*a_parts, *b_parts))
    ):
        a, b, flagged = ops.lora_factors(a_parts, b_parts, scales, dtype)
        return PairFactors(a, b, flagged)
    return pair_factors_reference(a_parts, b_parts, scales, dtype)


def pair_factors_reference(
    a_parts: list[torch.Tensor],
    b_parts: list[torch.Tensor],
    scales: list[float],
    dtype: torch.dtype,
) -> PairFactors:
    """`pair_factors` by torch (B's transposition compiled where it can be): the compiled
    call's oracle, and its stand-in for other dtypes and devices."""
    a = in_one_buffer(a_parts, dtype)
    b = [t.to(dtype) for t in transposed_bs(b_parts, scales)]
    return PairFactors(a, b, sorted(set(_nonfinite(a)) | set(_nonfinite(b))))


def in_one_buffer(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Contiguous copies of `tensors` (any strides) in `dtype`, views of one new buffer."""
    if not tensors:
        return []
    sizes = [t.numel() for t in tensors]
    pieces = torch.empty(sum(sizes), dtype=dtype).split(sizes)
    copies = [piece.view(t.shape) for piece, t in zip(pieces, tensors)]
    torch._foreach_copy_(copies, list(tensors))  # one call, any dtype
    return copies


def _converted(
    module: CheckedModule,
    factors: tuple[torch.Tensor, torch.Tensor] | None,
    dtype: torch.dtype,
    unscaled: bool,
) -> ModuleWeights:
    """factors: (A [r, in], B [r, out]) in `dtype` (B scaled), or as stored where `unscaled`
    (`held_as_stored`); None for a module with no pair."""
    parts, (fan_in, fan_out) = module.parts, module.target
    if factors is None:
        a, b = torch.zeros(0, fan_in, dtype=dtype), torch.zeros(0, fan_out, dtype=dtype)
    else:
        a, b = factors

    def vector(role: str, factor: float = 1.0) -> torch.Tensor | None:
        return None if role not in parts else parts[role].to(torch.float32) * factor

    copy = parts.get("base_copy")
    stored = set() if factors is None else {parts[role].dtype for role in PAIRS[module.embedding]}
    stored_half = stored.pop() if len(stored) == 1 and stored <= set(HALF_DTYPES) else None
    return ModuleWeights(
        a,
        b,
        embedding=module.embedding,
        magnitude=vector("magnitude"),
        bias=vector("bias"),
        lora_bias=vector("lora_bias", module.scale),
        base_copy=None if copy is None else copy.clone(),
        lora_scale=module.scale,
        stored_half=stored_half,
        unscaled=unscaled,
    )
