"""A small, honest trainer for sMLP language models on CPU.

AdamW, linear warm-up + cosine decay, gradient clipping, a progress bar with loss and tokens/s,
periodic held-out evaluation, resumable (``OUT/trainer_state.pt``, read with weights_only=True),
deterministic for a given ``seed`` and thread count.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import data
from .checkpoint import save_checkpoint
from .config import SMLPConfig
from .errors import InputError
from .model import SMLPForCausalLM

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainArgs:
    steps: int = 2000
    batch_size: int = 16
    seq_len: int | None = None  # default: config.max_seq_len
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # Switch load-balancing loss ("topk" routing)
    router_loss_coef: float = 0.1  # router-consistency loss ("base" routing), see model.TokenMoE
    eval_every: int = 250
    eval_windows: int = 64
    final_eval_windows: int = 256  # the figure recorded in the checkpoint metadata
    save_every: int = 500
    seed: int = 0
    corpus: str | None = None


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def lm_loss(model: SMLPForCausalLM, batch: torch.Tensor, routing: dict | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats). Partial-prediction models: positions >= p only."""
    inp, tgt = batch[:, :-1], batch[:, 1:]
    logits = model(inp, routing)
    p = model.config.prefix_len
    if p:
        logits, tgt = logits[:, p:], tgt[:, p:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))


@torch.no_grad()
def evaluate(model: SMLPForCausalLM, n_windows: int = 64, source: str | None = None,
             batch_size: int = 16) -> dict[str, Any]:
    """Held-out loss, perplexity, bits per byte and tMoE expert load (inference routing)."""
    was_training = model.training
    model.eval()
    cfg = model.config
    windows = data.heldout_windows(n_windows, cfg.max_seq_len + 1, source, vocab_size=cfg.vocab_size)
    total, count = 0.0, 0
    load: dict[str, torch.Tensor] = {}
    for i in range(0, n_windows, batch_size):
        b = windows[i:i + batch_size]
        routing: dict = {}
        loss = lm_loss(model, b, routing)
        n = b.shape[0] * (cfg.max_seq_len - cfg.prefix_len)
        total += float(loss) * n
        count += n
        for name, r in routing.items():
            if name.endswith(".tmoe"):
                _, ids = torch.topk(r, cfg.top_k, dim=-1)
                hist = torch.bincount(ids.reshape(-1), minlength=cfg.n_token_experts)
            else:
                hist = torch.bincount(r.argmax(-1).reshape(-1), minlength=cfg.n_spatial_experts)
            load[name] = load.get(name, 0) + hist
    model.train(was_training)
    nats = total / count
    return {
        "loss": nats,
        "ppl": math.exp(nats),
        "bits_per_byte": nats / math.log(2),
        "tokens": count,
        "expert_load": {k: [round(float(x) / float(v.sum()), 4) for x in v] for k, v in load.items()},
    }


