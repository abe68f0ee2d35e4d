"""Prompt-to-Prompt pair sampling with shared self-attention (paper section 3.1.2, orig generate_img_dataset.py).

Both captions of a pair are denoised together, from the same initial noise and with the same ancestral noise at
every step. For the first fraction ``p`` of the steps the edited branch's self-attention layers (``attn1``) use the
input branch's attention map: the edited row attends with ``softmax(Q_in K_in^T / sqrt(d))`` applied to its *own*
values ``V_out``. The orig stores the same thing differently: it copies the input rows' pre-softmax logits
``Q_in K_in^T`` over the edited rows, and the softmax of equal logits is the equal map. Cross-attention is untouched,
so the edited caption still steers the content, while the shared maps keep the layout (unlike the Prompt-to-Prompt
paper, which shares cross-attention maps; the orig found self-attention sharing works better for SD).

Batch layout of one UNet forward, for N samples of one caption pair (4N rows)::

    [uncond: (in_0, out_0, in_1, out_1, ...), cond: (in_0, out_0, in_1, out_1, ...)]

so that "the edited row of sample k" is always the row right after its input row, within each CFG half; the orig
shares within each half too (its sims[1] <- sims[0], sims[3] <- sims[2]).

Sharing the map is implemented by giving the edited rows the input rows' queries and keys before the usual
``scaled_dot_product_attention``: the same kernel computes exactly the input rows' map, without materialising
(B, heads, L, L) attention matrices (4096 x 4096 per head at 512 px).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ip2p.sampling import sample

logger = logging.getLogger(__name__)

__all__ = ["P2PState", "SharedSelfAttnProcessor", "p2p_sample", "self_attention_sharing", "share_schedule"]


@dataclass
class P2PState:
    """What the processors read at each UNet call: which samples share their input branch's self-attention now.

    ``share``: (N,) bool over the N samples of the batch, on the UNet's device (or None); ``active``: whether any
    sample shares now, as a Python bool, so the processors never read a device tensor back (a sync per layer).
    """

    share: torch.Tensor | None = None
    active: bool = False


def share_schedule(p: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
    """Whether step ``step`` (0-based) of ``num_steps`` is in the first fraction ``p`` (N,) of steps; (N,) bool.

    Step i shares iff ``i < p * num_steps``: p = 0 shares nothing, p = 1 shares every step, p = 0.5 of 100 steps shares
    steps 0..49. (The orig tests ``p > i / (num_steps - 1)``, which never shares the last step, even at p = 1.)
    """
    return step < p * num_steps


def _share_rows(x: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Copy each input row over its edited row where ``share``; x: (4N, ...) in the module's batch layout."""
    n = share.shape[0]
    if x.shape[0] != 4 * n:
        raise ValueError(f"self-attention sharing expects 4 x {n} rows (CFG halves x samples x branches); "
                         f"got a batch of {x.shape[0]}")
    pairs = x.view(2, n, 2, *x.shape[1:])  # (half, sample, branch, ...)
    mask = share.view(1, n, *([1] * (x.ndim - 1)))
    edited = torch.where(mask, pairs[:, :, 0], pairs[:, :, 1])
    return torch.stack([pairs[:, :, 0], edited], dim=2).view_as(x)


class SharedSelfAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for self-attention, with the edited rows optionally using the input rows' map.

    Installed on ``attn1`` (self-attention) modules only, by :func:`self_attention_sharing`; reads ``state.share``.
    """

    def __init__(self, state: P2PState) -> None:
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("SharedSelfAttnProcessor was called with encoder_hidden_states: it belongs on "
                             "self-attention (attn1) layers only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        share = self.state.share
        if self.state.active and share is not None:
            # Same Q and K give the same softmax(QK^T) map; V stays the edited row's own.
            query = _share_rows(query, share)
            key = _share_rows(key, share)
            if attention_mask is not None:
                attention_mask = _share_rows(attention_mask, share)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _self_attention_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention]


@contextlib.contextmanager
def self_attention_sharing(unet: torch.nn.Module) -> Iterator[P2PState]:
    """Install :class:`SharedSelfAttnProcessor` on every ``attn1`` of ``unet``; yields the state that steers them.

    The previous processors are restored on exit, so the UNet can be used for ordinary sampling afterwards.
    """
    modules = _self_attention_modules(unet)
    if not modules:
        raise ValueError(f"{type(unet).__name__} has no self-attention (attn1) layers to share; expected a Stable "
                         "Diffusion UNet2DConditionModel")
    state = P2PState()
    previous = [(module, module.processor) for _, module in modules]
    processor = SharedSelfAttnProcessor(state)
    try:
        for _, module in modules:
            module.set_processor(processor)
        yield state
    finally:
        for module, old in previous:
            module.set_processor(old)


@torch.no_grad()
def p2p_sample(unet: torch.nn.Module, scheduler, text_in: torch.Tensor, text_out: torch.Tensor,
               null_text: torch.Tensor, noise: torch.Tensor, p: torch.Tensor, cfg_scale: torch.Tensor, *,
               steps: int, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise N (input caption, edited caption) sample pairs in one batch; returns final latents (in, out).

    text_in/text_out: (N, L, D) caption embeddings (one caption repeated, or N different ones); null_text: (1, L, D)
    embedding of ""; noise: (N, C, h, w) unscaled initial noise, used by both branches; p, cfg_scale: (N,) floats;
    generators: 2N generators, (in_0, out_0, in_1, out_1, ...), whose twins must be in equal states so both branches
    draw the same ancestral noise (the orig draws one noise per step for the whole batch). Returns two (N, C, h, w).
    """
    n = noise.shape[0]
    for name, value in (("text_in", text_in), ("text_out", text_out), ("p", p), ("cfg_scale", cfg_scale)):
        if value.shape[0] != n:
            raise ValueError(f"{name} has {value.shape[0]} rows for {n} noise samples; pass one per sample")
    if len(generators) != 2 * n:
        raise ValueError(f"got {len(generators)} generators for {n} samples; pass 2 per sample (input, edited)")
    dtype, device = noise.dtype, noise.device
    cond = torch.stack([text_in, text_out], dim=1).flatten(0, 1).to(device=device, dtype=dtype)  # (2N, L, D)
    context = torch.cat([null_text.to(device=device, dtype=dtype).expand_as(cond), cond])  # (4N, L, D)
    scale = cfg_scale.to(device=device, dtype=dtype).repeat_interleave(2).view(-1, 1, 1, 1)  # (2N, 1, 1, 1)
    p = p.to(device="cpu", dtype=torch.float64)
    latents = noise.repeat_interleave(2, dim=0)  # (2N, C, h, w): identical start for both branches
    step = 0
    table: list[tuple[torch.Tensor, bool]] = []

    def advance(i: int, _latents: torch.Tensor) -> None:
        nonlocal step
        step = i + 1

    with self_attention_sharing(unet) as state:
        def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not table:
                # Built at the first call (set_timesteps ran inside sample()) and moved to the device once: a
                # host-to-device copy per step or layer would synchronise the GPU every time.
                n_steps = len(scheduler.timesteps)
                masks = torch.stack([share_schedule(p, i, n_steps) for i in range(n_steps)])  # (steps, N)
                on_device = masks.to(device)
                table.extend((on_device[i], bool(masks[i].any())) for i in range(n_steps))
            state.share, state.active = table[min(step, len(table) - 1)]
            eps_uncond, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context,
                                        return_dict=False)[0].chunk(2)
            return eps_uncond + scale * (eps_cond - eps_uncond)

        final = sample(denoiser, scheduler, latents, steps=steps, generator=generators, progress=False,
                       callback=advance)
    final = final.view(n, 2, *final.shape[1:])
    return final[:, 0], final[:, 1]
