"""Train a small but real Mixture-of-Experts LM on CPU and save it as a Hugging Face checkpoint.

The models are the test subjects of the expert-reduction benchmark: real text (see
``bench/corpus.py``), real training with a load-balancing loss, so that the experts are
used and differ from one another, unlike random-weight models.

Kinds:

* ``scratch``: the MoE is trained from random init for the whole budget.
* ``upcycled``: sparse upcycling (as Qwen1.5-MoE was built): a dense model of the same
  shape with one expert (top-1, i.e. an ordinary SwiGLU FFN) is trained for
  ``--dense-frac`` of the budget, then its FFN is copied into every expert of the MoE
  (plus tiny noise, ``--upcycle-noise``), embeddings/attention/norms/lm_head are copied
  as is, the router starts small random, and the MoE is trained for the rest. The LR
  follows one cosine schedule over the whole budget with a short re-warm-up after the
  switch (fresh AdamW state).

Families: ``mixtral`` (MixtralForCausalLM) and ``qwen2_moe`` (Qwen2MoeForCausalLM, with a
shared expert and ``norm_topk_prob=False``).

The budget is wall clock (``--minutes``), with the LR schedule following the elapsed
fraction of it; pass ``--steps`` (and ``--dense-steps``) instead for a run that is exactly
reproducible (same seed; add ``--fixed-threads`` so the thread count, which can change the
float rounding, stays the same; see ThreadGovernor).

Output dir (like a Hub checkpoint, float32)::

    config.json generation_config.json model.safetensors tokenizer.json
    tokenizer_config.json special_tokens_map.json train_log.json

The saved config has ``output_router_logits=false`` (as released checkpoints do), so a
forward pass with labels returns the plain LM loss; the model was trained with it on.

Prerequisite: ``.venv/bin/python bench/corpus.py`` (writes ``bench-out/corpus``).

Examples::

    .venv/bin/python bench/train_moe.py --kind scratch  --family mixtral \
        --out bench-out/models/mixtral-scratch --minutes 4
    .venv/bin/python bench/train_moe.py --kind upcycled --family mixtral \
        --out bench-out/models/mixtral-upcycled --minutes 4
    .venv/bin/python bench/train_moe.py --kind scratch  --family qwen2_moe \
        --out bench-out/models/qwen2_moe-scratch --minutes 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------- data


def load_tokenizer(corpus: Path):
    from tokenizers import Tokenizer

    path = corpus / "tokenizer" / "tokenizer.json"
    if not path.exists():
        sys.exit(f"{path} missing: run  .venv/bin/python bench/corpus.py --out {corpus}")
    return Tokenizer.from_file(str(path))


def encode_file(tok, path: Path, block_lines: int = 2000) -> np.ndarray:
    """Token ids of a text file without special tokens (encoded in blocks of lines)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    blocks = ["".join(lines[i:i + block_lines]) for i in range(0, len(lines), block_lines)]
    encs = tok.encode_batch(blocks, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encs])


def windows(ids: np.ndarray, seq_len: int, bos: int) -> list[torch.Tensor]:
    """Non-overlapping eval windows ``[BOS] + seq_len-1 tokens`` covering every token once."""
    n = seq_len - 1
    out = []
    for i in range(0, len(ids), n):
        chunk = torch.from_numpy(ids[i:i + n].astype(np.int64))
        out.append(torch.cat([torch.tensor([bos]), chunk]))
    return out


def sample_batch(ids: torch.Tensor, batch: int, seq_len: int, bos: int, gen) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=gen)
    x = torch.stack([ids[s:s + seq_len - 1] for s in starts.tolist()])
    return torch.cat([torch.full((batch, 1), bos, dtype=torch.long), x], dim=1)


# ----------------------------------------------------------------------------- models


