"""GPT-2 forward pass over a preallocated key/value store.

The weights are the checkpoint's own tensors, used in place: GPT-2's `Conv1D`
layers store `[in, out]` matrices, so projections are `addmm(bias, x, W)` and no
weight is transposed or copied. The key/value store is allocated once for a fixed
number of slots; a forward pass over tokens at slots `start..start+T-1` writes
their keys and values there and attends to slots `0..start+T-1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class Block:
    ln_1: tuple[Tensor, Tensor]
    c_attn: tuple[Tensor, Tensor]  # fused query/key/value projection, [E, 3E]
    c_proj: tuple[Tensor, Tensor]
    ln_2: tuple[Tensor, Tensor]
    c_fc: tuple[Tensor, Tensor]
    mlp_proj: tuple[Tensor, Tensor]


class KVStore:
    """Keys and values for `slots` positions of every layer, written in place."""

    def __init__(self, config: GPT2Config, slots: int, *, batch: int = 1, dtype, device):
        shape = (config.n_layer, batch, config.n_head, slots, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def slots(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class GPT2:
    """The GPT-2 network as functions over its weight tensors."""

    def __init__(self, config: GPT2Config, weights: dict[str, Tensor]):
        self.config = config
        w = {name.removeprefix("transformer."): t for name, t in weights.items()}

        def pair(prefix: str) -> tuple[Tensor, Tensor]:
            return w[f"{prefix}.weight"], w[f"{prefix}.bias"]

        # The head stored [E, V]: a batch-1 step reads it ~1.5x faster than [V, E].
        # Token embeddings are its columns, so there is one copy of the matrix.
        self.head = w["wte.weight"].t().contiguous()
        self.wpe = w["wpe.weight"]
        self.ln_f = pair("ln_f")
        self.blocks = [
            Block(
                ln_1=pair(f"h.{i}.ln_1"),
                c_attn=pair(f"h.{i}.attn.c_attn"),
                c_proj=pair(f"h.{i}.attn.c_proj"),
                ln_2=pair(f"h.{i}.ln_2"),
                c_fc=pair(f"h.{i}.mlp.c_fc"),
                mlp_proj=pair(f"h.{i}.mlp.c_proj"),
            )
            for i in range(config.n_layer)
        ]
        self.activation = ACTIVATIONS[config.activation_function]
        self.scale = 1.0 / math.sqrt(config.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.dtype

    @property
    def device(self) -> torch.device:
        return self.head.device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        out = [self.head, self.wpe, *self.ln_f]
        for b in self.blocks:
            out += [*b.ln_1, *b.c_attn, *b.c_proj, *b.ln_2, *b.c_fc, *b.mlp_proj]
        return out

    def new_store(self, slots: int, batch: int = 1) -> KVStore:
        return KVStore(self.config, slots, batch=batch, dtype=self.dtype, device=self.device)

    def forward(
        self,
        ids: Tensor,
        start: int,
        store: KVStore,
        *,
        attn_mask: Tensor | None = None,
        attention_out: list[Tensor] | None = None,
    ) -> Tensor:
        """Hidden states `[B, T, E]` (after the final layer norm) for `ids` `[B, T]`
        placed at slots and positions `start..start+T-1`.

        `attn_mask`, when given, is a boolean `[B or 1, 1, T, start+T]` mask of the
        slots each query may attend to; otherwise the pass is causal. When
        `attention_out` is a list, the last query's attention weights over the
        slots, `[B, H, start+T]`, are appended to it per layer.
        """
        cfg = self.config
        B, T = ids.shape
        end = start + T
        if end > store.slots:
            raise ValueError(f"slots {start}..{end - 1} do not fit a store of {store.slots}")
        H, D, E = cfg.n_head, cfg.head_dim, cfg.n_embd
        x = self.head[:, ids.flatten()].t().view(B, T, E) + self.wpe[start:end]
        if attn_mask is None and T > 1 and start > 0:
            attn_mask = causal_mask(T, start, self.device)
        causal = attn_mask is None and T > 1
        eps = cfg.layer_norm_epsilon
        for layer, b in enumerate(self.blocks):
            h = F.layer_norm(x, (E,), *b.ln_1, eps)
            qkv = torch.addmm(b.c_attn[1], h.view(B * T, E), b.c_attn[0])
            q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
            keys = store.keys[layer]
            values = store.values[layer]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            k_all, v_all = keys[:, :, :end], values[:, :, :end]
            if attention_out is not None:
                attention_out.append(last_query_attention(q, k_all, attn_mask, self.scale))
            a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask, is_causal=causal)
            a = a.transpose(1, 2).reshape(B * T, E)
            x = x + torch.addmm(b.c_proj[1], a, b.c_proj[0]).view(B, T, E)
            h = F.layer_norm(x, (E,), *b.ln_2, eps)
            h = self.activation(torch.addmm(b.c_fc[1], h.view(B * T, E), b.c_fc[0]))
            x = x + torch.addmm(b.mlp_proj[1], h, b.mlp_proj[0]).view(B, T, E)
        return F.layer_norm(x, (E,), *self.ln_f, eps)

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits from hidden states (the head is tied to `wte`)."""
        return hidden @ self.head


def causal_mask(T: int, start: int, device) -> Tensor:
    """`[1, 1, T, start+T]`: query i (at slot start+i) sees slots 0..start+i."""
    slots = torch.arange(start + T, device=device)
    queries = torch.arange(start, start + T, device=device)
    return (slots[None, :] <= queries[:, None])[None, None]


def last_query_attention(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """Softmax attention weights of the last query over all slots, `[B, H, S]`."""
    scores = (q[:, :, -1:] @ k.transpose(-1, -2)).float() * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask[:, :, -1:], float("-inf"))
    return scores.softmax(-1)[:, :, 0]
