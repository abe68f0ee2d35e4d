"""Fine-tune a causal LM on human-written (caption, instruction, edited caption) triples (paper section 3.1.1).

The paper fine-tuned GPT-3 davinci for one epoch on 700 triples written by hand for LAION captions. Here any
Hugging Face causal LM is trained with a plain PyTorch loop on ``prompt + completion`` in the text stage's format,
with the loss on the completion tokens only (the prompt is given, not predicted). The result is saved with
``save_pretrained`` and loads in the text stage like any model folder.

Triples file: JSON lines ``{"input": caption, "edit": instruction, "output": edited caption}`` (the orig's keys;
``caption`` is accepted for ``input``). ``ip2p/datagen/examples/triples.jsonl`` is a small example; see
docs/datagen.md for writing the ~700 the paper used.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ip2p.datagen.config import FinetuneConfig
from ip2p.datagen.text import make_completion, make_prompt, read_jsonl

logger = logging.getLogger(__name__)

__all__ = ["EXAMPLE_TRIPLES", "FinetuneConfig", "Triple", "build_example", "collate", "finetune_lm", "read_triples"]

EXAMPLE_TRIPLES = Path(__file__).with_name("examples") / "triples.jsonl"


@dataclass(frozen=True)
class Triple:
    input: str
    edit: str
    output: str


def read_triples(path: str | os.PathLike) -> list[Triple]:
    """Triples from JSON lines; a line lacking string ``input``/``edit``/``output`` raises ValueError naming it."""
    triples = []
    for number, row in read_jsonl(path, "triples file"):
        values = {"input": row.get("input", row.get("caption")), "edit": row.get("edit"), "output": row.get("output")}
        bad = [key for key, value in values.items() if not isinstance(value, str) or not value.strip()]
        if bad:
            raise ValueError(f"{path}:{number}: missing or empty {', '.join(bad)}; each line needs string input, edit "
                             f"and output (its keys are {sorted(row)})")
        triples.append(Triple(**{key: value.strip() for key, value in values.items()}))
    if not triples:
        raise ValueError(f"triples file {str(path)!r} has no triples; expected JSON lines with input, edit, output")
    return triples


def build_example(tokenizer, triple: Triple, max_length: int = 512) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + EOS and labels with the prompt masked (-100). Both of one length.

    Tokenised jointly, as the model reads it at generation time; the prompt ends with a newline, a token boundary for
    the usual tokenizers, so the first ``len(prompt ids)`` tokens are the prompt. The EOS teaches the model to stop.
    """
    prompt = make_prompt(triple.input)
    prompt_ids = tokenizer(prompt).input_ids
    ids = tokenizer(prompt + make_completion(triple.edit, triple.output)).input_ids
    if ids[:len(prompt_ids)] != prompt_ids:
        logger.debug("prompt and full text tokenise differently at the boundary: %r", triple.input)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each (B, T) int64; padding is masked out of the loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def finetune_lm(model, tokenizer, triples: list[Triple], config: FinetuneConfig = FinetuneConfig(), *,
                progress: bool = True) -> list[float]:
    """Train ``model`` in place on ``triples`` with AdamW (constant lr); returns the loss of every optimizer step.

    The model's own device and dtype are used; keep the weights in float32 (or bfloat16) when training.
    """
    from tqdm.auto import tqdm

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = [build_example(tokenizer, t, config.max_length) for t in triples]
    usable = [e for e in examples if any(label != -100 for label in e[1])]
    if len(usable) < len(examples):
        logger.warning("%d of %d triples have no completion tokens within max_length=%d; skipped",
                       len(examples) - len(usable), len(examples), config.max_length)
    if not usable:
        raise ValueError(f"no triple has completion tokens within max_length={config.max_length}; raise max_length")
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(usable) / (config.batch_size * config.gradient_accumulation))
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    order: list[int] = []
    bar = tqdm(total=total_steps, desc="fine-tuning", unit="step", disable=not progress)
    while len(losses) < total_steps:
        optimizer.zero_grad(set_to_none=True)
        # Token-weighted mean over the accumulated micro-batches: every completion token counts the same.
        micro = []
        for _ in range(config.gradient_accumulation):
            batch = []
            for _ in range(config.batch_size):
                if not order:
                    order = torch.randperm(len(usable), generator=generator).tolist()
                batch.append(usable[order.pop()])
            micro.append(collate(batch, tokenizer.pad_token_id))
        tokens = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        total = 0.0
        for m in micro:
            m = {key: value.to(device) for key, value in m.items()}
            logits = model(input_ids=m["input_ids"], attention_mask=m["attention_mask"]).logits[:, :-1].float()
            targets = m["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     ignore_index=-100, reduction="sum") / tokens
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
    bar.close()
    model.eval()
    return losses