def train(cfg: SMLPConfig | None, out: str | os.PathLike, args: TrainArgs, *, resume: bool = False,
          init_from: str | os.PathLike | None = None, progress: bool = True, log=print) -> dict[str, Any]:
    """Train ``cfg`` from scratch, or fine-tune the checkpoint ``init_from`` (its config is used),
    or resume from ``out``; save the checkpoint to ``out``."""
    from tqdm import tqdm

    out = Path(out)
    if resume and not (out / STATE_FILE).is_file():  # never a silent fresh start under --resume
        raise InputError(f"--resume: {out} has no {STATE_FILE} to continue from "
                         "(a run saves it every save_every steps; drop --resume to train from scratch)")
    torch.manual_seed(args.seed)
    corpus = data.load_corpus(args.corpus)
    init_meta = None
    if init_from is not None:
        from .model import load_checkpoint

        base = load_checkpoint(init_from)
        cfg = base.config
        init_meta = {"path": str(init_from), "weights_sha256": base.checkpoint_info["weights_sha256"],
                     "metadata": {k: v for k, v in base.checkpoint_info["metadata"].items() if k != "history"}}
    assert cfg is not None
    seq = args.seq_len or cfg.max_seq_len
    model = SMLPForCausalLM(cfg)
    if init_from is not None:
        model.load_state_dict(base.state_dict())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    start_step, history, elapsed_before = 0, [], 0.0
    state_path = out / STATE_FILE
    if resume:
        start_step, history, elapsed_before = _restore(state_path, model, opt, gen)
        log(f"resumed from {state_path} at step {start_step}")
    model.train()
    t0 = time.time()
    tokens_seen = 0
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    last_eval: dict[str, Any] = {}
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        batch = data.random_batch(corpus.train, args.batch_size, seq, gen, vocab_size=cfg.vocab_size)
        loss = lm_loss(model, batch)
        aux = model.aux_losses()
        total = loss
        if "load_balance" in aux:
            total = total + args.aux_loss_coef * aux["load_balance"]
        if "router_consistency" in aux:
            total = total + args.router_loss_coef * aux["router_consistency"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens_seen += batch.numel() - batch.shape[0]
        rate = tokens_seen / max(1e-9, time.time() - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr_at(step, args):.2e}")
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            last_eval = evaluate(model, args.eval_windows, args.corpus)
            history.append({"step": done, "train_loss": round(loss.item(), 4),
                            "heldout_loss": round(last_eval["loss"], 4),
                            "heldout_bpb": round(last_eval["bits_per_byte"], 4), "grad_norm": round(float(gnorm), 3)})
            loads = [x for v in last_eval["expert_load"].values() for x in v]
            bar.write(f"step {done}: train {loss.item():.3f}  held-out loss {last_eval['loss']:.3f} "
                      f"bpb {last_eval['bits_per_byte']:.3f}  expert load min {min(loads, default=0):.3f} "
                      f"max {max(loads, default=0):.3f}", file=sys.stderr)
        if done % args.save_every == 0 or done == args.steps:
            out.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "rng": torch.get_rng_state(), "step": done, "history": history,
                        "elapsed": elapsed_before + time.time() - t0}, tmp)
            os.replace(tmp, state_path)
    wall = elapsed_before + time.time() - t0
    final = evaluate(model, args.final_eval_windows, args.corpus)
    unigram = data.unigram_bits_per_byte(corpus)
    meta = {
        "kind": "trained",
        "command": " ".join(["smlp"] + sys.argv[1:]) if sys.argv and "smlp" in sys.argv[0] else None,
        "train_args": asdict(args),
        "corpus": corpus.describe(),
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * seq,
        "wall_time_s": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_version": torch.__version__,
        "heldout": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in final.items()},
        "unigram_bits_per_byte": round(unigram, 4),
        "history": history,
    }
    if init_meta is not None:
        meta["init_from"] = init_meta
        meta["total_steps_including_init"] = args.steps + int(init_meta["metadata"].get("steps", 0))
        meta["total_wall_time_s_including_init"] = round(wall + float(init_meta["metadata"].get("wall_time_s", 0)), 1)
    model.eval()
    _save_into(model, out, meta)
    return meta


def _restore(path: Path, model: SMLPForCausalLM, opt: torch.optim.Optimizer,
             gen: torch.Generator) -> tuple[int, list, float]:
    """Apply ``trainer_state.pt`` to model/optimizer/generators; (step, history, elapsed).

    Every way the file can be wrong (not a weights-only file, missing entries, saved for another
    config) is one ``CheckpointError``, raised before training starts.
    """
    from .errors import CheckpointError
    from .safe_load import load_weights_only

    st = load_weights_only(path)
    keys = ("model", "optimizer", "generator", "rng", "step", "history", "elapsed")
    if not isinstance(st, dict) or any(k not in st for k in keys):
        missing = [k for k in keys if not isinstance(st, dict) or k not in st]
        raise CheckpointError(f"{path}: not a trainer state (missing {', '.join(missing)})")
    if not isinstance(st["step"], int) or isinstance(st["step"], bool) or st["step"] < 0:
        raise CheckpointError(f"{path}: step must be a non-negative integer, got {st['step']!r}")
    try:
        model.load_state_dict(st["model"])
    except Exception as e:  # noqa: BLE001 - torch's message lists every key over many lines
        first = " ".join(str(e).split("\n", 2)[1:2]).strip() or type(e).__name__
        raise CheckpointError(f"{path}: saved for a different model config than this run's "
                              f"(--preset/--set must match the original run): {first}") from None
    try:
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["rng"])
        return st["step"], list(st["history"]), float(st["elapsed"])
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt trainer state ({first})") from None


def _save_into(model: SMLPForCausalLM, out: Path, meta: dict[str, Any]) -> None:
    """Save the checkpoint files into ``out`` atomically, keeping ``trainer_state.pt`` for resuming."""
    state = out / STATE_FILE
    keep = None
    if state.exists():
        keep = out.parent / f".{out.name}.{STATE_FILE}"
        os.replace(state, keep)
    save_checkpoint(model, out, metadata=meta, overwrite=True)
    if keep is not None:
        os.replace(keep, out / STATE_FILE)
