"""Text stage: a causal language model turns an input caption into (edit instruction, edited caption).

The prompt format is the original one (orig dataset_creation/generate_txt_dataset.py)::

    prompt      caption + "\\n##\\n"
    completion  instruction + "\\n%%\\n" + edited caption + "\\nEND"

Sampling follows the orig's GPT-3 call: temperature 0.7, top_p 1.0, frequency penalty 0.1 (OpenAI's additive
per-count penalty, implemented here as a logits processor; transformers' multiplicative ``repetition_penalty`` is
available as well), at most 256 new tokens, stop at ``"\\nEND"``. A completion is rejected when it is malformed or
truncated, when its edited caption equals the input (case and trailing ``.!?`` ignored), or when it hits the safety
word list; a rejected caption is sampled again, up to ``num_retries`` more times (the orig retried the same cases).
Input captions are de-duplicated (after the same normalisation) before anything is generated.

Output: JSON lines ``{"id", "input", "edit", "output"}``, ``id`` being the caption's position in the caption list.
The stage resumes: a sidecar ``<out>.progress.json`` records how many captions were finished and the output's size
at that point, and a restarted run cuts the output back to that size and carries on, so no caption is done twice.
It also records what decides the output (the LM, the captions, the safety list, the sampling settings, the seed and
the batch size, which decides each caption's seed), and refuses to continue a file with other ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ip2p import atomic
from ip2p.data.seeding import mix_seed
from ip2p.datagen.config import TextConfig
from ip2p.datagen.shards import Shard, output_errors

logger = logging.getLogger(__name__)

__all__ = [
    "EDIT_SEPARATOR", "PROMPT_SEPARATOR", "STOP", "Completion", "FrequencyPenaltyLogitsProcessor", "HFGenerator",
    "TextConfig", "TextResult", "TextStats", "WordList", "check_completion", "edit_captions", "make_completion",
    "make_prompt", "normalize_caption", "open_progress", "read_captions", "read_jsonl", "run_text_stage",
    "select_captions",
]

PROMPT_SEPARATOR = "\n##\n"
EDIT_SEPARATOR = "\n%%\n"
STOP = "\nEND"
CAPTION_KEYS = ("caption", "input", "text", "TEXT", "prompt")
"""Keys tried, in order, for the caption of a JSON-lines caption file (LAION metadata uses TEXT)."""


def make_prompt(caption: str) -> str:
    return caption.strip() + PROMPT_SEPARATOR


def make_completion(edit: str, output: str) -> str:
    return edit.strip() + EDIT_SEPARATOR + output.strip() + STOP


def normalize_caption(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing/leading ``.!?`` (the orig's comparison)."""
    return " ".join(text.split()).strip(".!?").strip().lower()


@dataclass(frozen=True)
class Completion:
    """Generated text after the prompt; ``finished``: the LM stopped (stop string or end of sequence) by itself."""

    text: str
    finished: bool = True


# Generate completions for prompts with a seed: the seam between the stage logic and any language model.
GenerateFn = Callable[[list[str], int], list[Completion]]


