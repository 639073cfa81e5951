"""PyTorch reference: nanoGPT's CPU "baby GPT" on Tiny Shakespeare (character level).

A self-contained port of karpathy/nanoGPT (model.py + the train.py loop +
data/shakespeare_char/prepare.py), used as the baseline for llmx's JAX run.
It mirrors, on CPU and in float32:

  python train.py config/train_shakespeare_char.py --device=cpu --compile=False \
      --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 \
      --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 \
      --lr_decay_iters=2000 --dropout=0.0

i.e. bias=False (train.py's default), tied wte/lm_head, GPT-2 init, exact GELU,
AdamW(1e-3, betas=(0.9, 0.99), wd 0.1 on dim>=2 params), clip 1.0, warmup 100 +
cosine to 1e-4 at 2000, eval every 250 iters. The module tree, construction
order and RNG use match nanoGPT, so the init and the training batches follow
the same global torch RNG stream. Differences, none of which change a reported
number: the eval_iters=200 estimate draws from a private generator (so the
training stream stays that of the eval_iters=20 command), nanoGPT's extra step
after the final eval is skipped, and no checkpoints are written. (On a CPU-only
machine nanoGPT's GradScaler disables itself, so it is omitted.)

  python benchmarks/nanogpt_torch.py --data=PATH --mode=train [--seed=1337]
  python benchmarks/nanogpt_torch.py --data=PATH --mode=time --steps=50

On a shared, oversubscribed machine set OMP_WAIT_POLICY=PASSIVE: the default
spin-waiting OpenMP threads can make each step an order of magnitude slower
(thread count and results are unchanged).
"""
import argparse, contextlib, math, platform, statistics, time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's; weight only when bias=False)."""
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):  # construction order = nanoGPT's (it fixes the RNG stream)
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, bias=cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if pn.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = [p for p in self.parameters() if p.requires_grad]  # tied weight appears once
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)  # eps=1e-8; not fused on CPU


def load_data(path):
    """nanoGPT's shakespeare_char/prepare.py: sorted char vocab, first 90% train, last 10% val."""
    with open(path, 'r', encoding='utf-8') as f:
        text = f.read()
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    n = len(text)
    enc = lambda s: np.array([stoi[c] for c in s], dtype=np.uint16)
    return {'train': enc(text[:int(n * 0.9)]), 'val': enc(text[int(n * 0.9):])}, len(stoi)


def get_batch(data, block_size, batch_size, generator=None):
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y


def get_lr(it, lr=1e-3, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4):
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / (lr_decay_iters - warmup_iters)))
    return min_lr + coeff * (lr - min_lr)


@torch.no_grad()
def estimate_loss(model, data, args, eval_iters, generator=None):
    out = {}
    model.eval()
    for split in ['train', 'val']:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            losses[k] = model(*get_batch(data[split], args.block_size, args.batch_size, generator))[1].item()
        out[split] = losses.mean()
    model.train()
    return out


def setup(args):
    torch.manual_seed(args.seed)  # before data/model, as in nanoGPT: init consumes the global RNG
    data, vocab_size = load_data(args.data)
    model = GPT(GPTConfig(block_size=args.block_size, vocab_size=vocab_size,
                          **getattr(args, 'model_dims', {})))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    return data, model, optimizer


def autocast(args):
    """nanoGPT's `ctx`: nullcontext on a CPU (float32); --autocast=bfloat16 runs the forward
    under torch.autocast as nanoGPT does on a GPU (matmuls on bf16 inputs)."""
    if args.autocast == 'bfloat16':
        return torch.autocast(device_type='cpu', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, data, args, X, Y, it):
    """One nanoGPT iteration: set lr, fwd, prefetch next batch, bwd, clip, step."""
    for group in optimizer.param_groups:
        group['lr'] = get_lr(it, lr_decay_iters=args.max_iters)
    with autocast(args):
        _, loss = model(X, Y)
    X, Y = get_batch(data['train'], args.block_size, args.batch_size)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), X, Y  # log_interval=1: nanoGPT reads the loss every iteration