def make_config(args, vocab: int, bos: int, eos: int, num_experts: int, top_k: int,
                router_logits: bool):
    common = dict(
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq_len),
        num_experts_per_tok=top_k,
        output_router_logits=router_logits,
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        dtype="float32",
    )
    if args.family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=args.intermediate, num_local_experts=num_experts,
                             **common)
    if args.family == "deepseek_v3":
        from transformers import DeepseekV3Config

        # DeepSeek-V3's routing at a small width: sigmoid scores, the top-k renormalised, a
        # shared expert, every layer MoE, MLA attention; no auxiliary loss (balanced by the
        # correction bias, SigmoidBalancer)
        return DeepseekV3Config(
            intermediate_size=args.shared_intermediate, moe_intermediate_size=args.intermediate,
            n_routed_experts=num_experts, n_shared_experts=max(
                1, args.shared_intermediate // args.intermediate),
            first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=1.0, num_nextn_predict_layers=0, q_lora_rank=None,
            kv_lora_rank=64,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            **{**common, "output_router_logits": False, "num_key_value_heads": args.heads})
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        intermediate_size=args.intermediate,
        moe_intermediate_size=args.intermediate,
        shared_expert_intermediate_size=args.shared_intermediate,
        num_experts=num_experts,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **common,
    )


def make_model(config):
    from transformers import DeepseekV3ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM

    cls = {"mixtral": MixtralForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM}.get(
        config.model_type, Qwen2MoeForCausalLM)
    model = cls(config)
    model.to(torch.float32)
    for gate in sigmoid_gates(model):
        gate.register_forward_hook(record_picks)
    return model


def sigmoid_gates(model) -> list:
    """DeepSeek-V3-style routers (sigmoid scores and a correction bias), in layer order."""
    return [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]


def record_picks(gate, inputs, output) -> None:
    gate.picked = output[2]  # (logits, weights, indices): the experts each token picked


def picked_experts(model, out, top_k: int) -> list[torch.Tensor]:
    """Each MoE layer's picked experts in the last forward: the sigmoid routers record them,
    the softmax ones return their logits."""
    gates = sigmoid_gates(model)
    if gates:
        return [gate.picked.flatten() for gate in gates]
    return [torch.topk(rl.float(), top_k, dim=-1).indices.flatten() for rl in out.router_logits]


class SigmoidBalancer:
    """DeepSeek-V3's balancing without an auxiliary loss: after each step every router's
    correction bias moves by `rate` up for the experts its tokens picked less than average
    and down for the others (Wang et al. 2024; DeepSeek-V3 uses 0.001)."""

    def __init__(self, model, rate: float = 1e-3):
        self.gates, self.rate = sigmoid_gates(model), rate

    @torch.no_grad()
    def step(self) -> None:
        for gate in self.gates:
            load = torch.bincount(gate.picked.flatten(),
                                  minlength=gate.e_score_correction_bias.numel()).float()
            gate.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)


def upcycle(dense, moe, noise: float, gen) -> dict:
    """Copy a 1-expert model into an n-expert one (every expert = the dense FFN)."""
    dsd = dense.state_dict()
    msd = moe.state_dict()
    copied, router = [], []
    for k, v in msd.items():
        if k.endswith("mlp.gate.weight"):
            router.append(k)  # keep the MoE's small random router init
            continue
        src = dsd[k]
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            w = src.expand_as(v).clone()
            if noise > 0:
                w += noise * src.std() * torch.randn(w.shape, generator=gen)
            msd[k] = w
        else:
            assert src.shape == v.shape, (k, src.shape, v.shape)
            msd[k] = src.clone()
        copied.append(k)
    moe.load_state_dict(msd)
    return {"copied": len(copied), "router_random": len(router)}


# ----------------------------------------------------------------------------- training


