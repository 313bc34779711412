"""A GPT-2-style language model (124M parameters at its GPT-2-small size) and its ddp_train Task,
for benchmarks/gpu_bench.py: random tokens, bf16, the same model and data as the hand-written loop."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ddp_train import Task
from ddp_train.data import TensorData

SIZES = {  # n_layer, n_head, n_embd, vocab, block
    "gpt2-small": (12, 12, 768, 50304, 1024),
    "tiny": (2, 2, 64, 256, 64),
}


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.fc, self.fc_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, size: str = "gpt2-small"):
        super().__init__()
        n_layer, n_head, n_embd, vocab, block = SIZES[size]
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def flops_per_token(size: str) -> float:
    """Training FLOPs per token (forward + backward), as nanoGPT's estimate_mfu / PaLM appendix B:
    6 x parameters (without position embeddings) + 12 x layers x width x context."""
    n_layer, _, n_embd, vocab, block = SIZES[size]
    params = vocab * n_embd + n_layer * 12 * n_embd * n_embd
    return 6 * params + 12 * n_layer * n_embd * block


def random_tokens(size: str, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, _, vocab, block = SIZES[size]
    tokens = torch.randint(vocab, (samples, block + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


class GPTTask(Task):
    """`ddp-train fit --task benchmarks/gpt_task.py:GPTTask --task-arg size=gpt2-small`."""

    def __init__(self, size: str = "gpt2-small", samples: int = 512):
        self.size, self.samples = size, samples

    def data(self, cfg):
        x, y = random_tokens(self.size, self.samples)
        return {"train": TensorData(x, y), "val": TensorData(x[:16], y[:16])}

    def model(self, cfg):
        return GPT(self.size)

    def loss(self, model, batch):
        x, y = batch
        return lm_loss(model(x), y)
