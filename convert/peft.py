"""PEFT LoRA adapter directories: lorax's LoRA pytree in and out of PEFT's on-disk format.

An adapter directory holds ``adapter_config.json`` (PEFT's ``LoraConfig``) and
``adapter_model.safetensors`` with one ``lora_A``/``lora_B`` matrix per layer and projection
under PEFT's names (``convert.names.peft_lora_name``). lorax's LoRA already has PEFT's
shapes and scaling, so the conversion is only un-stacking (or stacking) the layer axis.

An MoE model whose dense-MLP layers form a second layer stack (``ModelConfig.layer_stacks``:
Qwen MoE's ``mlp_only_layers`` / ``decoder_sparse_step``) keeps each stack's LoRA under the
stack's key, stacked in the order of the stack's layers; PEFT's keys name each layer by its
index in the model and each projection where that layer keeps it (Qwen 2 MoE's gate/up/down
are ``mlp.shared_expert.*`` in a routed layer, ``mlp.*`` in a dense one). A target is adapted
in every layer that has it: the expert projections in the routed layers only, and Qwen 3
MoE's gate/up/down in the dense layers only. PEFT (on transformers >= 5) reads those three
names on a Qwen 3 MoE as the experts', so such an adapter is read but never written
(``_PEFT_EXPERT_ALIASES``).

A mixture-of-experts model's expert projections are 3-D parameters to PEFT, adapted through
``target_parameters`` (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``): one
``lora_A``/``lora_B`` pair per layer holds every expert's factors
(:func:`expert_factors_to_peft`), under a key that names the wrapper module rather than the
parameter (``peft_lora_name``'s nesting rule).

On an image-text model's language model (Gemma 3's 4B-27B) PEFT's keys name the decoder
where transformers keeps it (``model.language_model.``; adapters trained before transformers
4.52 say ``language_model.model.``, which PEFT reads too), and ``target_modules`` is a regex
that names only the language model's projections, not the vision tower's namesakes
(:func:`target_modules`). An adapter that adapts the vision tower is refused by name: lorax
has none to apply it to.

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
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert.export_common import (
    describe_stack,
    misplaced_projection_message,
    staged_directory,
    unknown_stacks_message,
    write_json,
)
from convert.names import (
    ALL_PROJECTIONS,
    CAUSAL_LM,
    EXPERT_PROJECTIONS,
    LAYOUTS,
    SHARED_EXPERT_GATE,
    CheckpointLayout,
    module_name,
    peft_lora_name,
    projection_module,
)
from convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file

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
# ``decoder`` is where the decoder layers sit (``model.``; an image-text model's language
# model: one of its layout's spellings), checked against the base model's layout. A
# projection may sit deeper than ``self_attn``/``mlp`` (a shared expert's:
# ``mlp.shared_expert.gate_proj``); the path is checked against the base model's
# (``peft_lora_name``).
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<decoder>(?:\w+\.)*?)layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?:\w+\.)*?(?P<proj>\w+)\.lora_(?P<which>[AB])"
    r"(?:\.(?P<adapter>[\w-]+))?\.weight"
)
# The same for an expert parameter's LoRA: the key names PEFT's wrapper of ``mlp.experts``,
# ``base_layer``-nested once per later-wrapped target (``peft_lora_name``).
_EXPERT_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<decoder>(?:\w+\.)*?)layers\.(?P<layer>\d+)\.mlp\.experts"
    r"(?P<nesting>(?:\.base_layer)*)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight"
)
# target_parameters entries lorax reads: the expert parameters, by PEFT's (suffix-matched)
# names, e.g. "mlp.experts.gate_up_proj" or "gate_up_proj".
_EXPERT_PARAMETERS = {module_name(p): p for p in EXPERT_PROJECTIONS}

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


# Model types whose MLP projection names PEFT reads as the experts' on transformers >= 5: it
# converts a transformers-4 adapter config (where each expert was an nn.Linear named
# gate_proj/up_proj/down_proj) by moving those target_modules to target_parameters
# (experts' gate_up_proj / down_proj; peft.utils.transformers_weight_conversion, checked with
# PEFT 0.21.2 and transformers 5.24), for any config it loads or creates. So PEFT cannot
# adapt a Qwen 3 MoE's dense-MLP layers (mlp_only_layers), nor DeepSeek's dense first layers
# and shared experts: lorax refuses to write such an adapter rather than have PEFT apply none
# of it. (Qwen 2 MoE's names are left alone.)
_PEFT_EXPERT_ALIASES = {
    model_type: ("gate_proj", "up_proj", "down_proj")
    for model_type in ("qwen3_moe", "deepseek_v2", "deepseek_v3")
}

# Why an adapter of Qwen 2 MoE's shared_expert_gate (PEFT's "all-linear" takes it: a Linear
# of one output) is refused.
_FROZEN_GATE = (
    "the shared expert's gate, which lorax keeps frozen as the router; target the "
    "projections by name instead of 'all-linear'"
)


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
    check_targets_adapted(config, lora)
    check_peft_reads_targets(config, lora.config.targets)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model.tokenizer, "name_or_path", None) or None
    peft_config = adapter_config_dict(
        lora.config, base_model_name_or_path, config.checkpoint_layout
    )
    with staged_directory(directory, allow_overwrite=allow_overwrite) as staging:
        save_file(os.path.join(staging, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
        write_json(os.path.join(staging, ADAPTER_CONFIG), peft_config)


def adapter_tensors(config: Any, lora_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PEFT's per-layer tensors of a stacked LoRA pytree, checked against the base's shapes.

    Each layer stack's entries (``lora_params[stack.key]``) are un-stacked onto the model
    layers ``stack.layers``, with the shapes and module paths of ``stack.config``. An expert
    projection's ``[L, E, ...]`` factors become one PEFT pair per layer
    (:func:`expert_factors_to_peft`). Tensors come projection by projection, each in model
    layer order.
    """
    stacks = config.layer_stacks()
    _check_stack_keys(config, lora_params)
    expert_targets = tuple(
        p for p in EXPERT_PROJECTIONS if any(p in lora_params.get(s.key, {}) for s in stacks)
    )
    decoder = LAYOUTS[config.checkpoint_layout].modules
    # (projection, model layer) -> (A, B) in PEFT's shapes, gathered from every stack.
    pairs: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    layer_configs = {}
    for stack in stacks:
        for proj, ab in lora_params.get(stack.key, {}).items():
            _check_stack_entry(config, stack, proj)
            a, b = np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"])
            stack_config = stack.config
            out_dim, in_dim = stack_config.projection_shape(proj)
            expert = proj in EXPERT_PROJECTIONS
            lead = stack_config.adapter_batch_shape(proj)
            rank = a.shape[len(lead)] if a.ndim == len(lead) + 2 else -1
            axes = "[layers, experts, ...]" if expert else "[layers, ...]"
            for which, array, expected in (
                ("lora_a", a, (*lead, rank, in_dim)),
                ("lora_b", b, (*lead, out_dim, rank)),
            ):
                if array.shape != expected:
                    raise AdapterError(
                        f"LoRA {_entry(config, stack, proj)}.{which} has shape "
                        f"{list(array.shape)}; the model needs {axes} = {list(expected)}"
                    )
            for j, i in enumerate(stack.layers):
                pairs[proj, i] = expert_factors_to_peft(a[j], b[j]) if expert else (a[j], b[j])
                layer_configs[i] = stack_config
    if not pairs:
        raise AdapterError("LoRA has no adapted projections; nothing to save")
    first_seen = {proj: k for k, proj in enumerate(dict.fromkeys(p for p, _ in pairs))}
    tensors: dict[str, np.ndarray] = {}
    for proj, i in sorted(pairs, key=lambda key: (first_seen[key[0]], key[1])):
        for which, matrix in zip("AB", pairs[proj, i], strict=True):
            name = peft_lora_name(i, proj, which, expert_targets, decoder, layer_configs[i])
            tensors[name] = np.ascontiguousarray(matrix)
    return tensors


