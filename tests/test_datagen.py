"""Data generation, model-free parts and small models: text stage, CLIP scores, filter, writer (SPEC section 6)."""

import json
import math

import numpy as np
import pytest
import torch
from test_datagen_support import one_thread  # noqa: F401 (autouse fixture)

from ip2p import atomic
from ip2p.datagen.config import FilterConfig, TextConfig
from ip2p.datagen.filter import filter_dataset, passes, select
from ip2p.datagen.shards import Shard, shard_from_env, sharded_path
from ip2p.datagen.text import (
    Completion,
    FrequencyPenaltyLogitsProcessor,
    WordList,
    check_completion,
    edit_captions,
    make_completion,
    make_prompt,
    normalize_caption,
    read_captions,
    run_text_stage,
    select_captions,
)
from ip2p.datagen.writer import DatasetWriter, Pair, Sample


# -- text stage: format, parsing, filters ----------------------------------------------------------------------------
def test_prompt_and_completion_use_the_original_format():
    assert make_prompt(" a red car ") == "a red car\n##\n"
    assert make_completion("make it blue", "a blue car") == "make it blue\n%%\na blue car\nEND"


@pytest.mark.parametrize("text, finished, expected", [
    ("make it blue\n%%\na blue car\nEND", True, (("make it blue", "a blue car"), "ok")),
    ("make it blue\n%%\na blue car\nEND\nmore text the model kept going with", True,
     (("make it blue", "a blue car"), "ok")),
    ("make it blue\n%%\na blue car", True, (("make it blue", "a blue car"), "ok")),  # stopped by EOS
    ("make it blue\n%%\na blue car and then it went on and on", False, (None, "truncated")),
    ("make it blue and a blue car\nEND", True, (None, "malformed")),
    ("a\n%%\nb\n%%\nc\nEND", True, (None, "malformed")),
    ("\n%%\na blue car\nEND", True, (None, "malformed")),
    ("make it blue\n%%\na blue\ncar\nEND", True, (None, "malformed")),
    ("do nothing\n%%\nA Red Car!\nEND", True, (None, "unchanged")),
])
def test_check_completion(text, finished, expected):
    assert check_completion("a red car.", Completion(text, finished)) == expected