class WordList:
    """A plain-text safety list: one word or phrase per line, ``#`` comments; matched as whole words, any case."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = sorted({" ".join(w.split()).lower() for w in words if w.strip()})
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in self.words)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if self.words else None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "WordList":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"safety word list {str(path)!r} does not exist; pass a text file, one word a line")
        return cls(line for _, line in _text_lines(path, "safety word list") if not line.lstrip().startswith("#"))

    def match(self, text: str) -> str | None:
        """The first listed word or phrase found in ``text``, or None."""
        if self._pattern is None:
            return None
        found = self._pattern.search(text)
        return found.group(0).lower() if found else None


def check_completion(caption: str, completion: Completion, safety: WordList | None = None
                     ) -> tuple[tuple[str, str] | None, str]:
    """Parse one completion: ``((instruction, edited caption), "ok")`` or ``(None, reason)``.

    Reasons: ``truncated`` (no ``\\nEND`` and the LM did not stop), ``malformed`` (not exactly one ``\\n%%\\n``, an
    empty or multi-line part), ``unchanged`` (edited caption equals the input), ``unsafe`` (safety word list).
    """
    text = completion.text
    end = text.find(STOP)
    if end >= 0:
        text = text[:end]
    elif not completion.finished:
        return None, "truncated"
    parts = text.split(EDIT_SEPARATOR)
    if len(parts) != 2:
        return None, "malformed"
    edit, output = (part.strip() for part in parts)
    if not edit or not output or "\n" in edit or "\n" in output:
        return None, "malformed"
    if normalize_caption(output) == normalize_caption(caption):
        return None, "unchanged"
    if safety is not None and (safety.match(edit) or safety.match(output)):
        return None, "unsafe"
    return (edit, output), "ok"


class FrequencyPenaltyLogitsProcessor:
    """OpenAI's frequency and presence penalties over the generated tokens (not the prompt).

    ``logit[j] -= frequency * count[j] + presence * (count[j] > 0)``, applied before temperature, as OpenAI does.
    ``prompt_length`` is the (left-padded) prompt width, so only tokens after it are counted.
    """

    def __init__(self, frequency: float, presence: float, prompt_length: int) -> None:
        self.frequency = frequency
        self.presence = presence
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length:]  # (B, T)
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class HFGenerator:
    """A :data:`GenerateFn` over any Hugging Face causal LM: batched, left-padded, seeded sampling."""

    def __init__(self, model, tokenizer, config: TextConfig) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        # Decoder-only models continue from the right end: pad on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in eos if e is not None} | (
            {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set())

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, config: TextConfig, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "HFGenerator":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
        except (OSError, ValueError) as e:  # ValueError: a folder of another kind of model (multi-line messages)
            raise FileNotFoundError(f"language model {str(source)!r} could not be loaded ({type(e).__name__}); pass a "
                                    "folder with a causal LM and its tokenizer, or a hub id available offline") from e
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, config)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seed: int) -> list[Completion]:
        from transformers import LogitsProcessorList

        c = self.config
        device = self.model.device
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        width = enc.input_ids.shape[1]
        processors = LogitsProcessorList()
        if c.frequency_penalty or c.presence_penalty:
            processors.append(FrequencyPenaltyLogitsProcessor(c.frequency_penalty, c.presence_penalty, width))
        sampling = dict(do_sample=True, temperature=c.temperature, top_p=c.top_p) if c.temperature > 0 else dict(
            do_sample=False)
        # generate() draws from the global RNG; fork it so seeding here leaves the caller's streams alone.
        devices = [] if device.type == "cpu" else [device]
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
            torch.manual_seed(seed)
            out = self.model.generate(
                **enc, **sampling, max_new_tokens=c.max_new_tokens, repetition_penalty=c.repetition_penalty,
                stop_strings=[STOP], tokenizer=self.tokenizer, logits_processor=processors,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        completions = []
        for row in out[:, width:].tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            finished = STOP in text or any(token in self.eos_ids for token in row)
            completions.append(Completion(text, finished))
        return completions


@dataclass
class TextResult:
    """One caption's outcome: ``edit``/``output`` set when accepted; ``reason``: ``ok`` or the last rejection."""

    id: int
    input: str
    edit: str | None
    output: str | None
    reason: str
    attempts: int

    def record(self) -> dict:
        return {"id": self.id, "input": self.input, "edit": self.edit, "output": self.output}


def edit_captions(items: Sequence[tuple[int, str]], generate: GenerateFn, *, num_retries: int = 3, seed: int = 0,
                  safety: WordList | None = None) -> list[TextResult]:
    """Generate (instruction, edited caption) for (id, caption) items, one batch per attempt; results in item order.

    Attempt ``a`` of a batch uses seed ``mix_seed(seed, first id, a)``, so a resumed or re-sharded run that meets the
    same batch samples the same text.
    """
    results: dict[int, TextResult] = {}
    pending = list(items)
    first_id = items[0][0] if items else 0
    for attempt in range(1 + num_retries):
        if not pending:
            break
        completions = generate([make_prompt(caption) for _, caption in pending], mix_seed(seed, first_id, attempt))
        if len(completions) != len(pending):
            raise ValueError(f"the generate function returned {len(completions)} completions for {len(pending)} "
                             "prompts; it must return one per prompt")
        retry = []
        for (item_id, caption), completion in zip(pending, completions):
            parsed, reason = check_completion(caption, completion, safety)
            edit, output = parsed if parsed else (None, None)
            results[item_id] = TextResult(item_id, caption, edit, output, reason, attempt + 1)
            if parsed is None:
                retry.append((item_id, caption))
        pending = retry
    return [results[item_id] for item_id, _ in items]


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, split at line ends only (``str.splitlines`` also splits at U+2028,
    U+0085, ..., which LAION captions contain); another encoding raises a ValueError naming the file."""
    with open(path, encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, 1):
                yield number, line.rstrip("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason}); convert it, e.g. with iconv -f "
                             "latin1 -t utf-8") from None


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a bad line raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    rows = []
    for number, line in _text_lines(path, what):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); expected a JSON object a line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: a JSON {type(row).__name__}, expected an object")
        rows.append((number, row))
    return rows


def read_captions(path: str | os.PathLike, key: str | None = None) -> list[str]:
    """Captions from a ``.txt`` file (one a line) or JSON lines (``key``, else the first of :data:`CAPTION_KEYS`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {str(path)!r} does not exist; pass a .txt (one caption a line) or "
                                ".jsonl file")
    captions = []
    if path.suffix.lower() not in (".jsonl", ".json"):
        captions = [line.strip() for _, line in _text_lines(path, "caption file") if line.strip()]
    else:
        for number, row in read_jsonl(path, "caption file"):
            name = key if key is not None else next((k for k in CAPTION_KEYS if k in row), None)
            value = row.get(name) if name is not None else None
            if not isinstance(value, str):
                expected = repr(key) if key is not None else f"one of {list(CAPTION_KEYS)}"
                raise ValueError(f"{path}:{number}: no string caption under {expected}; its keys are {sorted(row)}; "
                                 "set --caption-key")
            captions.append(value.strip())
    if not any(captions):
        raise ValueError(f"caption file {str(path)!r} has no captions; expected one caption a line (.txt) or JSON "
                         "lines with a caption (.jsonl)")
    return captions


