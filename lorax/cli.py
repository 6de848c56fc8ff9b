"""The ``lorax`` command: a thin layer over the public API.

``lorax train`` with no model or data fine-tunes the embedded default (a real pretrained
model when one is installed, else a tiny built-in one) on the bundled demo data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import tomllib
import types
import typing
from typing import Any

# Options of ``lorax train`` that are not TrainConfig fields (model, adapters, data, sample).
RUN_OPTIONS: dict[str, tuple[Any, str]] = {
    "model": (
        None,
        "HF model directory or .gguf file (default: the embedded demo model; "
        "'tiny' forces the built-in tiny model)",
    ),
    "data": (
        None,
        "training data: JSONL/JSON/Parquet/Arrow/CSV file, directory or glob "
        "(default: the bundled demo data)",
    ),
    "eval_data": (None, "evaluation data (same formats)"),
    "quantize": ("auto", "base weights: nf4 | none | auto (nf4 on GPU, none on CPU)"),
    "dtype": (
        "auto",
        "compute dtype: bfloat16 | float16 | float32 | auto (bf16 on GPU, f32 on CPU)",
    ),
    "rank": (16, "LoRA rank r"),
    "alpha": (16.0, "LoRA alpha (scale = alpha / r)"),
    "targets": ("all-linear", "LoRA targets: all-linear | attention | mlp | comma list"),
    "dropout": (0.0, "LoRA dropout"),
    "use_rslora": (False, "rank-stabilised scaling alpha / sqrt(r)"),
    "kernel_weights": (
        "auto",
        "frozen NF4 weights rewritten once for the Mosaic GPU NF4 kernel "
        "(lorax.prepare_kernel_weights): none | all | comma list of projection groups | auto "
        "(all on one Hopper GPU when batch_size*seq_len <= 2048, where it measured faster)",
    ),
    "prompt": (None, "prompt for the sample generation printed before and after training"),
    "max_new_tokens": (40, "tokens to generate for the sample (0: no sample)"),
    "coordinator": (
        None,
        "multi-host: HOST:PORT of process 0's coordinator (jax.distributed); every process "
        "runs the same command with its own --process-id",
    ),
    "num_processes": (None, "multi-host: number of processes (with --coordinator)"),
    "process_id": (None, "multi-host: this process's index, 0..N-1 (with --coordinator)"),
    "distributed": (
        False,
        "multi-host without --coordinator: let JAX detect the cluster (Slurm, Open MPI, "
        "TPU) or read JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID",
    ),
}

# Run options whose default (None) does not tell argparse their type.
RUN_OPTION_TYPES = {"num_processes": int, "process_id": int}

DEMO_PROMPT = "What is 7 + 5?"
# The embedded default (no --model, no --data) must finish in minutes on a laptop CPU: short
# packed rows (the demo records average ~50 tokens) and a brisk learning rate. Flags and
# --config values still win.
DEMO_DEFAULTS = {"batch_size": 2, "seq_len": 128, "max_steps": 40, "learning_rate": 1e-3}


def _field_type(annotation: Any) -> type:
    """The scalar type argparse should parse for a resolved annotation (``float | None``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _add_option(
    parser: argparse.ArgumentParser, name: str, kind: type, default: Any, help: str
) -> None:
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(
            flag,
            dest=name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"{help} (default: {default})",
        )
    else:
        parser.add_argument(
            flag, dest=name, type=kind, default=None, help=f"{help} (default: {default})"
        )


def _train_parser(sub: Any) -> argparse.ArgumentParser:
    from lorax.train.trainer import TrainConfig

    p = sub.add_parser(
        "train",
        help="fine-tune LoRA adapters",
        description="Fine-tune LoRA adapters and save them in PEFT format to OUTPUT_DIR. "
        "Options may also come from a TOML or JSON --config file (keys are the option names "
        "with underscores); flags override it.",
    )
    p.add_argument("--config", help="TOML or JSON file of options")
    for name, (default, help) in RUN_OPTIONS.items():
        kind = type(default) if default is not None else RUN_OPTION_TYPES.get(name, str)
        _add_option(p, name, kind, default, help)
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        default = None if field.default is dataclasses.MISSING else field.default
        _add_option(p, field.name, _field_type(hints[field.name]), default, field.metadata["help"])
    return p


def _read_config_file(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"lorax train: cannot parse --config {path}: {e}") from e


def _resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    from lorax.train.trainer import TrainConfig

    known = set(RUN_OPTIONS) | {f.name for f in dataclasses.fields(TrainConfig)}
    options = {name: default for name, (default, _) in RUN_OPTIONS.items()}
    if args.config:
        from_file = _read_config_file(args.config)
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise SystemExit(f"lorax train: unknown option(s) in {args.config}: {unknown}")
        options.update(from_file)
    given = {k: v for k, v in vars(args).items() if k in known and v is not None}
    demo = not ({"model", "data"} & set(given)) and options["model"] is None and not options["data"]
    if demo:
        options.update({k: v for k, v in DEMO_DEFAULTS.items() if k not in options})
    options.update(given)
    if not options.get("output_dir"):
        raise SystemExit("lorax train: --output-dir is required")
    return options


def _distributed_config(options: dict[str, Any]) -> Any:
    """The multi-host set-up the options (or JAX's environment variables) ask for, or None."""
    from lorax.distributed import DistributedConfig

    if options["coordinator"]:
        return DistributedConfig(
            options["coordinator"], options["num_processes"], options["process_id"]
        )
    if options["num_processes"] is not None or options["process_id"] is not None:
        raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
    from_env = DistributedConfig.from_env()
    if from_env is not None:
        return from_env
    return DistributedConfig() if options["distributed"] else None


def _load_model(options: dict[str, Any], mesh: Any) -> tuple[Any, str]:
    import jax

    import lorax
    from lorax import demo

    on_gpu = jax.default_backend() != "cpu"
    dtype = (
        options["dtype"] if options["dtype"] != "auto" else ("bfloat16" if on_gpu else "float32")
    )
    quantize = {"auto": "nf4" if on_gpu else None, "none": None, "nf4": "nf4"}.get(
        options["quantize"], options["quantize"]
    )
    source = options["model"]
    if source is None:
        source = _bundled_model() or "tiny"
    if source == "tiny":
        return demo.tiny_model(dtype=lorax.loading.resolve_dtype(dtype)), "tiny"
    return lorax.load(source, quantize=quantize, dtype=dtype, mesh=mesh), source


def _bundled_model() -> str | None:
    try:
        from convert.gguf import bundled_smollm2_path
    except ImportError:
        return None
    return bundled_smollm2_path()


def cmd_train(args: argparse.Namespace) -> int:
    import jax

    import lorax
    import lorax.distributed
    import lorax.sharding
    from convert.peft import check_peft_reads_targets
    from lorax.data import demo_data_path
    from lorax.generate import generate_text
    from lorax.kernel_weights import kernel_groups_for
    from lorax.train.trainer import TrainConfig, Trainer

    options = _resolve_options(args)
    cfg = TrainConfig(
        **{f.name: options[f.name] for f in dataclasses.fields(TrainConfig) if f.name in options}
    )
    distributed = _distributed_config(options)
    if distributed is not None:
        # Before anything touches a JAX backend: the processes must meet first.
        lorax.distributed.initialize(distributed)
    primary = lorax.distributed.is_primary()
    t0 = time.perf_counter()
    mesh = lorax.sharding.make_mesh(cfg.mesh)
    model, described = _load_model(options, mesh)
    if primary:
        print(
            f"model: {described} ({model.config.model_type}, {model.config.num_layers} layers, "
            f"{model.config.num_parameters() / 1e6:.1f}M params) loaded in "
            f"{time.perf_counter() - t0:.1f}s on {lorax.sharding.describe(mesh)}"
        )
    groups = kernel_groups_for(model, options["kernel_weights"], cfg.batch_size * cfg.seq_len)
    if groups:
        model = lorax.prepare_kernel_weights(model, groups)
        if primary:
            print(f"kernel weights: {', '.join(groups)} in the Mosaic GPU kernel's layout")
    targets, left_out = _targets(options["targets"], model.config)
    if left_out and primary:
        from convert.peft import misread_modules

        print(
            f"targets: {options['targets']} leaves out {left_out} of "
            f"{misread_modules(model.config)}: the run saves a PEFT adapter, and PEFT reads "
            "those names as the experts'. To adapt them, train with the Python API and export "
            "the merged model (save_merged)"
        )
    lora = lorax.init_lora(
        model,
        rank=options["rank"],
        alpha=options["alpha"],
        targets=targets,
        key=jax.random.key(cfg.seed),
        dropout=options["dropout"],
        use_rslora=options["use_rslora"],
    )
    # The run ends by saving a PEFT adapter: refuse targets PEFT cannot apply before training.
    check_peft_reads_targets(model.config, lora.config.targets)
    data = options["data"] or str(demo_data_path())
    prompt = options["prompt"] or (DEMO_PROMPT if options["data"] is None else None)
    # Sampling runs a whole-sequence forward outside the mesh: one process only.
    new_tokens = options["max_new_tokens"] if jax.process_count() == 1 else 0
    sample = _sampler(model, prompt, new_tokens, generate_text)
    sample("before", lora)
    trainer = Trainer(model, lora, data, cfg, eval_dataset=options["eval_data"], mesh=mesh)
    if primary:
        print(f"data: {data}: {trainer.loader.stats}")
    lora = trainer.train()
    host_lora = lorax.sharding.to_host(lora)  # every process takes part in the gather
    if not primary:
        return 0
    history = trainer.logged_metrics()
    if history:
        print(
            f"loss: {history[0]['loss']:.4f} (step {history[0]['step']}) -> "
            f"{history[-1]['loss']:.4f} (step {history[-1]['step']})"
        )
    sample("after", lora)
    adapter_dir = os.path.join(cfg.output_dir, "adapter")
    lorax.save_adapter(model, host_lora, adapter_dir, base_model_name_or_path=described)
    print(
        f"adapter: {adapter_dir}\nmetrics: {os.path.join(cfg.output_dir, 'metrics.jsonl')}\n"
        f"loss curve: {os.path.join(cfg.output_dir, 'loss_curve.png')}"
    )
    return 0


def _targets(option: Any, config: Any) -> tuple[Any, list[str]]:
    """``--targets`` as ``init_lora`` takes it, and what a preset leaves out: the run ends by
    saving a PEFT adapter, so a preset (``all-linear``, the default, or ``mlp``) keeps only
    the projections PEFT reads as lorax's; named ones are taken as given (and refused by
    ``check_peft_reads_targets`` where PEFT would misread them)."""
    from convert.peft import peft_misread_targets
    from lorax.lora import resolve_targets, target_presets

    if not isinstance(option, str) or option not in target_presets(config):
        if isinstance(option, str):
            option = [t.strip() for t in option.split(",")]
        return option, []
    resolved = resolve_targets(option, config)
    left_out = peft_misread_targets(config, resolved)
    return [t for t in resolved if t not in left_out], left_out


def _sampler(model: Any, prompt: str | None, max_new_tokens: int, generate_text: Any):
    def sample(when: str, lora: Any) -> None:
        if prompt is None or model.tokenizer is None or max_new_tokens <= 0:
            return
        text = generate_text(model, lora, prompt, max_new_tokens=max_new_tokens)
        print(f"sample {when} training: {prompt!r} -> {text!r}")

    return sample


def _export_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export a trained adapter: GGUF, merged HF model, or PEFT adapter",
        description="Load the base model and a LoRA adapter (PEFT format, e.g. OUTPUT_DIR/adapter "
        "from `lorax train`) and write OUT in one format.",
    )
    p.add_argument("out", help="output file (GGUF) or directory (merged model, PEFT adapter)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument(
        "--model",
        default=None,
        help="base model: HF directory, .gguf file or "
        "'tiny' (default: the adapter's base_model_name_or_path)",
    )
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument(
        "--gguf",
        metavar="QUANT",
        help="GGUF for llama.cpp / Ollama: f32, f16, "
        "bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k",
    )
    fmt.add_argument(
        "--merged",
        metavar="DTYPE",
        help="HF model with LoRA merged: bfloat16, float16, float32 or nf4 (bitsandbytes 4-bit)",
    )
    fmt.add_argument("--peft", action="store_true", help="PEFT adapter directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT directory")
    return p


def cmd_export(args: argparse.Namespace) -> int:
    import lorax
    from convert.peft import adapter_base_model
    from lorax import demo

    base = args.model or adapter_base_model(args.adapter)
    if not base:
        raise SystemExit(f"lorax export: {args.adapter} names no base model; pass --model PATH")
    dtype = "float32" if args.merged == "float32" else "bfloat16"
    model = demo.tiny_model() if base == "tiny" else lorax.load(base, dtype=dtype)
    lora = lorax.load_adapter(model, args.adapter)
    if args.gguf:
        lorax.export_gguf(model, lora, args.out, quant=args.gguf)
    elif args.merged:
        lorax.save_merged(model, lora, args.out, dtype=args.merged, allow_overwrite=args.overwrite)
    else:
        lorax.save_adapter(
            model, lora, args.out, base_model_name_or_path=base, allow_overwrite=args.overwrite
        )
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub).set_defaults(func=cmd_train)
    _export_parser(sub).set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Our errors name the file, tensor and values; a traceback would only bury that.
        print(f"lorax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