def test_safety_word_list_matches_whole_words_and_phrases(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# comment line\nGore\nbad  thing\n\n")
    words = WordList.from_file(path)
    assert words.match("so much gore here") == "gore"
    assert words.match("a Bad thing happened") == "bad thing"
    assert words.match("Gorey story, goresome") is None  # inside other words
    assert words.match("bad things") is None
    assert check_completion("a cat", Completion("add gore\n%%\na cat with gore\nEND"), words) == (None, "unsafe")
    with pytest.raises(FileNotFoundError, match="safety word list"):
        WordList.from_file(tmp_path / "missing.txt")


def test_normalize_caption_ignores_case_space_and_trailing_punctuation():
    assert normalize_caption("  A red   car!? ") == normalize_caption("a red car.") == "a red car"
    assert normalize_caption("a red car") != normalize_caption("a blue car")


def test_select_captions_dedupes_filters_and_shards():
    captions = ["a cat", "A cat.", "a dog", "", "bad thing here", "a bird", "a DOG!"]
    items, dropped = select_captions(captions, safety=WordList(["bad thing"]))
    assert items == [(0, "a cat"), (2, "a dog"), (5, "a bird")]
    assert dropped == {"duplicate": 2, "empty": 1, "unsafe_input": 1}
    halves = [select_captions(captions, Shard(i, 2))[0] for i in range(2)]
    assert sorted(halves[0] + halves[1]) == select_captions(captions)[0]
    assert all(item_id % 2 == i for i, half in enumerate(halves) for item_id, _ in half)


def _scripted(outputs: dict[str, list[str]]):
    """A GenerateFn answering each caption with its scripted completions in turn (the last one repeats)."""
    calls = []

    def generate(prompts, seed):
        calls.append((list(prompts), seed))
        results = []
        for prompt in prompts:
            caption = prompt[:-len("\n##\n")]
            script = outputs[caption]
            attempt = sum(prompt in c for c, _ in calls) - 1
            results.append(Completion(script[min(attempt, len(script) - 1)]))
        return results

    generate.calls = calls
    return generate


def test_edit_captions_retries_rejected_captions_only():
    generate = _scripted({
        "a cat": ["garbage", "make it a dog\n%%\na dog\nEND"],
        "a car": ["make it red\n%%\na red car\nEND"],
        "a sky": ["nothing\n%%\nA sky.\nEND"],
    })
    results = edit_captions([(0, "a cat"), (1, "a car"), (2, "a sky")], generate, num_retries=2, seed=5)
    assert [(r.id, r.edit, r.output, r.reason, r.attempts) for r in results] == [
        (0, "make it a dog", "a dog", "ok", 2), (1, "make it red", "a red car", "ok", 1),
        (2, None, None, "unchanged", 3)]
    assert [len(prompts) for prompts, _ in generate.calls] == [3, 2, 1]  # only the rejected ones again
    assert len({seed for _, seed in generate.calls}) == 3  # a fresh seed per attempt
    no_retry = edit_captions([(0, "a cat")], _scripted({"a cat": ["garbage", "ok\n%%\nfine\nEND"]}), num_retries=0)
    assert no_retry[0].reason == "malformed"


def test_frequency_penalty_counts_generated_tokens_only():
    processor = FrequencyPenaltyLogitsProcessor(frequency=0.5, presence=0.25, prompt_length=2)
    ids = torch.tensor([[3, 3, 1, 1, 2]])  # prompt (3, 3), generated (1, 1, 2)
    out = processor(ids, torch.zeros(1, 5))
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0]]


def _text_generate(prompts, seed):
    """Deterministic stand-in LM: edits every caption by appending ' at night'."""
    return [Completion(f"make it night\n%%\n{p[:-4]} at night\nEND") for p in prompts]