def select_captions(captions: Sequence[str], shard: Shard = Shard(), safety: WordList | None = None
                    ) -> tuple[list[tuple[int, str]], Counter]:
    """This shard's (id, caption) items after de-duplication and the safety list; returns them and drop counts.

    De-duplication keeps the first occurrence over the whole list, so every shard drops the same captions.
    """
    seen: set[str] = set()
    items, dropped = [], Counter()
    for i, caption in enumerate(captions):
        key = normalize_caption(caption)
        if not key:
            dropped["empty"] += 1
            continue
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        if safety is not None and safety.match(caption):
            dropped["unsafe_input"] += 1
            continue
        if shard.owns(i):
            items.append((i, caption))
    return items, dropped


@dataclass
class TextStats:
    """Counts of one text-stage run (including what earlier, resumed runs did)."""

    captions: int = 0
    done: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)


def _progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.json")


def _digest(values: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(values), ensure_ascii=False).encode("utf-8")).hexdigest()


def _settings(captions: Sequence[str], config: TextConfig, safety: WordList | None, model: str | None) -> dict:
    """What decides the output, as recorded in the progress file (``model``: None, not recorded). The batch size is
    there because a batch's seed derives from its first caption (``edit_captions``); the device and dtype are not (as
    for the images stage), so a run can resume on another machine."""
    return {**({"model": model} if model is not None else {}), **asdict(config), "captions": _digest(captions),
            "safety_words": _digest(safety.words) if safety is not None else None}


def _differences(old: dict, new: dict, old_file: str | None, new_file: str | None) -> list[str]:
    """What differs between recorded and current settings; a setting not recorded (an older progress file) is
    unknown, not a difference."""
    found = []
    for key in [k for k in new if k in old and old[k] != new[k]]:
        if key == "captions":
            found.append("captions: not the ones it was written from" if not old_file else
                         f"captions: {old_file!r} changed since" if old_file == new_file else
                         f"captions: those of {new_file!r} are not those of {old_file!r}")
        elif key == "safety_words":
            found.append("safety word list: " + ("none -> a list" if old[key] is None else "a list -> none"
                                                 if new[key] is None else "another list"))
        else:
            found.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return found


def open_progress(captions: Sequence[str], out_path: str | os.PathLike, *, config: TextConfig = TextConfig(),
                  shard: Shard = Shard(), safety: WordList | None = None, model: str | None = None,
                  caption_file: str | os.PathLike | None = None) -> dict:
    """The progress state to continue ``out_path`` from (a fresh one when there is no progress file); writes nothing.

    Raises a one-line ValueError when the file was written by another shard, from other captions, or with other
    settings (see :func:`_settings`), naming what differs; call it before loading the LM to fail early, and hand
    the state to :func:`run_text_stage`.
    """
    items, _ = select_captions(captions, shard, safety)
    return _open_progress(len(items), captions, Path(out_path), config=config, shard=shard, safety=safety, model=model,
                          caption_file=caption_file)


