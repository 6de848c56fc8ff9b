"""PyTorch side of the end-to-end QLoRA benchmark: HF+PEFT+bitsandbytes and Unsloth.

Same workload as scripts/bench_train.py and ../shared/reference/h200-baselines.md: the
Llama-3.1-8B architecture with random N(0, 0.02) bf16 weights (norms 1), written once as a
safetensors checkpoint plus a dummy 128256-id tokenizer to --model-dir; LoRA r=16 alpha=16
dropout 0 on q,k,v,o,gate,up,down; torch.optim.AdamW lr 1e-4; causal-LM loss on random token ids
with labels = input_ids (4 fixed batches rotated); `torch.cuda.synchronize()` around each step;
3 warm-up steps, then the median of 10 timed steps; peak memory from max_memory_allocated after
reset_peak_memory_stats at the start of each shape. Each system runs in its own subprocess.

Systems (--systems):
  hf_peft_bnb   transformers + PEFT + bitsandbytes NF4 (double quant, compute bf16), sdpa,
                gradient_checkpointing_enable(use_reentrant=False), no
                prepare_model_for_kbit_training
  unsloth       FastLanguageModel 4-bit, get_peft_model(use_gradient_checkpointing="unsloth"),
                for_training
  hf_peft_bf16, unsloth_bf16   the same without quantization (also what --no-quant selects)

The GPU image lacks bitsandbytes, unsloth & co.; they are carried unzipped in .site/ (ignored by
git through .git/info/exclude; carry=[".site"]). On the device, from the repository root
(each fits one 10-minute call; --deadline-s 540 by default):

    export PYTHONPATH=$PWD/.site; python3 scripts/bench_torch.py --json $OUT/torch.json
    export PYTHONPATH=$PWD/.site; python3 scripts/bench_torch.py --max-context \\
        --json $OUT/torch_maxctx.json

(the script also puts .site on sys.path and PYTHONPATH itself when it exists). --max-context
finds, for each memory cap in --caps (GiB, set with torch.cuda.set_per_process_memory_fraction),
the longest batch-1 sequence whose training step fits: it first calibrates peak memory and step
time against S without a cap, predicts each cap's limit, then gallops/bisects around the
prediction in steps of --granularity tokens until --deadline-s. Probes run in one worker process
that recovers from OOM (restarted if it dies); --isolate-probes runs each capped probe in a fresh
process instead (cap set before loading, as on a smaller card; about a minute per probe for
Unsloth).

CPU smoke test (no bitsandbytes needed):

    python3 scripts/bench_torch.py --tiny --no-quant --systems hf_peft_bnb --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _common import fit_line

START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(REPO, ".site")


def _use_site() -> None:
    """Put the carried wheels first on sys.path, and on PYTHONPATH for every child process."""
    if not os.path.isdir(SITE):
        return
    if SITE not in sys.path:
        sys.path.insert(0, SITE)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if SITE not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([SITE, *parts])


_use_site()
# No network on the device: keep every library from trying the hub.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

LLAMA31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
)
TINY = dict(
    LLAMA31_8B,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEMS = {  # name -> (family, 4-bit)
    "hf_peft_bnb": ("hf", True),
    "hf_peft_bf16": ("hf", False),
    "unsloth": ("unsloth", True),
    "unsloth_bf16": ("unsloth", False),
}
BF16_TWIN = {"hf_peft_bnb": "hf_peft_bf16", "unsloth": "unsloth_bf16"}
SEED = 0
MARKER = "lorax_bench_done.json"
GIB = 2**30


# ----------------------------------------------------------------------------------- checkpoint


def model_config(tiny: bool) -> dict:
    """config.json of the benchmark model (legacy rope_theta form; transformers 5 converts it)."""
    c = TINY if tiny else LLAMA31_8B
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        torch_dtype="bfloat16",
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        initializer_range=0.02,
        pretraining_tp=1,
        rope_scaling=None,
        tie_word_embeddings=False,
        use_cache=True,
        bos_token_id=128000,
        eos_token_id=128001,
        **c,
    )


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama parameter names and shapes, in checkpoint order."""
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, d))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (q, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, q)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (i, d)),
            (p + "mlp.up_proj.weight", (i, d)),
            (p + "mlp.down_proj.weight", (d, i)),
        ]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A WordLevel tokenizer with vocab_size ids and Llama-3 special-token names from 128000."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128004: "<|finetune_right_pad_id|>",
        128009: "<|eot_id|>",
    }
    vocab = {}
    for n in range(vocab_size):
        if n >= 128000:
            vocab[special.get(n, f"<|reserved_special_token_{n - 128000}|>")] = n
        else:
            vocab[f"t{n}"] = n
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special[128000],
        eos_token=special[128001],
        pad_token=special[128004],
        unk_token="t0",
        model_max_length=8192,
    )
    fast.save_pretrained(path)


