"""PEFT LoRA adapter directories: lorax's LoRA pytree in and out of PEFT's on-disk format.

An adapter directory holds ``adapter_config.json`` (PEFT's ``LoraConfig``) and
``adapter_model.safetensors`` with one ``lora_A``/``lora_B`` matrix per layer and projection
under PEFT's names (``convert.names.peft_lora_name``). lorax's LoRA already has PEFT's
shapes and scaling, so the conversion is only un-stacking (or stacking) the layer axis.

Reading is strict: PEFT features that change the computation in ways lorax's LoRA cannot
express (per-module ranks, DoRA, trained biases, extra full modules, ...) are errors naming
the field, and an adapter made for a different base model is an error naming the file, the
tensor and both shapes, never a silently different model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.export_common import staged_directory, write_json
from convert.names import ALL_PROJECTIONS, peft_lora_name
from convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file

if TYPE_CHECKING:
    pass

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Every family's projection names (Llama's; Phi-3's fused qkv_proj and gate_up_proj): which
# of them a model has is checked against its config when the adapter is applied.
PROJECTIONS = ALL_PROJECTIONS


def expert_factors_to_peft(lora_a: Any, lora_b: Any) -> tuple[np.ndarray, np.ndarray]:
    """One layer's expert factors ``a [E, r, in]``, ``b [E, out, r]`` as PEFT's
    ``ParamWrapper`` stores them: ``lora_A [E·r, in]`` (expert-major) and ``lora_B
    [out, r·E]`` (rank-major: column ``j·E + e`` is expert e's column j)."""
    a, b = np.asarray(lora_a), np.asarray(lora_b)
    experts, out_dim, rank = b.shape
    return a.reshape(experts * rank, -1), b.transpose(1, 2, 0).reshape(out_dim, rank * experts)


def expert_factors_from_peft(
    lora_a: Any, lora_b: Any, experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`expert_factors_to_peft`."""
    a, b = np.asarray(lora_a), np.asarray(lora_b)
    rank = a.shape[0] // experts
    return a.reshape(experts, rank, -1), b.reshape(b.shape[0], rank, experts).transpose(2, 0, 1)


# A LoRA key as PEFT saves it, or as some tools leave it: without the ``base_model.model.``
# prefix, or with the adapter name (``.default``) still inside, as in a raw state_dict.
_KEY = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\."
    r"(?P<proj>\w+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight"
)

# adapter_config.json fields that change the computation beyond lorax's LoRA: each must be
# absent or falsy/empty. (Fields that only describe how training initialised A and B, like
# eva_config, do not matter once the weights are trained.)
_UNSUPPORTED_FIELDS = {
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "adapters on a subset of layers",
    "layer_replication": "layer replication",
    "modules_to_save": "fully trained extra modules",
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "target_parameters": "LoRA on parameters",
    "trainable_token_indices": "trainable token embeddings",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "megatron_config": "Megatron-parallel layers",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# Initialisations that rewrite the base weights: such an adapter only fits the rewritten
# base, which we do not have (PEFT converts them to plain LoRA when asked to at save time).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterError(ValueError):
    """An adapter directory that is missing, corrupt, unsupported, or for another base."""


# --------------------------------------------------------------------------------- saving


def save_adapter(
    model: Any,
    lora: Any,
    directory: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    allow_overwrite: bool = False,
) -> None:
    """Writes ``lora`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    ``base_model_name_or_path`` (recorded for ``AutoPeftModelForCausalLM``) defaults to the
    directory the model's tokenizer was loaded from, when there is one. The directory appears
    complete or not at all; an existing non-empty one is replaced only with
    ``allow_overwrite``.
    """
    config = model.config
    tensors = adapter_tensors(config, lora.params)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model.tokenizer, "name_or_path", None) or None
    peft_config = adapter_config_dict(lora.config, base_model_name_or_path)
    with staged_directory(directory, allow_overwrite=allow_overwrite) as staging:
        save_file(os.path.join(staging, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
        write_json(os.path.join(staging, ADAPTER_CONFIG), peft_config)


def adapter_tensors(config: Any, lora_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PEFT's per-layer tensors of a stacked LoRA pytree, checked against the base's shapes."""
    tensors: dict[str, np.ndarray] = {}
    for proj, ab in lora_params["layers"].items():
        if proj not in PROJECTIONS:
            raise AdapterError(f"LoRA has an entry for {proj!r}, which is not a projection")
        a, b = np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"])
        out_dim, in_dim = config.projection_shape(proj)
        rank = a.shape[1] if a.ndim == 3 else -1
        for which, array, expected in (
            ("lora_a", a, (config.num_layers, rank, in_dim)),
            ("lora_b", b, (config.num_layers, out_dim, rank)),
        ):
            if array.shape != expected:
                raise AdapterError(
                    f"LoRA {proj}.{which} has shape {list(array.shape)}; the model needs "
                    f"[layers, ...] = {list(expected)}"
                )
        for i in range(config.num_layers):
            tensors[peft_lora_name(i, proj, "A")] = np.ascontiguousarray(a[i])
            tensors[peft_lora_name(i, proj, "B")] = np.ascontiguousarray(b[i])
    if not tensors:
        raise AdapterError("LoRA has no adapted projections; nothing to save")
    return tensors


def adapter_config_dict(lora_config: Any, base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for a lorax ``LoraConfig``.

    Only fields every PEFT release since DoRA (0.9) knows, so older PEFT reads it too; PEFT
    fills the rest with defaults that mean "plain LoRA".
    """
    alpha = lora_config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": int(lora_config.rank),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": float(lora_config.dropout),
        "target_modules": list(lora_config.targets),
        "use_rslora": bool(lora_config.use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


# -------------------------------------------------------------------------------- loading


def adapter_base_model(directory: str | os.PathLike[str]) -> str | None:
    """The ``base_model_name_or_path`` an adapter directory records (None if it has none)."""
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise AdapterError(f"{directory}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f).get("base_model_name_or_path") or None
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}: not valid JSON ({e})") from e


def read_adapter(
    directory: str | os.PathLike[str], config: Any, *, dtype: Any = jnp.float32
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stacked LoRA pytree of an adapter directory and its ``LoraConfig`` fields.

    Every name and shape is checked before any array is read.
    """
    directory = os.fspath(directory)
    settings = _read_adapter_config(directory)
    weights = _open_weights(directory)
    found = _index_tensors(weights)
    targets = _check_targets(weights, found, settings.pop("listed_targets"))
    _check_coverage(weights, found, targets, config.num_layers)

    rank = settings["rank"]
    names = {}
    for proj in targets:
        out_dim, in_dim = config.projection_shape(proj)
        for which, shape in (("A", (rank, in_dim)), ("B", (out_dim, rank))):
            names[proj, which] = [found[(i, proj, which)] for i in range(config.num_layers)]
            for name in names[proj, which]:
                _check_shape(weights, name, shape, proj, which, rank)

    def stacked(proj: str, which: str) -> jax.Array:
        return jnp.asarray(np.stack([weights[n] for n in names[proj, which]]), dtype=dtype)

    layers = {p: {"lora_a": stacked(p, "A"), "lora_b": stacked(p, "B")} for p in targets}
    return {"layers": layers}, {**settings, "targets": targets}


def _read_adapter_config(directory: str) -> dict[str, Any]:
    if not os.path.isdir(directory):
        raise AdapterError(f"{directory}: not a directory")
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise AdapterError(f"{directory}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: not a JSON object")
    return lora_settings_from_peft(raw, source=path)


def lora_settings_from_peft(raw: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """``LoraConfig`` fields from a parsed ``adapter_config.json``; rejects what we can't run.

    Returns ``rank``, ``alpha``, ``dropout``, ``use_rslora`` and ``listed_targets`` (the
    projection names ``target_modules`` lists, or None when it is a pattern).
    """
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{source}: peft_type={raw.get('peft_type')!r}; only 'LORA' is read")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(
            f"{source}: task_type={raw['task_type']!r}; only 'CAUSAL_LM' adapters are read"
        )
    for field, what in _UNSUPPORTED_FIELDS.items():
        if raw.get(field):
            raise AdapterError(
                f"{source}: {field}={raw[field]!r} ({what}) is not supported by lorax's LoRA"
            )
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={raw['bias']!r} is not supported (only 'none')")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(
            f"{source}: init_lora_weights={init!r} rewrites the base weights, so this adapter "
            "only fits that rewritten base; convert it to plain LoRA with PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    rank, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterError(f"{source}: r={rank!r} is not a positive integer")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"{source}: lora_alpha={alpha!r} is not a number")
    dropout = raw.get("lora_dropout") or 0.0
    if not 0.0 <= float(dropout) < 1.0:
        raise AdapterError(f"{source}: lora_dropout={dropout!r} is not in [0, 1)")
    return {
        "rank": rank,
        "alpha": float(alpha),
        "dropout": float(dropout),
        "use_rslora": bool(raw.get("use_rslora", False)),
        "listed_targets": _listed_targets(raw.get("target_modules"), source),
    }


def _listed_targets(target_modules: Any, source: str) -> tuple[str, ...] | None:
    # PEFT matches list entries by module-name suffix and a string as a full-name regex
    # (or the "all-linear" shorthand). A regex is judged by the tensors it produced.
    if target_modules is None or isinstance(target_modules, str):
        return None
    names = tuple(str(t).rsplit(".", 1)[-1] for t in target_modules)
    unknown = sorted(set(names) - set(PROJECTIONS))
    if unknown:
        raise AdapterError(
            f"{source}: target_modules includes {unknown}; lorax adapts only {list(PROJECTIONS)}"
        )
    return names


def _open_weights(directory: str) -> SafetensorsFile:
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.exists(path):
        pickled = os.path.exists(os.path.join(directory, "adapter_model.bin"))
        hint = (
            " (found adapter_model.bin, a PyTorch pickle: re-save it with "
            "`save_pretrained(dir, safe_serialization=True)`)"
            if pickled
            else ""
        )
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise AdapterError(str(e)) from e


def _index_tensors(weights: SafetensorsFile) -> dict[tuple[int, str, str], str]:
    """(layer, projection, "A"|"B") -> tensor name, for every tensor of the file."""
    found: dict[tuple[int, str, str], str] = {}
    adapter_names = set()
    for name in weights:
        m = _KEY.fullmatch(name)
        if m is None:
            raise AdapterError(
                f"{weights.path}: tensor {name!r} is not a LoRA matrix of a decoder projection; "
                "lorax's adapters hold only those"
            )
        layer, proj, which = int(m["layer"]), m["proj"], m["which"]
        # The canonical spelling must come back out of the one name map, else the module
        # path is wrong for this projection (e.g. "mlp.q_proj").
        canonical = peft_lora_name(layer, proj, which) if proj in PROJECTIONS else None
        stripped = name.replace(f".{m['adapter']}.weight", ".weight") if m["adapter"] else name
        if canonical is None or not canonical.endswith(stripped):
            raise AdapterError(f"{weights.path}: tensor {name!r} names an unknown module")
        adapter_names.add(m["adapter"])
        found[(layer, proj, which)] = name
    if len(adapter_names) > 1:
        raise AdapterError(
            f"{weights.path}: holds several adapters ({sorted(map(str, adapter_names))}); "
            "save each on its own"
        )
    return found


def _check_targets(
    weights: SafetensorsFile,
    found: Mapping[tuple[int, str, str], str],
    listed: tuple[str, ...] | None,
) -> tuple[str, ...]:
    present = {proj for _, proj, _ in found}
    if not present:
        raise AdapterError(f"{weights.path}: holds no LoRA tensors")
    if listed is not None:
        absent = sorted(set(listed) - present)
        extra = sorted(present - set(listed))
        if absent or extra:
            raise AdapterError(
                f"{weights.path}: target_modules lists {sorted(set(listed))} but the file has "
                f"LoRA tensors for {sorted(present)}"
            )
    return tuple(p for p in PROJECTIONS if p in present)


def _check_coverage(
    weights: SafetensorsFile,
    found: Mapping[tuple[int, str, str], str],
    targets: tuple[str, ...],
    num_layers: int,
) -> None:
    deepest = max(layer for layer, _, _ in found)
    if deepest >= num_layers:
        raise AdapterError(
            f"{weights.path}: has LoRA tensors for layer {deepest} but the base model has "
            f"{num_layers} layers; the adapter is for a different base model"
        )
    missing = [
        peft_lora_name(i, proj, which)
        for proj in targets
        for i in range(num_layers)
        for which in "AB"
        if (i, proj, which) not in found
    ]
    if missing:
        raise AdapterError(
            f"{weights.path}: missing LoRA tensor(s) {_some(missing)}; lorax needs every targeted "
            "projection adapted in every layer"
        )


def _check_shape(
    weights: SafetensorsFile,
    name: str,
    expected: tuple[int, int],
    proj: str,
    which: str,
    rank: int,
) -> None:
    shape = tuple(weights.shape(name))
    if shape == expected:
        return
    dims = f"[r={rank}, in]" if which == "A" else f"[out, r={rank}]"
    raise AdapterError(
        f"{weights.path}: tensor {name!r} has shape {list(shape)}, but the base model's "
        f"{proj} needs lora_{which} {dims} = {list(expected)}; the adapter is for a different "
        "base model (or its adapter_config.json r does not match its tensors)"
    )


def _some(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