def _check_stack_keys(config: Any, lora_params: Mapping[str, Any]) -> None:
    message = unknown_stacks_message(config, lora_params)
    if message is not None:
        raise AdapterError(message)


def _check_stack_entry(config: Any, stack: Any, proj: str) -> None:
    """A LoRA entry of ``proj`` under ``stack`` must be a projection of the stack's layers."""
    misplaced = misplaced_projection_message(config, stack, proj)
    if misplaced is not None:
        raise AdapterError(misplaced)


def _entry(config: Any, stack: Any, proj: str) -> str:
    """A LoRA entry's name in messages: the projection, under its stack's key when the model
    has several."""
    return proj if len(config.layer_stacks()) == 1 else f"{stack.key}.{proj}"


def check_targets_adapted(config: Any, lora: Any) -> None:
    """``lora``'s entries are its config's targets in every layer stack that has them: the
    adapter's ``target_modules`` / ``target_parameters`` say so to PEFT (which adapts every
    module they match), and lorax reads back nothing else."""
    targets = lora.config.targets
    for stack in config.layer_stacks():
        entries = lora.params.get(stack.key, {})
        want = {t for t in targets if t in stack.config.projections()}
        if set(entries) == want:
            continue
        where = "" if len(config.layer_stacks()) == 1 else f" under {describe_stack(config, stack)}"
        missing, extra = sorted(want - set(entries)), sorted(set(entries) - set(targets))
        raise AdapterError(
            f"LoRA targets {list(targets)} but has entries{where} for {sorted(entries)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; {extra} are not among its targets" if extra else "")
            + ": PEFT would adapt every layer with a targeted projection"
        )