def test_run_text_stage_resumes_after_a_crash_without_duplicates(tmp_path, caplog):
    caplog.set_level("INFO", logger="ip2p.datagen.text")
    captions = [f"caption number {i}" for i in range(10)] + ["caption number 3."]
    out = tmp_path / "prompts.jsonl"
    config = TextConfig(batch_size=3)
    calls = {"n": 0}

    def crashing(prompts, seed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process dies during the third batch
        return _text_generate(prompts, seed)

    with pytest.raises(KeyboardInterrupt):
        run_text_stage(captions, out, crashing, config=config, progress=False)
    with open(out, "a") as handle:  # a torn write after the last commit
        handle.write('{"id": 99, "input": "half a li')
    stats = run_text_stage(captions, out, _text_generate, config=config, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(10))  # the duplicate caption "3." is dropped
    assert rows[4] == {"id": 4, "input": "caption number 4", "edit": "make it night",
                       "output": "caption number 4 at night"}
    assert stats.kept == 10 and stats.dropped == {"duplicate": 1}
    # the summary counts the duplicate as dropped from the 11 listed, not as one of the 10 the LM edited
    assert ("10 captions kept of the 10 this shard gave the LM (11 in the list); dropped: {'duplicate': 1}"
            in caplog.text)
    # Rerunning a finished stage changes nothing.
    run_text_stage(captions, out, _text_generate, config=config, progress=False)
    assert len(out.read_text().splitlines()) == 10


def test_run_text_stage_refuses_to_continue_with_other_settings_and_resumes_older_progress_files(tmp_path):
    captions = [f"caption number {i}" for i in range(6)]
    other_captions = [f"another caption {i}" for i in range(6)]  # as many: only the content tells them apart
    config = TextConfig(batch_size=2)
    recorded = {"config": config, "model": "lm-a", "caption_file": "a.txt"}

    def stopping_after_one_batch(out):
        calls = []

        def generate(prompts, seed):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return _text_generate(prompts, seed)

        with pytest.raises(KeyboardInterrupt):
            run_text_stage(captions, out, generate, **recorded, progress=False)

    whole = tmp_path / "whole.jsonl"
    run_text_stage(captions, whole, _text_generate, **recorded, progress=False)
    out = tmp_path / "prompts.jsonl"
    stopping_after_one_batch(out)
    progress = json.loads((tmp_path / "prompts.jsonl.progress.json").read_text())
    assert progress["settings"]["model"] == "lm-a" and progress["settings"]["temperature"] == 0.7
    assert progress["caption_file"] == "a.txt"
    safety = WordList(["gore"])
    for change, message in [
        ({"config": TextConfig(batch_size=2, temperature=0.9)}, "temperature: 0.7 -> 0.9"),
        ({"config": TextConfig(batch_size=2, top_p=0.5, seed=3)}, "top_p: 1.0 -> 0.5; seed: 0 -> 3"),
        ({"config": TextConfig(batch_size=2, frequency_penalty=0.0)}, "frequency_penalty: 0.1 -> 0.0"),
        ({"config": TextConfig(batch_size=2, max_new_tokens=64)}, "max_new_tokens: 256 -> 64"),
        ({"config": TextConfig(batch_size=3)}, "batch_size: 2 -> 3"),  # it decides each caption's seed
        ({"model": "lm-b"}, "model: 'lm-a' -> 'lm-b'"),
        ({"safety": safety}, "safety word list: none -> a list"),
        ({"captions": other_captions}, "captions: 'a.txt' changed since"),
        ({"captions": other_captions, "caption_file": "b.txt"}, "captions: those of 'b.txt' are not those of 'a.txt'"),
    ]:
        args = {"captions": captions, **recorded, **change}
        with pytest.raises(ValueError, match="was written with other settings") as error:
            run_text_stage(args.pop("captions"), out, _text_generate, **args, progress=False)
        assert message in str(error.value) and "\n" not in str(error.value), change
        assert "pass another --out" in str(error.value)
    # The same captions from a file of another name are the same input.
    run_text_stage(captions, out, _text_generate, **{**recorded, "caption_file": "moved/a.txt"}, progress=False)
    assert out.read_text() == whole.read_text()

    # A progress file of the previous version, without settings: they are unknown, so it resumes, and records them.
    legacy = tmp_path / "legacy.jsonl"
    stopping_after_one_batch(legacy)
    legacy_progress = tmp_path / "legacy.jsonl.progress.json"
    state = json.loads(legacy_progress.read_text())
    del state["settings"], state["caption_file"]
    atomic.write_json(legacy_progress, state)
    run_text_stage(captions, legacy, _text_generate, **recorded, progress=False)
    assert legacy.read_text() == whole.read_text()
    assert json.loads(legacy_progress.read_text())["settings"]["model"] == "lm-a"
    # A setting an older version did not record is not compared either.
    state = json.loads(legacy_progress.read_text())
    del state["settings"]["presence_penalty"]
    atomic.write_json(legacy_progress, state)
    unrecorded_changed = TextConfig(batch_size=2, presence_penalty=0.5)
    run_text_stage(captions, legacy, _text_generate, **{**recorded, "config": unrecorded_changed}, progress=False)


def test_read_captions_formats_and_errors(tmp_path):
    (tmp_path / "c.txt").write_text("a cat\n\n a dog \n")
    assert read_captions(tmp_path / "c.txt") == ["a cat", "a dog"]
    (tmp_path / "c.jsonl").write_text('{"TEXT": "a cat", "URL": "x"}\n\n{"TEXT": "a dog"}\n')
    assert read_captions(tmp_path / "c.jsonl") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"caption": "a cat"}\n{"caption": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "nokey.jsonl").write_text('{"caption": "a"}\n\n{"url": "b"}\n')
    with pytest.raises(ValueError, match=r"nokey.jsonl:3: no string caption"):
        read_captions(tmp_path / "nokey.jsonl")
    with pytest.raises(FileNotFoundError, match="caption file"):
        read_captions(tmp_path / "missing.txt")