def train(args):
    data, model, optimizer = setup(args)
    eval_gen = torch.Generator().manual_seed(args.seed + 1)  # private stream for eval_iters=200
    X, Y = get_batch(data['train'], args.block_size, args.batch_size)
    step_times, t_start = [], time.perf_counter()
    for it in range(args.max_iters + 1):
        if it % args.eval_interval == 0:
            l20 = estimate_loss(model, data, args, 20)  # global RNG, exactly as nanoGPT
            l200 = estimate_loss(model, data, args, 200, eval_gen)
            print(f"step {it}: eval_iters=20: train loss {l20['train']:.4f}, val loss {l20['val']:.4f} | "
                  f"eval_iters=200: train loss {l200['train']:.4f}, val loss {l200['val']:.4f}", flush=True)
        if it == args.max_iters:
            break  # nanoGPT takes one more (unreported) step here
        t0 = time.perf_counter()
        lossf, X, Y = train_step(model, optimizer, data, args, X, Y, it)
        step_times.append(time.perf_counter() - t0)
        if args.log_interval and it % args.log_interval == 0:
            print(f"iter {it}: loss {lossf:.4f}, time {step_times[-1] * 1000:.2f}ms", flush=True)
    wall = time.perf_counter() - t_start
    print(f"final (seed {args.seed}): val loss {l20['val']:.4f} (eval_iters=20), "
          f"{l200['val']:.4f} (eval_iters=200)")
    print(f"wall time {wall:.1f}s (train steps {sum(step_times):.1f}s, evals {wall - sum(step_times):.1f}s); "
          f"ms/iter mean {1000 * statistics.mean(step_times):.2f}, median {1000 * statistics.median(step_times):.2f}")


def time_steps(args):
    data, model, optimizer = setup(args)
    X, Y = get_batch(data['train'], args.block_size, args.batch_size)
    it = 0
    for _ in range(args.warmup):
        _, X, Y = train_step(model, optimizer, data, args, X, Y, it); it += 1
    rounds = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            _, X, Y = train_step(model, optimizer, data, args, X, Y, it); it += 1
        rounds.append(1000 * (time.perf_counter() - t0) / args.steps)
        print(f"round {r}: {rounds[-1]:.2f} ms/step over {args.steps} steps", flush=True)
    print(f"median {statistics.median(rounds):.2f} ms/step (min {min(rounds):.2f}, max {max(rounds):.2f}; "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps)")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True, help='Tiny Shakespeare input.txt')
    p.add_argument('--mode', choices=['train', 'time'], default='train')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--max_iters', type=int, default=2000)  # also lr_decay_iters
    p.add_argument('--eval_interval', type=int, default=250)
    p.add_argument('--log_interval', type=int, default=0, help='print train loss every N iters (0: off)')
    p.add_argument('--steps', type=int, default=50, help='time mode: steps per round')
    p.add_argument('--rounds', type=int, default=5, help='time mode: timed rounds')
    p.add_argument('--warmup', type=int, default=10, help='time mode: untimed warm-up steps')
    p.add_argument('--autocast', choices=['off', 'bfloat16'], default='off',
                   help="off: float32, as nanoGPT runs on a CPU; bfloat16: its GPU autocast")
    p.add_argument('--size', choices=['baby', 'default'], default='baby',
                   help="time mode: 'default' is nanoGPT's train_shakespeare_char.py model "
                        "(6 layers, 6 heads, d 384, block 256, batch 64, dropout 0.2)")
    args = p.parse_args()
    args.block_size, args.batch_size = 64, 12  # fixed, like the model dims in GPTConfig
    if args.size == 'default':
        if args.mode != 'time':
            p.error('--size=default is for --mode=time')
        args.block_size, args.batch_size = 256, 64
        args.model_dims = dict(n_layer=6, n_head=6, n_embd=384, dropout=0.2)
    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"threads {torch.get_num_threads()}, mode {args.mode}, seed {args.seed}, autocast {args.autocast}", flush=True)
    train(args) if args.mode == 'train' else time_steps(args)