def peft_misread_targets(config: Any, targets: tuple[str, ...]) -> list[str]:
    """The targets PEFT would read as other modules of ``config``'s model
    (``_PEFT_EXPERT_ALIASES``): DeepSeek's, and Qwen 3 MoE's dense layers', gate/up/down."""
    return [t for t in targets if t in _PEFT_EXPERT_ALIASES.get(config.model_type, ())]


def misread_modules(config: Any) -> str:
    """Where ``config``'s model has the projections ``peft_misread_targets`` names."""
    where = []
    if config.dense_mlp_layers:
        where.append(f"dense-MLP layers {list(config.dense_mlp_layers)}")
    if config.shared_expert:
        where.append("shared experts")
    return f"{config.model_type}'s {' and '.join(where)}"


def check_peft_reads_targets(config: Any, targets: tuple[str, ...]) -> None:
    """Refuses targets PEFT would read as other modules (``peft_misread_targets``)."""
    aliased = peft_misread_targets(config, targets)
    if not aliased:
        return
    raise AdapterError(
        f"LoRA on {aliased} of {misread_modules(config)} cannot be saved as "
        "a PEFT adapter: PEFT on "
        f"transformers >= 5 reads target_modules {aliased} of a {config.model_type} model as "
        "the experts' (their transformers-4 names; it moves them to target_parameters "
        "gate_up_proj / down_proj), so it would apply none of these matrices. Export the "
        "merged model (save_merged) instead, or adapt the other projections only"
    )