def test_hf_generator_on_a_tiny_lm_is_seeded_and_reports_truncation():
    from ip2p.datagen.text import HFGenerator
    from ip2p.tiny import tiny_causal_lm

    model, tokenizer = tiny_causal_lm()
    generator = HFGenerator(model, tokenizer, TextConfig(max_new_tokens=12))
    prompts = [make_prompt("a cat"), make_prompt("a much longer caption of a dog")]
    first, again, other = generator(prompts, 1), generator(prompts, 1), generator(prompts, 2)
    assert len(first) == 2 and first == again and first != other
    # A random model writes no "\nEND" (nor, with this seed, an end-of-sequence token): cut off at 12 byte tokens.
    assert all(not c.finished and 0 < len(c.text) <= 12 for c in first)


# -- sharding -------------------------------------------------------------------------------------------------------
def test_shard_from_env_and_paths(monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shard_from_env() == Shard(0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert shard_from_env() == Shard(1, 3)
    assert shard_from_env(2, 0) == Shard(0, 2)  # flags win over the environment
    with pytest.raises(ValueError, match="shard_index=3"):
        Shard(3, 2)
    with pytest.raises(ValueError, match="pass both or neither"):
        shard_from_env(2, None)
    assert sharded_path(tmp_path / "p.jsonl", Shard(1, 4)).name == "p.shard-00001-of-00004.jsonl"
    assert sharded_path(tmp_path / "p.jsonl", Shard()).name == "p.jsonl"


# -- CLIP -----------------------------------------------------------------------------------------------------------
def test_clip_scores_from_hand_made_embeddings():
    from ip2p.eval.clip import clip_scores_from_embeds

    img_in = torch.tensor([[1.0, 0.0, 0.0]])
    img_out = torch.tensor([[0.0, 2.0, 0.0]])  # normalised inside
    txt_in = torch.tensor([[1.0, 0.0, 0.0]])
    txt_out = torch.tensor([[0.0, 0.0, 1.0]])
    s = clip_scores_from_embeds(img_in, img_out, txt_in, txt_out)
    assert s["clip_sim_0"].item() == pytest.approx(1.0)
    assert s["clip_sim_1"].item() == pytest.approx(0.0)
    assert s["clip_sim_image"].item() == pytest.approx(0.0)
    # cos((-1, 1, 0), (-1, 0, 1)) = 1/2
    assert s["clip_sim_dir"].item() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from ip2p.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_clip_scorer_preprocesses_unit_range_images_and_scores(tiny_clip_dir):
    from ip2p.eval.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipScorer

    scorer = ClipScorer(tiny_clip_dir)
    # A constant 0.5 image must become (0.5 - mean) / std: [0, 1] in, not [-1, 1] (the orig's bug).
    pixels = scorer.preprocess(torch.full((1, 3, 48, 64), 0.5))
    assert pixels.shape == (1, 3, 32, 32)
    expected = (0.5 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(pixels[0, :, 5, 5], expected, atol=1e-5)
    # Resize of the shortest side, then a centre crop: a left/right split image keeps both halves around the centre.
    split = torch.zeros(1, 3, 32, 64)
    split[..., 32:] = 1.0
    cropped = scorer.preprocess(split) * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) + torch.tensor(
        OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    assert cropped[0, 0, 0, 0] < 0.01 and cropped[0, 0, 0, -1] > 0.99
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 40, 40, generator=g), torch.rand(3, 3, 40, 40, generator=g)
    embeds = scorer.image_embeds(a)
    assert embeds.shape == (3, 32) and torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    pil = [__import__("PIL.Image").Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
           for x in a]
    assert torch.allclose(scorer.image_embeds(pil), embeds, atol=2e-2)  # PIL / uint8 input is accepted
    scores = scorer.scores(a, b, ["a cat"] * 3, "a dog")
    assert set(scores) == {"clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image"}
    assert all(v.shape == (3,) for v in scores.values())
    same = scorer.scores(a, a, "a cat", "a dog")
    assert torch.allclose(same["clip_sim_image"], torch.ones(3), atol=1e-5)
    assert torch.allclose(same["clip_sim_dir"], torch.zeros(3))  # no image change, no direction
    text = scorer.text_embeds(["a cat", "a dog"])
    assert torch.allclose(scores["clip_sim_0"], embeds @ text[0], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="clip model"):
        ClipScorer(tiny_clip_dir / "missing")


# -- filter ---------------------------------------------------------------------------------------------------------
def _scores(rows):
    keys = ("clip_sim_image", "clip_sim_dir", "clip_sim_0", "clip_sim_1")
    return {k: torch.tensor([r[i] for r in rows], dtype=torch.float32) for i, k in enumerate(keys)}


def test_filter_thresholds_are_inclusive_and_all_required():
    rows = [  # image, dir, cap0, cap1
        (0.70, 0.20, 0.20, 0.20),  # exactly at every threshold: kept
        (0.69, 0.90, 0.30, 0.30),  # image too different
        (0.90, 0.19, 0.30, 0.30),  # edit does not follow the captions
        (0.90, 0.50, 0.19, 0.30),  # input image off its caption
        (0.90, 0.50, 0.30, 0.19),  # edited image off its caption
        (0.90, float("nan"), 0.30, 0.30),  # unscored
        (0.95, 0.60, 0.25, 0.25),
    ]
    assert passes(_scores(rows)).tolist() == [True, False, False, False, False, False, True]
    loose = FilterConfig(min_image_sim=0.6, min_dir_sim=0.1, min_caption_sim=0.1)
    assert passes(_scores(rows), loose).tolist() == [True, True, True, True, True, False, True]
    with pytest.raises(ValueError, match="clip_sim_dir"):
        passes({"clip_sim_0": torch.zeros(1)})


def test_filter_keeps_best_k_by_directional_similarity():
    dirs = [0.3, 0.9, 0.25, 0.9, 0.5, 0.7, 0.1]
    rows = [(0.8, d, 0.3, 0.3) for d in dirs]
    rows[4] = (0.5, 0.5, 0.3, 0.3)  # fails the image threshold despite a good direction
    assert select(_scores(rows)) == [1, 3, 5, 0]  # ties keep the earlier sample first
    assert select(_scores(rows), FilterConfig(keep_top=2)) == [1, 3]
    assert select(_scores([(0.1, 0.9, 0.3, 0.3)])) == []


# -- writer ---------------------------------------------------------------------------------------------------------
def _samples(pair: Pair, n: int, seed0: int = 100) -> list[Sample]:
    rng = np.random.default_rng(pair.id)
    return [Sample(pair, seed0 + k, 0.1 * k, 7.5 + k, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                   rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                   {"clip_sim_0": 0.3, "clip_sim_1": 0.3, "clip_sim_dir": 0.25, "clip_sim_image": 0.8})
            for k in range(n)]


def _pairs(n):
    return [Pair(i, f"a thing {i}", f"make it {i}", f"a thing {i} made") for i in range(n)]


def test_writer_parquet_loads_as_images_with_datasets_and_the_data_layer(tmp_path):
    import datasets

    from ip2p.data import decode_image, open_records

    out = tmp_path / "ds"
    writer = DatasetWriter(out, rows_per_file=3)
    expected = {}
    for pair in _pairs(4):
        samples = _samples(pair, pair.id % 3)  # 0, 1, 2, 0 samples: empty pairs are done but write no rows
        expected.update({(s.pair.id, s.seed): s for s in samples})
        writer.add_pair(pair, samples, tried=5)
    writer.close()
    assert writer.kept == 3 and writer.tried == 20
    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert {"input_image", "edit_prompt", "edited_image", "input_prompt", "edited_prompt", "pair_id", "seed",
            "p2p_threshold", "cfg_scale", "clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image"} == set(
        ds.column_names)
    assert isinstance(ds.features["input_image"], datasets.Image)
    assert len(ds) == 3
    for row in ds:
        sample = expected[(row["pair_id"], row["seed"])]
        assert np.array_equal(np.asarray(row["input_image"]), sample.image_in)  # PNG: lossless
        assert np.array_equal(np.asarray(row["edited_image"]), sample.image_out)
        assert row["edit_prompt"] == sample.pair.edit and row["edited_prompt"] == sample.pair.output
        assert row["cfg_scale"] == pytest.approx(sample.cfg_scale)
    records = open_records(out, cache_dir=tmp_path / "cache2")  # what train.py's data.path=<out> does
    assert records.count() == 3
    record = records.get(0)
    assert record["instruction"].startswith("make it")
    assert decode_image(record["source"]).size == (8, 8)


def test_writer_seeds_layout_matches_the_original_release(tmp_path):
    from ip2p.data import open_records

    out = tmp_path / "orig"
    writer = DatasetWriter(out, formats="seeds")
    for pair in _pairs(3):
        writer.add_pair(pair, _samples(pair, 2, seed0=10 * pair.id), tried=2)
    writer.close()
    assert json.loads((out / "seeds.json").read_text()) == [["0000000", [0, 1]], ["0000001", [10, 11]],
                                                            ["0000002", [20, 21]]]
    assert json.loads((out / "0000001" / "prompt.json").read_text()) == {
        "input": "a thing 1", "edit": "make it 1", "output": "a thing 1 made"}
    assert (out / "0000002" / "21_0.jpg").is_file() and (out / "0000002" / "21_1.jpg").is_file()
    meta = [json.loads(line) for line in (out / "0000000" / "metadata.jsonl").read_text().splitlines()]
    assert meta[1]["seed"] == 1 and meta[1]["clip_sim_dir"] == pytest.approx(0.25)
    assert open_records(out).count() == 4  # 90/5/5 split by prompt folder: 2 of 3 folders in train, 2 seeds each


def test_writer_resume_drops_uncommitted_files_and_refuses_other_settings(tmp_path):
    out = tmp_path / "ds"
    writer = DatasetWriter(out, rows_per_file=100, settings={"steps": 10})
    pairs = _pairs(3)
    writer.add_pair(pairs[0], _samples(pairs[0], 2), tried=2)
    writer.commit()
    writer.add_pair(pairs[1], _samples(pairs[1], 2), tried=2)
    # Simulate a kill between the parquet write and the manifest update: the file exists, the manifest lacks it.
    orphan = out / "data" / "train-00000-of-00001-00001.parquet"
    atomic.write_bytes(orphan, writer._parquet_bytes(writer._rows))
    del writer
    resumed = DatasetWriter(out, rows_per_file=100, settings={"steps": 10})
    assert not orphan.exists()
    assert resumed.done_ids == {0}
    assert math.isclose(resumed.kept, 2)
    with pytest.raises(ValueError, match=r"other settings \(steps: 10 -> 20\)"):
        DatasetWriter(out, settings={"steps": 20})
    with pytest.raises(ValueError, match="format='zip'"):
        DatasetWriter(out, formats="zip")


def test_writer_refuses_pairs_whose_captions_differ_from_those_finished_by_any_shard(tmp_path):
    out, pairs = tmp_path / "ds", _pairs(4)
    for index in (0, 1):  # pair 0 by shard 0 of 2, pair 1 by shard 1
        writer = DatasetWriter(out, shard=Shard(index, 2))
        writer.add_pair(pairs[index], _samples(pairs[index], 1), tried=1)
        writer.close()
    resumed = DatasetWriter(out, shard=Shard(0, 2))
    resumed.check_pairs(pairs)  # the same captions, and pairs not yet made: fine
    other = Pair(1, "a thing 1", "make it blue", "a blue thing 1")
    with pytest.raises(ValueError, match=r"already holds pair id 1 made from other captions or another instruction "
                                         r"than 'a thing 1' -> 'a blue thing 1' with 'make it blue' \(1 such pairs\); "
                                         r"resume with the prompts file"):
        resumed.check_pairs([pairs[0], other])
    with pytest.raises(ValueError, match=r"pair id 1 .* than 'a thing 1' -> 'a thing 1 made' with 'make it one'"):
        resumed.check_pairs([Pair(1, "a thing 1", "make it one", "a thing 1 made")])  # only the instruction differs
    # A manifest written before the digests existed: its pairs are not checked, and later commits stay aligned.
    path = out / "_progress" / f"{Shard(0, 2).tag}.json"
    manifest = json.loads(path.read_text())
    del manifest["digests"]
    path.write_text(json.dumps(manifest))
    older = DatasetWriter(out, shard=Shard(0, 2))
    older.check_pairs([Pair(0, "x", "y", "z")])
    older.add_pair(pairs[2], _samples(pairs[2], 1), tried=1)
    older.close()
    manifest = json.loads(path.read_text())
    assert manifest["done"] == [0, 2] and manifest["digests"][0] is None and manifest["digests"][1]
    with pytest.raises(ValueError, match="already holds pair id 2"):
        DatasetWriter(out, shard=Shard(1, 2)).check_pairs([Pair(2, "x", "y", "z")])


def test_filter_reads_the_files_the_manifests_list_not_one_a_killed_run_left(tmp_path):
    import shutil

    source = tmp_path / "ds"
    writer = DatasetWriter(source, rows_per_file=100)
    pairs = _pairs(2)
    writer.add_pair(pairs[0], _samples(pairs[0], 2), tried=2)
    writer.commit()
    writer.add_pair(pairs[1], _samples(pairs[1], 2), tried=2)
    # Killed between the parquet write and the manifest update, and not resumed: the file is there, not listed.
    atomic.write_bytes(source / "data" / "train-00000-of-00001-00001.parquet", writer._parquet_bytes(writer._rows))
    kept = DatasetWriter(tmp_path / "kept")
    filter_dataset(source, kept, config=FilterConfig(), progress=False)
    assert kept.done_ids == {0} and kept.kept == 2
    # A folder without manifests (parquet files copied on their own) is read whole.
    copy = tmp_path / "copy"
    shutil.copytree(source / "data", copy / "data")
    everything = DatasetWriter(tmp_path / "everything")
    filter_dataset(copy, everything, config=FilterConfig(), progress=False)
    assert everything.done_ids == {0, 1}
    # A listed file that is gone is named, not skipped.
    (source / "data" / "train-00000-of-00001-00000.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="lacks train-00000-of-00001-00000.parquet, which the manifests"):
        filter_dataset(source, DatasetWriter(tmp_path / "none"), config=FilterConfig(), progress=False)


def test_writer_resumed_with_another_shard_count_drops_the_killed_shards_uncommitted_file(tmp_path):
    import pyarrow.parquet as pq

    out, pairs = tmp_path / "ds", _pairs(4)
    for index in (0, 1):
        writer = DatasetWriter(out, shard=Shard(index, 2), rows_per_file=1)
        writer.add_pair(pairs[index], _samples(pairs[index], 1), tried=1)  # committed
    # Shard 1 is killed between writing the parquet file of pair 3 and its manifest update.
    writer._rows = _samples(pairs[3], 1)
    orphan = out / "data" / "train-00001-of-00002-00001.parquet"
    atomic.write_bytes(orphan, writer._parquet_bytes(writer._rows))
    # Hub-style names (hash suffix) are not the writer's, even with its shard tag: never deleted.
    foreign = [out / "data" / f"train-00000-of-0000{n}-57cebf95b4a9170c.parquet" for n in (1, 2)]
    for path in foreign:
        path.write_bytes(b"")
    resumed = DatasetWriter(out, rows_per_file=1)  # the rest is done by one process
    assert resumed.done_ids == {0, 1} and not orphan.exists() and all(path.exists() for path in foreign)
    for path in foreign:
        path.unlink()
    for pair in pairs[2:]:
        resumed.add_pair(pair, _samples(pair, 1), tried=1)
    resumed.close()
    assert sorted(pq.read_table(out / "data").column("pair_id").to_pylist()) == [0, 1, 2, 3]  # pair 3 once


def test_cli_bad_out_device_and_non_finite_settings_fail_before_any_model(tmp_path, caplog):
    from ip2p.datagen import cli
    from ip2p.datagen.config import FinetuneConfig, ImageConfig

    for make in (lambda: ImageConfig(cfg_min=math.nan, cfg_max=math.nan), lambda: TextConfig(temperature=math.nan),
                 lambda: FinetuneConfig(lr=math.nan), lambda: FilterConfig(min_dir_sim=math.nan)):
        with pytest.raises(ValueError, match="must be a finite number"):
            make()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    missing = str(tmp_path / "no-model")  # never reached: the checks come first
    cases = [
        # save_pretrained only warns about a file: the fine-tuned model used to be lost after training.
        (["finetune-lm", "--model", missing, "--out", str(a_file)], "--out '" + str(a_file) + "' is a file"),
        (["finetune-lm", "--model", missing, "--out", str(tmp_path / "o"), "--device", "banana"],
         "--device 'banana' is not a device name"),
        # A device this machine lacks (moving a loaded model there raised a traceback).
        (["text", "--model", missing, "--captions", str(a_file), "--out", str(tmp_path / "p.jsonl"), "--device",
          "cuda:7"], "--device cuda:7: PyTorch sees"),
        (["text", "--model", missing, "--captions", str(a_file), "--out", str(a_file / "p.jsonl")],
         "the folder of --out"),
        (["filter", "--in", str(tmp_path), "--out", str(a_file)], "is a file"),
        (["finetune-lm", "--model", missing, "--out", str(tmp_path / "o"), "--max-length", "-5"],
         "max_length=-5 must be at least 1"),
        # 0 is a multiple of every downsampling factor: it used to reach the UNet (a negative size, torch.randn).
        (["images", "--model", missing, "--prompts", str(a_file), "--out", str(tmp_path / "d"), "--height", "0"],
         "image size 0x512 must be positive"),
        (["images", "--model", missing, "--prompts", str(a_file), "--out", str(tmp_path / "d"), "--width", "-8"],
         "image size 512x-8 must be positive"),
    ]
    for argv, message in cases:
        caplog.clear()
        assert cli.main(argv) == 2, argv
        assert message in caplog.text, (argv, caplog.text)
    assert a_file.read_text() == "keep me"


def test_no_filter_says_which_filter_flags_it_does_not_apply(caplog):
    from ip2p.datagen.cli import _filter_config, build_parser

    common = ["images", "--model", "tiny", "--prompts", "p.jsonl", "--out", "o", "--no-filter"]
    assert _filter_config(build_parser().parse_args(common)) is None
    assert "--no-filter keeps every sample" not in caplog.text
    assert _filter_config(build_parser().parse_args([*common, "--keep-top", "2", "--min-dir-sim", "0.3"])) is None
    assert "--no-filter keeps every sample: --min-dir-sim, --keep-top not applied now" in caplog.text