class ThreadGovernor:
    """Uses 1 intra-op thread instead of 2 while another process competes for the cores.

    With 2 OpenMP threads on 2 cores, one busy neighbour process makes every parallel
    region wait for a preempted thread: steps get ~15x slower, while 1 thread keeps ~0.55x
    of the idle 2-thread speed. The governor times a few steps at both counts at the
    start, runs with the faster, switches to 1 thread when steps at the maximum get slower
    than 1-thread steps were, and probes the maximum again later (with back-off).
    """

    PROBE = 3  # steps per probe; the first one is not timed (thread start-up)

    def __init__(self, max_threads: int, enabled: bool = True):
        self.max = max_threads
        self.enabled = enabled and max_threads > 1
        self.ref: dict[int, float] = {}  # recent typical step time per thread count
        self.recent: list[float] = []
        self.queue = [max_threads, 1] if self.enabled else []  # counts still to probe
        self.backoff = 30.0
        self.next_probe = float("inf")
        self.switches: list[dict] = []
        self.cur = max_threads
        torch.set_num_threads(max_threads)

    def reset(self) -> None:
        """Re-time both thread counts (a new model has other step times)."""
        if self.enabled:
            self.ref, self.queue, self.backoff = {}, [self.max, 1], 30.0
            self.next_probe = float("inf")
            self.cur = self.max
            torch.set_num_threads(self.max)
            self.recent = []

    def _set(self, n: int, t_rel: float, why: str) -> None:
        if n != self.cur:
            self.switches.append({"t": round(t_rel, 1), "threads": n, "why": why})
        self.cur = n
        torch.set_num_threads(n)
        self.recent = []

    def observe(self, dt: float, now: float, t_rel: float) -> None:
        if not self.enabled:
            return
        self.recent.append(dt)
        timed = self.recent[1:]
        if self.queue:  # probing self.queue[0] == self.cur
            slow = 2.0 * self.ref.get(1, float("inf"))
            if self.cur == self.max and dt > slow and len(self.queue) == 2 and 1 in self.ref:
                # a re-probe of the maximum that is clearly losing: stop it after one step
                self.queue = []
                self.next_probe = now + self.backoff
                self.backoff = min(self.backoff * 2, 240.0)
                self._set(1, t_rel, f"probe {dt:.2f}s/step at {self.max} threads")
                return
            if len(self.recent) < self.PROBE:
                return
            self.ref[self.cur] = sorted(timed)[len(timed) // 2]
            self.queue.pop(0)
            if self.queue:
                self._set(self.queue[0], t_rel, "probe")
                return
            fast = min(self.ref, key=self.ref.get)
            if fast != self.max:
                self.next_probe = now + self.backoff
                self.backoff = min(self.backoff * 2, 240.0)
            else:
                self.backoff = 30.0
            self._set(fast, t_rel, "probe: " + ", ".join(
                f"{n} thr {t:.2f}s/step" for n, t in sorted(self.ref.items())))
            return
        if len(timed) >= 3:
            self.ref[self.cur] = sorted(timed[-3:])[1]
        if self.cur == self.max:
            if len(timed) >= 3 and min(timed[-3:]) > 1.3 * self.ref.get(1, float("inf")):
                self.next_probe = now + self.backoff
                self.backoff = min(self.backoff * 2, 240.0)
                self._set(1, t_rel, f"{min(timed[-3:]):.2f}s/step at {self.max} threads")
        elif now >= self.next_probe:
            self.queue = [self.max, 1]
            self._set(self.max, t_rel, "probe")


def lr_at(progress: float, step_in_phase: int, args) -> float:
    warm = min(1.0, (step_in_phase + 1) / args.warmup_steps)
    p = min(max(progress, 0.0), 1.0)
    cos = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return args.lr * warm * cos


def make_optimizer(model, args):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def train_phase(model, name, data, args, gen, *, budget_s, steps, p0, p1, t_start,
                governor, after_step=None) -> dict:
    """Train until the phase's time budget (or step count) is used.

    The LR schedule's progress runs from p0 to p1 over the phase; after_step(step), if given,
    runs after every step (the held-out curve, intermediate checkpoints).
    """
    opt = make_optimizer(model, args)
    balancer = SigmoidBalancer(model)
    governor.reset()
    model.train()
    bos = model.config.bos_token_id
    coef = model.config.router_aux_loss_coef
    use_aux = bool(model.config.output_router_logits)
    t0 = time.time()
    step, losses, auxes, last_print = 0, [], [], t0
    history = []
    while True:
        elapsed = time.time() - t0
        frac = (step / steps) if steps else (elapsed / budget_s)
        if frac >= 1.0:
            break
        lr = lr_at(p0 + (p1 - p0) * frac, step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        t_step = time.time()
        x = sample_batch(data, args.batch, args.seq_len, bos, gen)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balancer.step()
        aux = float(out.aux_loss.detach()) if use_aux and out.aux_loss is not None else 0.0
        ce = float(out.loss) - coef * aux if use_aux else float(out.loss)
        losses.append(ce)
        auxes.append(aux)
        step += 1
        now = time.time()
        governor.observe(now - t_step, now, now - t_start)
        if after_step is not None:
            after_step(step)
        if now - last_print >= args.log_every_s or step == 1:
            last_print = now
            avg = sum(losses[-20:]) / len(losses[-20:])
            rec = {"step": step, "t": round(now - t_start, 1), "lr": lr, "ce": round(avg, 4),
                   "aux": round(sum(auxes[-20:]) / len(auxes[-20:]), 4)}
            history.append(rec)
            print(f"[{name}] step {step:5d}  t={now - t_start:6.1f}s  lr={lr:.2e}  "
                  f"ce={avg:.4f} (ppl {math.exp(avg):8.2f})  aux={rec['aux']:.4f}  "
                  f"threads={governor.cur}", flush=True)
    wall = time.time() - t0
    tail = losses[-20:] or [float("nan")]
    return {
        "phase": name, "steps": step, "wall_s": round(wall, 1),
        "tokens": step * args.batch * (args.seq_len - 1),
        "final_train_ce": round(sum(tail) / len(tail), 4),
        "s_per_step": round(wall / max(step, 1), 3),
        "history": history,
    }


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, eval_ids: np.ndarray, n_bytes: int, args) -> dict:
    model.eval()
    bos = model.config.bos_token_id
    num_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    top_k = model.config.num_experts_per_tok
    counts = torch.zeros(model.config.num_hidden_layers, num_experts, dtype=torch.long)
    wins = windows(eval_ids, args.seq_len, bos)
    nll, ntok = 0.0, 0
    for i in range(0, len(wins), args.eval_batch):
        group = wins[i:i + args.eval_batch]
        full = [w for w in group if len(w) == args.seq_len]
        batches = ([torch.stack(full)] if full else []) + [
            w[None] for w in group if len(w) != args.seq_len]
        for x in batches:
            out = model(input_ids=x, output_router_logits=num_experts > 1
                        and not sigmoid_gates(model))
            logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
            tgt = x[:, 1:]
            nll -= float(logp.gather(-1, tgt[..., None]).sum())
            ntok += tgt.numel()
            if num_experts > 1:
                for layer, sel in enumerate(picked_experts(model, out, top_k)):
                    counts[layer] += torch.bincount(sel, minlength=num_experts)
    model.train()
    res = {"eval_tokens": ntok, "eval_bytes": n_bytes, "eval_nll": nll / ntok,
           "eval_ppl": math.exp(nll / ntok), "eval_bits_per_byte": nll / math.log(2) / n_bytes}
    if num_experts > 1:
        freq = counts.double() / counts.sum(dim=1, keepdim=True)
        res["expert_usage"] = [[round(float(f), 4) for f in row] for row in freq]
    return res


@torch.no_grad()
def usage_by_source(model, tok, calib: Path, args, max_records: int = 24) -> dict:
    """Per-source expert-selection frequencies on calib.jsonl records (first tokens only)."""
    num_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    if num_experts <= 1 or not calib.exists():
        return {}
    top_k = model.config.num_experts_per_tok
    by_src: dict[str, list[str]] = {}
    for line in calib.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        by_src.setdefault(rec.get("source", "?"), []).append(rec["text"])
    model.eval()
    res = {}
    for src in sorted(by_src):
        counts = torch.zeros(model.config.num_hidden_layers, num_experts, dtype=torch.long)
        for text in by_src[src][:max_records]:
            ids = tok.encode(text).ids[: args.seq_len]
            out = model(input_ids=torch.tensor([ids]),
                        output_router_logits=not sigmoid_gates(model))
            for layer, sel in enumerate(picked_experts(model, out, top_k)):
                counts[layer] += torch.bincount(sel, minlength=num_experts)
        freq = counts.double() / counts.sum(dim=1, keepdim=True)
        res[src] = [[round(float(f), 3) for f in row] for row in freq]
    model.train()
    return res


def unigram_baseline(train_ids: np.ndarray, eval_ids: np.ndarray, vocab: int, n_bytes: int):
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    nll = -float(logp[eval_ids].sum())
    return {"unigram_ppl": math.exp(nll / len(eval_ids)),
            "unigram_bits_per_byte": nll / math.log(2) / n_bytes}


def save_checkpoint(model, out: Path, corpus: Path, bos: int, eos: int) -> None:
    """The model like a Hub checkpoint (float32) with the corpus's tokenizer; router logits
    are a training-only output."""
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    training_logits, config.output_router_logits = config.output_router_logits, False
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out, safe_serialization=True)
    config.output_router_logits = training_logits
    for f in TOKENIZER_FILES:
        if (corpus / "tokenizer" / f).exists():
            shutil.copy(corpus / "tokenizer" / f, out / f)