def plan_shards(cfg: dict, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensor_shapes(cfg):
        nbytes = math.prod(shape) * 2
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_checkpoint(path: str, tiny: bool, shard_bytes: int = 4 * GIB) -> None:
    """Random N(0, 0.02) bf16 weights (norms 1) as sharded safetensors, generated on the GPU."""
    import torch
    from safetensors.torch import save_file

    cfg = model_config(tiny)
    os.makedirs(path, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(SEED)
    shards = plan_shards(cfg, shard_bytes)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in names:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                w = torch.empty(shape, dtype=torch.bfloat16, device=dev)
                tensors[name] = w.normal_(0.0, 0.02, generator=gen).cpu()
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    write_tokenizer(path, cfg["vocab_size"])
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"config": cfg, "seed": SEED}, f)


def checkpoint_ready(path: str, tiny: bool) -> bool:
    try:
        with open(os.path.join(path, MARKER)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    return done.get("config") == model_config(tiny) and done.get("seed") == SEED


def ensure_checkpoint(path: str, tiny: bool, deadline: float) -> None:
    """Write the checkpoint in a subprocess (the parent never touches CUDA) unless present."""
    if checkpoint_ready(path, tiny):
        print(f"checkpoint: reusing {path}", flush=True)
        return
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "make-model",
        "--model-dir",
        path,
    ] + (["--tiny"] if tiny else [])
    rc, _, _ = run_worker(cmd, deadline, tag="make-model")
    if rc or not checkpoint_ready(path, tiny):
        raise RuntimeError(f"writing the checkpoint to {path} failed (rc={rc})")
    print(f"checkpoint: wrote {path} in {time.perf_counter() - t0:.1f}s", flush=True)


# -------------------------------------------------------------------------------------- loading

TIMES: dict[str, float] = {}  # seconds since START at which imports / loading finished


def versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "unsloth",
        "unsloth_zoo",
        "triton",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def load_hf(path: str, quant: bool):
    """transformers + PEFT (+ bitsandbytes NF4), sdpa, non-reentrant gradient checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    TIMES["import_s"] = time.perf_counter() - START
    cuda = torch.cuda.is_available()
    # CPU (smoke tests only): fp32 compute, since bf16 matmuls are very slow there.
    kwargs = dict(dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa")
    if quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
    if cuda:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()  # from_pretrained returns eval mode, where checkpointing is off
    return model


def load_unsloth(path: str, quant: bool, max_seq_length: int):
    """Unsloth's QLoRA recipe as in h200-baselines.md section 1."""
    import torch
    import unsloth  # noqa: F401  (before transformers / peft, so it can patch them)
    from unsloth import FastLanguageModel

    TIMES["import_s"] = time.perf_counter() - START
    model, _tokenizer = FastLanguageModel.from_pretrained(
        path,
        max_seq_length=max_seq_length,
        dtype=torch.bfloat16,
        load_in_4bit=quant,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=TARGETS,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
    )
    FastLanguageModel.for_training(model)
    return model


def load_system(system: str, path: str, max_seq_length: int):
    family, quant = SYSTEMS[system]
    if family == "unsloth":
        model = load_unsloth(path, quant, max_seq_length)
    else:
        model = load_hf(path, quant)
    TIMES["loaded_s"] = time.perf_counter() - START
    return model


def system_config(system: str) -> str:
    family, quant = SYSTEMS[system]
    lora = "LoRA r16 a16 d0 q,k,v,o,gate,up,down (f32); torch AdamW lr 1e-4 wd 0"
    if family == "hf":
        base = "bnb NF4 double-quant, compute bf16" if quant else "bf16 base"
        return f"transformers+PEFT, {base}, sdpa, grad ckpt use_reentrant=False; {lora}"
    base = "load_in_4bit" if quant else "16-bit (load_in_4bit=False)"
    return f"unsloth FastLanguageModel {base}, gc='unsloth', for_training; {lora}"