def adapter_config_dict(
    lora_config: Any, base_model_name_or_path: str | None, layout: str = CAUSAL_LM
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for a lorax ``LoraConfig`` on a base of ``layout``.

    Only fields every PEFT release since DoRA (0.9) knows, so older PEFT reads it too; PEFT
    fills the rest with defaults that mean "plain LoRA". LoRA on a mixture of experts'
    expert projections adds ``target_parameters`` (PEFT >= 0.17), where PEFT names them.
    ``target_modules`` lists projection names, except on an image-text model
    (:func:`target_modules`).
    """
    alpha = lora_config.alpha
    experts = [t for t in lora_config.targets if t in EXPERT_PROJECTIONS]
    if experts and lora_config.dropout:
        raise AdapterError(
            f"lora_dropout={lora_config.dropout} with LoRA on the expert projections {experts}: "
            "PEFT applies no dropout to target_parameters (it refuses to load such an adapter)"
        )
    extra = {"target_parameters": [module_name(t) for t in experts]} if experts else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": int(lora_config.rank),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": float(lora_config.dropout),
        "target_modules": target_modules(
            [t for t in lora_config.targets if t not in EXPERT_PROJECTIONS], LAYOUTS[layout]
        ),
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
        **extra,
    }


def target_modules(projections: list[str], layout: CheckpointLayout) -> list[str] | str:
    """PEFT's ``target_modules`` for LoRA on ``projections`` of every decoder layer.

    PEFT matches a list entry against every module whose name ends with it, and an image-text
    model's vision tower has projections of the same names (SigLIP's ``self_attn.q_proj``):
    PEFT would adapt those too, and the adapter would not be lorax's. So there it is a
    string, which PEFT matches as a regex against whole module names, naming only the
    language model's layers.
    """
    if not layout.foreign:
        return projections
    modules = "|".join(re.escape(module_name(p)) for p in projections)
    return rf"{re.escape(layout.modules)}layers\.\d+\.(?:{modules})"


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
    listed, expert_targets = settings.pop("listed_targets"), settings.pop("expert_targets")
    if expert_targets and not config.moe:
        raise AdapterError(
            f"{os.path.join(directory, ADAPTER_CONFIG)}: target_parameters names the experts "
            f"{list(expert_targets)}, but {config.model_type} is not a mixture-of-experts model; "
            "the adapter is for a different base model"
        )
    weights = _open_weights(directory)
    found = _index_tensors(weights, expert_targets, config)
    targets = _check_targets(weights, found, listed, expert_targets, config)
    _check_coverage(weights, found, targets, config, expert_targets)

    rank = settings["rank"]
    names = {}
    for proj in targets:
        for stack in _stacks_with(config, proj):
            for which, shape, dims in _peft_shapes(stack.config, proj, rank):
                names[stack.key, proj, which] = [found[(i, proj, which)] for i in stack.layers]
                for name in names[stack.key, proj, which]:
                    _check_shape(weights, name, shape, proj, which, dims)

    params: dict[str, Any] = {}
    for stack in config.layer_stacks():  # every stack, as init_lora makes them
        experts = stack.config.num_experts

        def layer_pair(proj: str, j: int, key: str = stack.key, experts: int = experts) -> Any:
            a, b = weights[names[key, proj, "A"][j]], weights[names[key, proj, "B"][j]]
            if proj in EXPERT_PROJECTIONS:
                return expert_factors_from_peft(a, b, experts)
            return a, b

        layers = {}
        for proj in targets:
            if proj not in stack.config.projections():
                continue  # a projection of the model's other layers
            pairs = [layer_pair(proj, j) for j in range(len(stack.layers))]
            layers[proj] = {
                key: jnp.asarray(np.stack([pair[k] for pair in pairs]), dtype=dtype)
                for k, key in enumerate(("lora_a", "lora_b"))
            }
        params[stack.key] = layers
    return params, {**settings, "targets": targets}


def _stacks_with(config: Any, proj: str) -> list[Any]:
    """The layer stacks of ``config`` whose layers have the projection ``proj``."""
    return [stack for stack in config.layer_stacks() if proj in stack.config.projections()]


def _peft_shapes(config: Any, proj: str, rank: int) -> list[tuple[str, tuple[int, int], str]]:
    """(A|B, PEFT's shape of one layer's matrix, its dims in words) for ``proj``."""
    out_dim, in_dim = config.projection_shape(proj)
    if proj not in EXPERT_PROJECTIONS:
        return [
            ("A", (rank, in_dim), f"[r={rank}, in]"),
            ("B", (out_dim, rank), f"[out, r={rank}]"),
        ]
    e = config.num_experts
    return [
        ("A", (e * rank, in_dim), f"[experts·r = {e}·{rank}, in]"),
        ("B", (out_dim, rank * e), f"[out, r·experts = {rank}·{e}]"),
    ]


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

    Returns ``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``listed_targets`` (the
    projection names ``target_modules`` lists, or None when it is a pattern) and
    ``expert_targets`` (the expert projections ``target_parameters`` lists, in lorax's order).
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
    experts = _listed_parameters(raw.get("target_parameters"), source)
    if experts and dropout:
        raise AdapterError(
            f"{source}: lora_dropout={dropout!r} with target_parameters: PEFT applies no dropout "
            "to LoRA on parameters (it refuses such a config), and neither does lorax"
        )
    return {
        "rank": rank,
        "alpha": float(alpha),
        "dropout": float(dropout),
        "use_rslora": bool(raw.get("use_rslora", False)),
        "listed_targets": _listed_targets(raw.get("target_modules"), source),
        "expert_targets": experts,
    }


def _listed_parameters(target_parameters: Any, source: str) -> tuple[str, ...]:
    """The expert projections ``target_parameters`` names; any other parameter is an error.

    PEFT matches an entry against ``<module>.<parameter>`` names by dotted suffix, so
    ``"gate_up_proj"`` and ``"mlp.experts.gate_up_proj"`` mean the same here.
    """
    if not target_parameters:
        return ()
    if isinstance(target_parameters, str):
        target_parameters = [target_parameters]
    found, unknown = set(), []
    for entry in map(str, target_parameters):
        match = [p for hf, p in _EXPERT_PARAMETERS.items() if f".{hf}".endswith(f".{entry}")]
        if match:
            found.update(match)
        else:
            unknown.append(entry)
    if unknown:
        raise AdapterError(
            f"{source}: target_parameters includes {unknown} (LoRA on parameters); lorax adapts "
            f"only a mixture of experts' {list(_EXPERT_PARAMETERS)}"
        )
    return tuple(p for p in EXPERT_PROJECTIONS if p in found)


def _listed_targets(target_modules: Any, source: str) -> tuple[str, ...] | None:
    # PEFT matches list entries by module-name suffix and a string as a full-name regex
    # (or the "all-linear" shorthand). A regex is judged by the tensors it produced.
    if target_modules is None or isinstance(target_modules, str):
        return None
    names = tuple(str(t).rsplit(".", 1)[-1] for t in target_modules)
    unknown = sorted(set(names) - set(PROJECTIONS))
    if unknown:
        frozen = f" ({_FROZEN_GATE})" if SHARED_EXPERT_GATE in unknown else ""
        raise AdapterError(
            f"{source}: target_modules includes {unknown}; lorax adapts only "
            f"{list(PROJECTIONS)}{frozen}"
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


def _index_tensors(
    weights: SafetensorsFile, expert_targets: tuple[str, ...], config: Any
) -> dict[tuple[int, str, str], str]:
    """(layer, projection, "A"|"B") -> tensor name, for every tensor of the file.

    An expert LoRA's key says which parameter it adapts only by its ``base_layer`` nesting,
    read against the ``expert_targets`` the config lists (``peft_lora_name``). Keys name
    the decoder where the base model's layout puts it, in any of its spellings (PEFT reads
    each), and each projection where the base model's layers keep it; a LoRA of a part
    lorax does not compute (a vision tower) or keeps frozen (a shared expert's gate) is
    refused.
    """
    layout = LAYOUTS[config.checkpoint_layout]
    decoders = [decoder for decoder, _ in layout.spellings]
    stacks, owner = config.layer_stacks(), _layer_owner(config)
    found: dict[tuple[int, str, str], str] = {}
    adapter_names = set()
    for name in weights:
        foreign = layout.foreign_part(name.removeprefix(_PEFT_PREFIX))
        if foreign is not None:
            raise AdapterError(
                f"{weights.path}: tensor {name!r} adapts a module under {foreign!r}, which "
                "lorax does not compute; it reads adapters of the language model only (PEFT's "
                f"target_modules as a regex over {layout.modules!r}…, not bare names such as "
                "'q_proj', which also match the vision tower's)"
            )
        m = _EXPERT_KEY.fullmatch(name) or _KEY.fullmatch(name)
        if m is None:
            raise AdapterError(
                f"{weights.path}: tensor {name!r} is not a LoRA matrix of a decoder projection; "
                "lorax's adapters hold only those"
            )
        layer, which = int(m["layer"]), m["which"]
        proj = m["proj"] if m.re is _KEY else _expert_projection(weights, name, m, expert_targets)
        if proj == SHARED_EXPERT_GATE:
            raise AdapterError(f"{weights.path}: tensor {name!r} adapts {_FROZEN_GATE}")
        # The canonical spelling must come back out of the one name map, else the module
        # path is wrong for this projection (e.g. "mlp.q_proj") or for this base model's
        # layer (its stack's config places it: Qwen 2 MoE's up_proj is the shared expert's
        # in a routed layer, the MLP's in a dense one). A layer the model lacks may be
        # spelled as any stack's (the coverage check names it).
        known = (proj in PROJECTIONS or proj in EXPERT_PROJECTIONS) and m["decoder"] in decoders
        stripped = name.replace(f".{m['adapter']}.weight", ".weight") if m["adapter"] else name

        spelled_as = {
            stack.key: peft_lora_name(
                layer, proj, which, expert_targets, m["decoder"], stack.config
            ).endswith(stripped)
            for stack in (stacks if known else ())
        }
        mine = [owner[layer]] if layer in owner else stacks
        if not any(spelled_as.get(s.key) for s in mine):
            other = [s for s in stacks if s not in mine and spelled_as.get(s.key)]
            if other:
                stack = owner[layer]
                raise AdapterError(
                    f"{weights.path}: tensor {name!r} adapts {proj} where "
                    f"{describe_stack(config, other[0])} keep it, but layer {layer} is one of "
                    f"{describe_stack(config, stack)}, which keep it at "
                    f"{projection_module(proj, stack.config)}"
                )
            where = f"; the base model's decoder layers are under {decoders}"
            raise AdapterError(f"{weights.path}: tensor {name!r} names an unknown module{where}")
        if (layer, proj, which) in found:
            raise AdapterError(
                f"{weights.path}: tensors {found[layer, proj, which]!r} and {name!r} are the "
                "same LoRA matrix under two names"
            )
        adapter_names.add(m["adapter"])
        found[(layer, proj, which)] = name
    if len(adapter_names) > 1:
        raise AdapterError(
            f"{weights.path}: holds several adapters ({sorted(map(str, adapter_names))}); "
            "save each on its own"
        )
    return found


def _expert_projection(
    weights: SafetensorsFile, name: str, match: re.Match[str], expert_targets: tuple[str, ...]
) -> str:
    """The expert projection a ``mlp.experts(.base_layer)*`` LoRA key adapts."""
    if not expert_targets:
        raise AdapterError(
            f"{weights.path}: tensor {name!r} is a LoRA of the experts' parameters, but "
            f"{ADAPTER_CONFIG} lists no target_parameters to say which"
        )
    depth = match["nesting"].count(".base_layer")
    if depth >= len(expert_targets):
        raise AdapterError(
            f"{weights.path}: tensor {name!r} is nested {depth} wrapper(s) deep, but "
            f"target_parameters lists only {[module_name(p) for p in expert_targets]}"
        )
    return expert_targets[len(expert_targets) - 1 - depth]


def _check_targets(
    weights: SafetensorsFile,
    found: Mapping[tuple[int, str, str], str],
    listed: tuple[str, ...] | None,
    expert_targets: tuple[str, ...],
    config: Any,
) -> tuple[str, ...]:
    """The adapted projections, in lorax's order: what the config lists, the file holds and
    the base model has must agree."""
    present = {proj for _, proj, _ in found}
    if not present:
        raise AdapterError(f"{weights.path}: holds no LoRA tensors")
    modules = present - set(EXPERT_PROJECTIONS)
    if listed is not None and set(listed) != modules:
        raise AdapterError(
            f"{weights.path}: target_modules lists {sorted(set(listed))} but the file has "
            f"LoRA tensors for {sorted(modules)}"
        )
    if set(expert_targets) != present & set(EXPERT_PROJECTIONS):
        have = [module_name(p) for p in EXPERT_PROJECTIONS if p in present]
        raise AdapterError(
            f"{weights.path}: target_parameters lists {[module_name(p) for p in expert_targets]} "
            f"but the file has LoRA tensors for {have}"
        )
    foreign = sorted(present - set(config.projections()))
    if foreign:
        raise AdapterError(
            f"{weights.path}: has LoRA tensors for {foreign}, which {config.model_type} does not "
            f"have (its projections: {list(config.projections())}); the adapter is for a "
            "different base model"
        )
    return tuple(p for p in config.projections() if p in present)


def _check_coverage(
    weights: SafetensorsFile,
    found: Mapping[tuple[int, str, str], str],
    targets: tuple[str, ...],
    config: Any,
    expert_targets: tuple[str, ...],
) -> None:
    """Every targeted projection adapted in every layer that has it, and in no other."""
    num_layers = config.num_layers
    decoder = LAYOUTS[config.checkpoint_layout].modules
    deepest = max(layer for layer, _, _ in found)
    if deepest >= num_layers:
        raise AdapterError(
            f"{weights.path}: has LoRA tensors for layer {deepest} but the base model has "
            f"{num_layers} layers; the adapter is for a different base model"
        )
    owner = _layer_owner(config)
    for (layer, proj, _), name in found.items():
        stack = owner[layer]
        if proj not in stack.config.projections():  # only on a model of several stacks
            raise AdapterError(
                f"{weights.path}: tensor {name!r} adapts {proj} in layer {layer}, one of "
                f"{describe_stack(config, stack)}, which have no {proj}; the adapter is for a "
                "different base model"
            )
    missing = [
        peft_lora_name(i, proj, which, expert_targets, decoder, owner[i].config)
        for proj in targets
        for i in range(num_layers)
        if proj in owner[i].config.projections()
        for which in "AB"
        if (i, proj, which) not in found
    ]
    if missing:
        raise AdapterError(
            f"{weights.path}: missing LoRA tensor(s) {_some(missing)}; lorax needs every targeted "
            "projection adapted in every layer"
            + (" that has it" if len(config.layer_stacks()) > 1 else "")
        )


def _layer_owner(config: Any) -> dict[int, Any]:
    """Each model layer's index -> the layer stack holding it."""
    return {i: stack for stack in config.layer_stacks() for i in stack.layers}


def _check_shape(
    weights: SafetensorsFile,
    name: str,
    expected: tuple[int, int],
    proj: str,
    which: str,
    dims: str,
) -> None:
    shape = tuple(weights.shape(name))
    if shape == expected:
        return
    raise AdapterError(
        f"{weights.path}: tensor {name!r} has shape {list(shape)}, but the base model's "
        f"{proj} needs lora_{which} {dims} = {list(expected)}; the adapter is for a different "
        "base model (or its adapter_config.json r does not match its tensors)"
    )


def _some(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