def _open_progress(count: int, captions: Sequence[str], out: Path, *, config: TextConfig, shard: Shard,
                   safety: WordList | None, model: str | None, caption_file: str | os.PathLike | None) -> dict:
    """:func:`open_progress` given ``count``, the number of captions this shard does (``select_captions``)."""
    progress_file = _progress_path(out)
    settings = _settings(captions, config, safety, model)
    caption_file = str(caption_file) if caption_file is not None else None
    if not progress_file.is_file():
        if out.exists() and out.stat().st_size > 0:
            raise ValueError(f"{out} exists but has no {progress_file.name}; move it away or pass a new --out")
        return {"done": 0, "bytes": 0, "kept": 0, "dropped": {}, "shard": [shard.index, shard.count],
                "settings": settings, "caption_file": caption_file}
    try:
        state = json.loads(progress_file.read_text())
    except json.JSONDecodeError as e:  # replaced atomically: edited by hand, or the disk failed
        raise ValueError(f"{progress_file} is not valid JSON ({e}); restore it, or delete it and {out.name} to "
                         "start over") from None
    if state.get("shard") != [shard.index, shard.count]:
        raise ValueError(f"{out} was written as shard {state.get('shard')} but this run is shard "
                         f"{[shard.index, shard.count]}; use the same --num-shards/--shard-index or a new --out")
    recorded = state.get("settings") or {}
    differences = _differences(recorded, settings, state.get("caption_file"), caption_file)
    if differences:
        raise ValueError(f"{out} was written with other settings ({'; '.join(differences)}); rerun with the ones it "
                         "was written with, or pass another --out to start a new file")
    if state["done"] > count:
        raise ValueError(f"{progress_file} records {state['done']} finished captions but the caption list gives "
                         f"this shard only {count}; pass the same caption file or a new --out")
    # A progress file of an earlier version records no settings: from its next commit on, it records these.
    state["settings"] = {**recorded, **settings}
    state["caption_file"] = caption_file if caption_file is not None else state.get("caption_file")
    return state


def run_text_stage(captions: Sequence[str], out_path: str | os.PathLike, generate: GenerateFn, *,
                   config: TextConfig = TextConfig(), shard: Shard = Shard(), safety: WordList | None = None,
                   model: str | None = None, caption_file: str | os.PathLike | None = None,
                   progress: bool = True, state: dict | None = None) -> TextStats:
    """Write this shard's accepted triples to ``out_path`` (JSON lines), resuming an interrupted run.

    Each batch is appended and fsynced, then ``<out>.progress.json`` is replaced atomically with the new caption count
    and file size: the commit point. On restart the output is truncated to the committed size (a killed batch is
    redone, never duplicated). ``model`` (the LM's name) and ``caption_file`` are recorded with the sampling settings
    and the captions' digest, and a restart with other ones is refused (:func:`open_progress`). ``state``: what
    ``open_progress`` returned for these same arguments (None: it is opened here).
    """
    from tqdm.auto import tqdm

    out = Path(out_path)
    items, input_drops = select_captions(captions, shard, safety)
    progress_file = _progress_path(out)
    if state is None:
        state = _open_progress(len(items), captions, out, config=config, shard=shard, safety=safety, model=model,
                               caption_file=caption_file)
    with output_errors(out):
        if not progress_file.is_file():  # committed before the first line: a run killed before its first commit resumes
            atomic.write_json(progress_file, state, ensure_ascii=False)
        with open(out, "ab") as handle:
            handle.truncate(state["bytes"])  # drop whatever a killed run appended after its last commit
    dropped = Counter(state["dropped"])
    bar = tqdm(total=len(items), initial=state["done"], desc="captions", unit="caption", disable=not progress)
    for start in range(state["done"], len(items), config.batch_size):
        batch = items[start:start + config.batch_size]
        results = edit_captions(batch, generate, num_retries=config.num_retries, seed=config.seed, safety=safety)
        lines = "".join(json.dumps(r.record(), ensure_ascii=False) + "\n" for r in results if r.reason == "ok")
        dropped.update(r.reason for r in results if r.reason != "ok")
        # The file is opened per batch so that a failed write is closed (and reported) here, not at a later close.
        with output_errors(out), open(out, "ab") as handle:
            handle.write(lines.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            state.update(done=start + len(batch), bytes=os.fstat(handle.fileno()).st_size, dropped=dict(dropped),
                         kept=state["kept"] + sum(r.reason == "ok" for r in results))
            atomic.write_json(progress_file, state, ensure_ascii=False)
        bar.update(len(batch))
        bar.set_postfix(kept=state["kept"], tried=state["done"])
    bar.close()
    all_drops = dict(dropped + input_drops)
    # Drops before the LM (empty, duplicate, unsafe captions) are counted over the whole list, which this shard's
    # items are a part of: say both numbers.
    logger.info("text stage %s: %d captions kept of the %d this shard gave the LM (%d in the list); dropped: %s",
                shard.tag, state["kept"], len(items), len(captions), all_drops or "none")
    return TextStats(captions=len(items), done=state["done"], kept=state["kept"], dropped=all_drops)