def set_unsloth_max_seq_length(model, seq: int) -> None:
    """What FastLanguageModel.from_pretrained does with max_seq_length (it truncates past it)."""
    model.max_seq_length = seq
    for module in model.modules():
        module.max_seq_length = seq


# ------------------------------------------------------------------------------------- stepping


def compute_device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0), sum(p.numel() for p in params)


def make_batches(b: int, s: int, vocab: int, device, n: int = 4) -> list:
    """n fixed random batches, the same for every system (so step-0 losses must agree)."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1000 * b + s)
    return [torch.randint(0, vocab, (b, s), generator=gen).to(device) for _ in range(n)]


def timed_step(model, opt, ids) -> tuple[float, object]:
    """One synchronized training step; returns (seconds, detached loss)."""
    sync(ids.device)
    t0 = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    sync(ids.device)
    return time.perf_counter() - t0, loss.detach()


def reset_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> tuple[float | None, float | None]:
    """(max allocated, max reserved) in GiB since the last reset; None on CPU."""
    import torch

    if device.type != "cuda":
        return None, None
    return (
        torch.cuda.max_memory_allocated(device) / GIB,
        torch.cuda.max_memory_reserved(device) / GIB,
    )


def bench_shape(model, opt, shape: str, warmup: int, steps: int) -> dict:
    b, s = (int(x) for x in shape.split("x"))
    device = compute_device()
    batches = make_batches(b, s, model.config.vocab_size, device)
    reset_memory(device)
    times, losses, first_done = [], [], None
    for i in range(warmup + steps):
        dt, loss = timed_step(model, opt, batches[i % len(batches)])
        first_done = first_done or time.perf_counter() - START
        losses.append(float(loss))
        times.append(dt)
    timed = times[warmup:]
    median = statistics.median(timed)
    alloc, reserved = peak_memory(device)
    return {
        "shape": shape,
        "tokens_per_s": b * s / median,
        "median_step_s": median,
        "min_step_s": min(timed),
        "max_step_s": max(timed),
        "first_step_s": times[0],
        "first_step_done_s": first_done,
        "peak_mem_gib": alloc,
        "peak_reserved_gib": reserved,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps_timed": len(timed),
        "warmup": warmup,
    }


# -------------------------------------------------------------------------------------- workers


def emit(tag: str, payload: dict) -> None:
    print(f"{tag} " + json.dumps(payload), flush=True)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def error_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def worker_bench(a) -> None:
    """One system, every shape in turn; one ROW line per shape (failures included)."""
    shapes = a.shapes.split(",")
    max_s = max(8192, *(int(x.split("x")[1]) for x in shapes))
    model = load_system(a.system, a.model_dir, max_s)
    opt, n_train = make_optimizer(model)
    base = {
        "system": a.system,
        "config": system_config(a.system),
        "device": device_name(),
        "versions": versions(),
        "trainable_params": n_train,
        **TIMES,
    }
    first = True
    for shape in shapes:
        try:
            row = bench_shape(model, opt, shape, a.warmup, a.steps)
        except Exception as e:  # an OOM at one shape must not lose the others
            emit(
                "ROW",
                dict(
                    base,
                    shape=shape,
                    tokens_per_s=None,
                    peak_mem_gib=None,
                    notes=f"FAILED {error_text(e)}",
                    error=error_text(e),
                ),
            )
            opt.zero_grad()
            reset_memory(compute_device())
            continue
        if first:
            row["start_to_first_step_s"] = row["first_step_done_s"]
            first = False
        row["notes"] = (
            f"median of {row['steps_timed']} after {a.warmup} warm-up; steps "
            f"{row['min_step_s']:.3f}-{row['max_step_s']:.3f}s; first step at this "
            f"shape {row['first_step_s']:.1f}s"
        )
        emit("ROW", dict(base, **row))


def set_cap(cap_gib: float) -> None:
    """Emulate a card with cap_gib of memory (0: no cap)."""
    import torch

    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(
        min(1.0, cap_gib * GIB / total) if cap_gib else 1.0, 0
    )


def probe_once(model, opt, seq: int, cap_gib: float, steps: int) -> dict:
    """Train `steps` steps at 1 x seq under a memory cap (0 = none); an OOM is a result."""
    import torch

    device = compute_device()
    reset_memory(device)
    set_cap(cap_gib)
    if hasattr(model, "max_seq_length"):  # unsloth only
        set_unsloth_max_seq_length(model, max(seq, 8192))
    out = {"seq": seq, "cap_gib": cap_gib, "ok": True, "oom": False}
    try:
        ids = make_batches(1, seq, model.config.vocab_size, device, n=1)[0]
        times = [timed_step(model, opt, ids)[0] for _ in range(steps)]
        out["step_s"] = times[-1]
    except Exception as e:
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        out.update(ok=False, oom=oom, error=error_text(e))
    opt.zero_grad()
    out["peak_mem_gib"], out["peak_reserved_gib"] = peak_memory(device)
    reset_memory(device)
    return out


def cuda_healthy() -> bool:
    import torch

    try:
        if torch.cuda.is_available():
            torch.ones(4, device="cuda").add_(1).sum().item()
        return True
    except Exception:
        return False


def worker_probe(a) -> None:
    """Max-context worker. With --probe "CAP SEQ STEPS": one probe, the cap set before loading
    (as on a smaller card). Otherwise: load once, print READY, then answer "CAP SEQ STEPS"
    lines from stdin with PROBE lines."""
    once = [float(x) for x in a.probe.split()] if a.probe else None
    cap0 = once[0] if once else 0.0
    if SYSTEMS[a.system][0] == "unsloth":
        # Before CUDA starts: importing unsloth sets PYTORCH_ALLOC_CONF=expandable_segments,
        # which the allocator reads only when it is created.
        import unsloth  # noqa: F401
    set_cap(cap0)
    try:
        model = load_system(a.system, a.model_dir, max(8192, int(once[1]) if once else 8192))
        opt, _ = make_optimizer(model)
    except Exception as e:  # e.g. OOM while loading under a cap: a failed probe
        if not once:
            raise
        emit(
            "PROBE",
            {
                "seq": int(once[1]),
                "cap_gib": cap0,
                "ok": False,
                "oom": "memory" in str(e).lower(),
                "error": "load: " + error_text(e),
            },
        )
        return
    warm = probe_once(model, opt, 512, cap0, 2)  # compiles; creates the AdamW state
    if once:
        res = probe_once(model, opt, int(once[1]), cap0, int(once[2]))
        emit("PROBE", dict(res, startup_s=time.perf_counter() - START, warm=warm))
        return
    emit(
        "READY",
        {
            "device": device_name(),
            "startup_s": time.perf_counter() - START,
            "warm": warm,
            "versions": versions(),
            "config": system_config(a.system),
        },
    )
    for line in sys.stdin:
        if not line.strip() or line.strip() == "quit":
            break
        cap, seq, steps = line.split()
        res = probe_once(model, opt, int(seq), float(cap), int(steps))
        emit("PROBE", res)
        if not res["ok"] and not cuda_healthy():
            sys.exit(3)  # sticky CUDA error: the parent starts a fresh worker


# --------------------------------------------------------------------------------------- parent


def _pump(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


class Worker:
    """A child process (own process group) whose output is echoed, prefixed, and scanned for
    tagged JSON lines ("ROW {...}", "PROBE {...}", "READY {...}")."""

    def __init__(self, cmd: list[str], tag: str, stdin: bool = False):
        self.tag = tag
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.tail: list[str] = []
        self.done = False
        threading.Thread(target=_pump, args=(self.proc.stdout, self.lines), daemon=True).start()

    def next_tagged(self, tags: tuple[str, ...], deadline: float) -> tuple[str, dict] | None:
        """Echo output until a line tagged with one of `tags`; None at exit or deadline."""
        while not self.done:
            try:
                line = self.lines.get(timeout=max(0.01, min(5.0, deadline - time.time())))
            except queue.Empty:
                if time.time() >= deadline:
                    print(f"[{self.tag}] deadline reached: killing it", flush=True)
                    self.kill()
                    return None
                continue
            if line is None:
                self.done = True
                break
            line = line.rstrip("\n")
            self.tail = (self.tail + [line])[-15:]
            tag = line.split(" ", 1)[0]
            if tag in tags:
                return tag, json.loads(line[len(tag) + 1 :])
            print(f"[{self.tag}] {line}", flush=True)
        return None

    def send(self, text: str) -> bool:
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.done = True

    def finish(self, timeout: float = 60.0) -> int:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


def run_worker(cmd: list[str], deadline: float, tag: str) -> tuple[int, list[dict], str]:
    """Run a child to completion (or the deadline): its exit code, ROW payloads, last line."""
    w = Worker(cmd, tag)
    rows = []
    while (got := w.next_tagged(("ROW",), deadline)) is not None:
        rows.append(got[1])
    rc = w.finish(timeout=max(1.0, deadline - time.time()))
    if rc:
        print(f"[{tag}] exited with {rc}; last lines:\n  " + "\n  ".join(w.tail[-8:]), flush=True)
    last = next((ln.strip() for ln in reversed(w.tail) if ln.strip()), "")
    return rc, rows, last


def worker_cmd(a, kind: str, system: str) -> list[str]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--system",
        system,
        "--model-dir",
        a.model_dir,
        "--shapes",
        a.shapes,
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
    ]
    return cmd + (["--tiny"] if a.tiny else [])


def failed_row(system: str, shape: str | None, why: str) -> dict:
    return {
        "system": system,
        "shape": shape,
        "tokens_per_s": None,
        "peak_mem_gib": None,
        "config": system_config(system),
        "notes": f"FAILED ({why})",
        "error": why,
    }


def run_bench(a, deadline: float) -> tuple[list[dict], str | None]:
    """Each system in its own subprocess, in turn; a failure of one never stops the next."""
    rows, device = [], None
    for system in a.systems:
        t0 = time.time()
        try:
            rc, got, last = run_worker(worker_cmd(a, "bench", system), deadline, tag=system)
        except Exception as e:
            rc, got, last = -1, [], repr(e)
        seen = {r["shape"] for r in got}
        why = "deadline" if time.time() >= deadline else f"worker exit {rc}: {last[:300]}"
        got += [failed_row(system, s, why) for s in a.shapes.split(",") if s not in seen]
        for r in got:
            device = device or r.get("device")
            print_bench_row(r)
        rows += got
        print(f"[{system}] {time.time() - t0:.0f}s wall", flush=True)
    return rows, device


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def print_bench_row(r: dict) -> None:
    if r.get("tokens_per_s") is None:
        print(f"{r['system']:<13} {r['shape'] or '-':>7}  {r['notes']}", flush=True)
        return
    first = r.get("start_to_first_step_s")
    print(
        f"{r['system']:<13} {r['shape']:>7} {r['tokens_per_s']:8.0f} tok/s  median "
        f"{r['median_step_s']:.3f}s  peak {gib(r['peak_mem_gib']):>6} GiB alloc "
        f"{gib(r.get('peak_reserved_gib')):>6} reserved  loss0 {r['first_loss']:.4f}"
        + (f"  start->first step {first:.1f}s" if first else ""),
        flush=True,
    )


def print_bench_table(rows: list[dict]) -> None:
    print(
        "\n| system | shape | tokens/s | median step (s) | peak alloc GiB | peak reserved GiB "
        "| first loss | start→first step (s) | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("tokens_per_s") is None:
            print(f"| {r['system']} | {r.get('shape')} | – | – | – | – | – | – | {r['notes']} |")
            continue
        first = r.get("start_to_first_step_s")
        print(
            f"| {r['system']} | {r['shape']} | {r['tokens_per_s']:.0f} | "
            f"{r['median_step_s']:.3f} | {gib(r['peak_mem_gib'])} | "
            f"{gib(r.get('peak_reserved_gib'))} | {r['first_loss']:.4f} | "
            f"{f'{first:.1f}' if first else ''} | {r['notes']} |",
            flush=True,
        )


# ---------------------------------------------------------------------------------- max context


class Prober:
    """probe(cap, seq, steps) answered by one long-lived worker, restarted if it dies."""

    def __init__(self, a, system: str):
        self.a, self.system, self.w, self.info = a, system, None, {}
        self.startup_s = 0.0  # extra seconds a probe costs besides its steps

    def _start(self, deadline: float) -> bool:
        self.w = Worker(
            worker_cmd(self.a, "probe", self.system), f"{self.system} worker", stdin=True
        )
        got = self.w.next_tagged(("READY",), deadline)
        if got is None:
            self.w.finish(5)
            self.w = None
            return False
        self.info = got[1]
        return True

    def probe(self, cap: float, seq: int, steps: int, deadline: float) -> dict:
        fail = {"seq": seq, "cap_gib": cap, "ok": False, "oom": False}
        if (self.w is None or self.w.done) and not self._start(deadline):
            return dict(fail, error="worker failed to start")
        if not self.w.send(f"{cap} {seq} {steps}"):
            self.w.finish(5)
            self.w = None
            return dict(fail, error="worker gone")
        got = self.w.next_tagged(("PROBE",), deadline)
        if got is None:  # died mid-probe (host OOM, CUDA abort) or deadline
            rc = self.w.finish(5)
            self.w = None
            late = time.time() >= deadline
            return dict(fail, oom=not late, error="deadline" if late else f"worker exit {rc}")
        return got[1]

    def close(self) -> None:
        if self.w is not None:
            self.w.send("quit")
            self.w.finish(30)
            self.w = None


class IsolatedProber(Prober):
    """Each probe in a fresh process with the cap set before loading (--isolate-probes)."""

    def probe(self, cap: float, seq: int, steps: int, deadline: float) -> dict:
        cmd = worker_cmd(self.a, "probe", self.system) + ["--probe", f"{cap} {seq} {steps}"]
        w = Worker(cmd, f"{self.system} {cap:g}GiB S={seq}")
        got = w.next_tagged(("PROBE",), deadline)
        rc = w.finish(10)
        if got is None:
            late = time.time() >= deadline
            return {
                "seq": seq,
                "cap_gib": cap,
                "ok": False,
                "oom": not late and rc != 0,
                "error": "deadline" if late else f"process exit {rc}",
            }
        res = got[1]
        self.startup_s = res.get("startup_s", self.startup_s)
        return res

    def close(self) -> None:
        pass


class CostModel:
    """From uncapped probes: peak GiB ~ a + b*S and step seconds ~ S*(c + d*S) at batch 1."""

    def __init__(self, calib: list[dict]):
        pts = [p for p in calib if p["ok"] and p.get("peak_mem_gib") is not None]
        if len(pts) < 2:
            raise RuntimeError(f"calibration needs 2 successful probes, got {calib}")
        seqs = [p["seq"] for p in pts]
        self.mem = fit_line(seqs, [p["peak_mem_gib"] for p in pts])
        c, d = fit_line(seqs, [p["step_s"] / p["seq"] for p in pts])
        last = max(pts, key=lambda p: p["seq"])
        self.time = (c, max(d, 0.0)) if c > 0 else (last["step_s"] / last["seq"], 0.0)

    def max_seq(self, cap_gib: float) -> int:
        a, b = self.mem
        return int((cap_gib - a) / b) if b > 0 else 0

    def step_s(self, seq: int) -> float:
        c, d = self.time
        return seq * (c + d * seq)


def known_bounds(cap: float, probes: list[dict], g: int, max_s: int) -> tuple[int, int]:
    """(largest S known to fit under cap or 0, smallest S known not to or max_s + g).

    A fit under a smaller cap, or uncapped with peak reserved <= cap, implies a fit; an OOM
    under a larger cap, or uncapped peak allocated > cap, implies no fit."""
    lo, hi = 0, max_s + g
    for p in probes:
        pcap = p["cap_gib"] or math.inf
        if p["ok"] and (pcap <= cap or (p.get("peak_reserved_gib") or math.inf) <= cap):
            lo = max(lo, p["seq"])
        if (p.get("oom") and pcap >= cap) or (p["ok"] and (p.get("peak_mem_gib") or 0) > cap):
            hi = min(hi, p["seq"])
    return lo, max(hi, lo + g)


def next_seq(ok: bool, seq: int, lo: int, hi: int, stride: int, g: int, seen: set) -> int:
    """Gallop away from the last probe until this search has seen both an ok and an OOM (the
    prediction is usually within a few strides), then bisect. `seen` holds the outcomes."""
    if ok and False not in seen:
        return seq + stride
    if not ok and True not in seen:
        return seq - stride
    return (lo + hi) // 2 // g * g


def search_cap(
    cap: float, prober: Prober, cost: CostModel, probes: list[dict], a, deadline: float
) -> dict:
    """Longest S (multiple of a.granularity) that fits under cap: start at the prediction,
    gallop until bracketed, then bisect; stop early at the deadline."""
    g = a.granularity
    pred = max(g, cost.max_seq(cap) // g * g)
    lo, hi = known_bounds(cap, probes, g, a.max_s)
    seq, stride, status, seen = min(max(pred, lo + g), hi - g), g, "resolved", set()
    notes: list[str] = []
    while hi - lo > g:
        if not lo < seq < hi:
            seq = (lo + hi) // 2 // g * g
        need = cost.step_s(seq) * a.probe_steps * 1.5 + prober.startup_s + 20
        if time.time() + need > deadline:
            status = f"deadline (S={seq} would need ~{need:.0f}s)"
            break
        r = prober.probe(cap, seq, a.probe_steps, deadline)
        probes.append(r)
        verdict = "ok " if r["ok"] else "OOM" if r["oom"] else "ERR"
        print(
            f"  cap {cap:g} GiB  S={seq:>7}  {verdict}  peak {r.get('peak_mem_gib') or 0:.2f} "
            f"GiB  step {r.get('step_s') or 0:.1f}s  {r.get('error', '')}",
            flush=True,
        )
        if not r["ok"] and not r["oom"]:
            status = f"error at S={seq}: {r.get('error')}"
            break
        if r["ok"] and (r.get("peak_reserved_gib") or 0) > cap * 1.01:
            notes.append(f"cap not enforced: S={seq} reserved {r['peak_reserved_gib']:.2f} GiB")
            print(f"  WARNING {notes[-1]}", flush=True)
        lo, hi = (seq, hi) if r["ok"] else (lo, seq)
        seen.add(r["ok"])
        seq = next_seq(r["ok"], seq, lo, hi, stride, g, seen)
        stride *= 2
    at_lo = [p for p in probes if p["ok"] and p["seq"] == lo]
    return {
        "cap_gib": cap,
        "predicted_seq": pred,
        "max_seq_len": lo or None,
        "verified": status == "resolved" and lo > 0,
        "lo_ok": lo or None,
        "hi_fail": hi if hi <= a.max_s else None,
        "status": status,
        "peak_mem_gib_at_max": at_lo[-1].get("peak_mem_gib") if at_lo else None,
        "step_s_at_max": at_lo[-1].get("step_s") if at_lo else None,
        "notes": "; ".join(notes),
    }


def run_max_context(a, system: str, deadline: float, probes: list[dict]) -> dict:
    """Calibrate without a cap in one worker, then search each cap, smallest first. Every
    probe is appended to `probes` as it happens, so a failure keeps what was measured."""
    base = prober = Prober(a, system)
    try:
        for seq in (int(x) for x in a.calib_seqs.split(",")):
            r = base.probe(0, seq, max(2, a.probe_steps), deadline)  # 2: the 1st may compile
            probes.append(r)
            print(
                f"  calibrate S={seq:>6}: {'ok' if r['ok'] else r.get('error')}  peak "
                f"{r.get('peak_mem_gib') or 0:.2f} GiB  step {r.get('step_s') or 0:.2f}s",
                flush=True,
            )
        cost = CostModel(probes)
        print(
            f"  fit: peak GiB = {cost.mem[0]:.2f} + S x {cost.mem[1] * 2**20:.1f} KiB; "
            f"step s = S x ({cost.time[0]:.3e} + {cost.time[1]:.3e} S)",
            flush=True,
        )
        if a.isolate_probes:
            base.close()  # frees the GPU for the fresh processes
            prober = IsolatedProber(a, system)
            prober.startup_s = base.info.get("startup_s", 90.0)
        rows = [
            dict(search_cap(cap, prober, cost, probes, a, deadline), system=system)
            for cap in sorted(a.caps)
        ]
    finally:
        prober.close()
        base.close()
    return {
        "rows": rows,
        "info": base.info,
        "calibration": {"mem_gib": list(cost.mem), "time_s": list(cost.time)},
    }


def print_max_context(rows: list[dict]) -> None:
    print(
        "\n| system | cap GiB | max S (batch 1) | predicted S | fails at S | peak alloc GiB "
        "| step s | status |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["max_seq_len"]
        ms = "–" if ms is None else f"{ms}" if r["verified"] else f">= {ms}"
        print(
            f"| {r['system']} | {r['cap_gib']:g} | {ms} | {r['predicted_seq']} | "
            f"{r['hi_fail'] or '–'} | {r['peak_mem_gib_at_max'] or 0:.2f} | "
            f"{r['step_s_at_max'] or 0:.1f} | {r['status']} |",
            flush=True,
        )


# ----------------------------------------------------------------------------------------- main


def git_commit() -> str:
    if os.environ.get("LORAX_COMMIT"):
        return os.environ["LORAX_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--systems",
        default=None,
        help=f"comma list of {', '.join(SYSTEMS)} (default hf_peft_bnb,unsloth; "
        "unsloth with --max-context)",
    )
    p.add_argument("--shapes", default=None, help="BxS list (default 2x2048,1x8192)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--deadline-s",
        type=float,
        default=540.0,
        help="wall-clock budget of the whole run; workers past it are killed",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--model-dir", default=None, help="checkpoint dir (default: under $TMPDIR)")
    p.add_argument("--tiny", action="store_true", help="2-layer, hidden-256 model (smoke tests)")
    p.add_argument(
        "--no-quant",
        action="store_true",
        help="bf16 base instead of NF4 (hf_peft_bnb->hf_peft_bf16, unsloth->"
        "unsloth_bf16); runs on CPU without bitsandbytes",
    )
    p.add_argument("--commit", default=None, help="recorded in the JSON (default: git HEAD)")
    g = p.add_argument_group("max context")
    g.add_argument(
        "--max-context",
        action="store_true",
        help="find the longest batch-1 S whose step fits under each memory cap",
    )
    g.add_argument("--caps", default="12,16,24,40,48,80", help="memory caps, GiB")
    g.add_argument("--granularity", type=int, default=2048, help="resolution of S, tokens")
    g.add_argument(
        "--calib-seqs",
        default="2048,4096,8192,16384",
        help="uncapped S values that the memory/time model is fitted on",
    )
    g.add_argument("--max-s", type=int, default=524288, help="never probe above this S")
    g.add_argument("--probe-steps", type=int, default=1, help="training steps per probe")
    g.add_argument(
        "--isolate-probes",
        action="store_true",
        help="each capped probe in a fresh process (cleanest; ~1 min each)",
    )
    p.add_argument("--worker", choices=["bench", "probe", "make-model"], help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.shapes is None:
        a.shapes = "2x128,1x256" if a.tiny else "2x2048,1x8192"
    if a.model_dir is None:
        name = "lorax_bench_tiny" if a.tiny else "lorax_bench_llama8b"
        a.model_dir = os.path.join(tempfile.gettempdir(), name)
    if a.systems is None:
        a.systems = "unsloth" if a.max_context else "hf_peft_bnb,unsloth"
    a.systems = [BF16_TWIN.get(s, s) if a.no_quant else s for s in a.systems.split(",")]
    if unknown := [s for s in a.systems if s not in SYSTEMS]:
        p.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    a.caps = [float(x) for x in a.caps.split(",")]
    a.max_s = a.max_s // a.granularity * a.granularity
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        {
            "make-model": lambda: write_checkpoint(a.model_dir, a.tiny),
            "bench": lambda: worker_bench(a),
            "probe": lambda: worker_probe(a),
        }[a.worker]()
        return
    deadline = time.time() + a.deadline_s
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    out = {
        "device": None,
        "date": now,
        "commit": a.commit or git_commit(),
        "rows": [],
        "model": "tiny 2-layer smoke model" if a.tiny else "Llama-3.1-8B architecture",
    }
    ensure_checkpoint(a.model_dir, a.tiny, deadline)
    if a.max_context:
        out.update(
            mode="max_context",
            caps_gib=a.caps,
            granularity=a.granularity,
            probes=[],
            calibration={},
        )
        for system in a.systems:
            probes: list[dict] = []
            try:
                res = run_max_context(a, system, deadline, probes)
            except Exception as e:  # never let one system take the other down
                print(f"[{system}] max-context failed: {e!r}", flush=True)
                res = {"rows": [{"system": system, "error": repr(e)[:500]}], "info": {}}
            out["probes"] += [dict(p, system=system) for p in probes]
            out["rows"] += res["rows"]
            if "calibration" not in res:
                continue
            out["calibration"][system] = res["calibration"]
            out["device"] = out["device"] or res["info"].get("device")
        print_max_context([r for r in out["rows"] if "cap_gib" in r])
    else:
        out.update(mode="train", shapes=a.shapes.split(","), steps=a.steps, warmup=a.warmup)
        out["rows"], out["device"] = run_bench(a, deadline)
        print_bench_table(out["rows"])
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}", flush=True)


if __name__ == "__main__":
    main()