def saved_tensor_names(out: Path, layer: int = 0) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if f".layers.{layer}." in k:
                    names.append(f"{k} {list(fh.get_slice(k).get_shape())}")
    return sorted(names)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train a small MoE LM on CPU (HF format).")
    ap.add_argument("--kind", choices=["scratch", "upcycled"], default="scratch")
    ap.add_argument("--family", choices=["mixtral", "qwen2_moe", "deepseek_v3"],
                    default="mixtral")
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default="bench-out/corpus")
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, default=0,
                    help="train exactly this many MoE steps instead of a time budget")
    ap.add_argument("--dense-steps", type=int, default=0,
                    help="with --steps and --kind upcycled: dense steps (default steps)")
    ap.add_argument("--dense-frac", type=float, default=0.5,
                    help="upcycled: fraction of the time budget for the dense phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="maximum intra-op threads")
    ap.add_argument("--fixed-threads", action="store_true",
                    help="always use --threads (no fallback to 1 thread under contention)")
    # shape
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512, help="per-expert FFN size")
    ap.add_argument("--shared-intermediate", type=int, default=1024,
                    help="qwen2_moe: shared expert FFN size")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    # optimisation
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--upcycle-noise", type=float, default=0.01,
                    help="upcycled: expert noise std, relative to the weight's std")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--log-every-s", type=float, default=15.0)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="held-out perplexity every N MoE steps (the training curve)")
    ap.add_argument("--curve-tokens", type=int, default=20_000,
                    help="held-out tokens the curve is measured on")
    ap.add_argument("--save-at", type=lambda v: {int(s) for s in v.split(",") if s},
                    default=set(), help="MoE steps at which to save a checkpoint (step-N/)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    governor = ThreadGovernor(args.threads, enabled=not args.fixed_threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    corpus = Path(args.corpus)
    out = Path(args.out)

    tok = load_tokenizer(corpus)
    vocab = tok.get_vocab_size()
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    train_ids = encode_file(tok, corpus / "train.txt")
    eval_text = (corpus / "eval.txt").read_text(encoding="utf-8")
    eval_ids = encode_file(tok, corpus / "eval.txt")
    n_bytes = len(eval_text.encode("utf-8"))
    data = torch.from_numpy(train_ids.astype(np.int64))
    base = unigram_baseline(train_ids, eval_ids, vocab, n_bytes)
    print(f"corpus: train {len(train_ids):,} tokens, eval {len(eval_ids):,} tokens "
          f"({n_bytes:,} bytes), vocab {vocab}; unigram baseline ppl {base['unigram_ppl']:.1f} "
          f"({base['unigram_bits_per_byte']:.3f} bits/byte)", flush=True)

    budget = args.minutes * 60.0
    cfg = make_config(args, vocab, bos, eos, args.experts, args.top_k, router_logits=True)
    phases = []
    if args.kind == "upcycled":
        dcfg = make_config(args, vocab, bos, eos, 1, 1, router_logits=False)
        dense = make_model(dcfg)
        print(f"dense: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M params", flush=True)
        dsteps = (args.dense_steps or args.steps) if args.steps else 0
        frac = args.dense_frac if not args.steps else dsteps / (dsteps + args.steps)
        phases.append(train_phase(dense, "dense", data, args, gen, budget_s=budget * frac,
                                  steps=dsteps, p0=0.0, p1=frac, t_start=t_start,
                                  governor=governor))
        dense_eval = evaluate(dense, eval_ids, n_bytes, args)
        print(f"dense eval ppl {dense_eval['eval_ppl']:.2f}", flush=True)
        phases[-1]["eval"] = dense_eval
        model = make_model(cfg)
        info = upcycle(dense, model, args.upcycle_noise, gen)
        del dense
        up_eval = evaluate(model, eval_ids, n_bytes, args)
        print(f"upcycled (before MoE training): eval ppl {up_eval['eval_ppl']:.2f}, {info}",
              flush=True)
        p0, moe_budget = frac, budget * (1 - frac)
    else:
        model = make_model(cfg)
        p0, moe_budget = 0.0, budget
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.family} {args.kind}: {n_params / 1e6:.2f}M params, {args.experts} experts "
          f"top-{args.top_k}", flush=True)
    curve: list[dict] = []
    curve_ids = eval_ids[:args.curve_tokens]

    def after_step(step: int) -> None:
        """The held-out curve every --eval-every steps, a checkpoint at each --save-at."""
        if args.eval_every and step % args.eval_every == 0:
            point = evaluate(model, curve_ids, n_bytes, args)
            curve.append({"step": step, "eval_ppl": round(point["eval_ppl"], 3)})
            print(f"[curve] step {step}: held-out ppl {point['eval_ppl']:.2f}", flush=True)
        if step in args.save_at:
            save_checkpoint(model, out / f"step-{step}", corpus, bos, eos)

    phases.append(train_phase(model, "moe", data, args, gen, budget_s=moe_budget,
                              steps=args.steps, p0=p0, p1=1.0, t_start=t_start,
                              governor=governor, after_step=after_step))
    train_wall = time.time() - t_start

    res = evaluate(model, eval_ids, n_bytes, args)
    by_domain = {}
    for path in sorted(corpus.glob("eval-*.txt")):
        text = path.read_text(encoding="utf-8")
        ids = encode_file(tok, path)
        by_domain[path.stem.removeprefix("eval-")] = round(
            evaluate(model, ids, len(text.encode("utf-8")), args)["eval_ppl"], 3)
    src_usage = usage_by_source(model, tok, corpus / "calib.jsonl", args)
    save_checkpoint(model, out, corpus, bos, eos)
    names = saved_tensor_names(out)

    log = {
        "settings": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "max_threads": args.threads,
        "thread_switches": governor.switches,
        "params": n_params,
        "train_tokens_available": int(len(train_ids)),
        "phases": phases,
        "steps": sum(p["steps"] for p in phases),
        "final_train_ce": phases[-1]["final_train_ce"],
        **res,
        **base,
        "eval_ppl_by_domain": by_domain,
        "curve": curve,
        "expert_usage_by_source": src_usage,
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "saved_layer0_tensors": names,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")

    print(f"\n== {out}: eval ppl {res['eval_ppl']:.2f} ({res['eval_bits_per_byte']:.3f} bits/byte)"
          f" vs unigram {base['unigram_ppl']:.1f}; train CE {log['final_train_ce']:.3f}; "
          f"steps {log['steps']}; train {train_wall:.0f}s, total {log['total_wall_s']:.0f}s")
    if "expert_usage" in res:
        print("expert usage on eval.txt (fraction of top-k slots per expert):")
        for i, row in enumerate(res["expert_usage"]):
            print(f"  layer {i}: " + " ".join(f"{f:.3f}" for f in row))
    for src, rows in src_usage.items():
        print(f"  {src:5s} " + " | ".join(" ".join(f"{f:.2f}" for f in row) for row in rows))
    print("saved tensors of layer 0:")
    for n in names:
        print("  " + n)
    return log


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
