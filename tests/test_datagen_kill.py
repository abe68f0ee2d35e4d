"""Data generation under SIGKILL and bad input: a kill never corrupts what is written, bad input gets one clear line."""

import errno
import importlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_datagen_support import (  # noqa: F401 (one_thread: an autouse fixture)
    REPO,
    one_thread,
    small,
    subprocess_env,
    write_prompts,
)

from ip2p import tiny

SMALL = small(steps=2)


def _datagen(args: list[str], *, kill_at: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """``python -m ip2p.datagen ARGS`` in a fresh process; ``kill_at=("module.name", n)`` (or ``module.Class.name``)
    SIGKILLs the process at the n-th call of that function, earlier calls running as usual: a kill at an exact point,
    without timing."""
    code = "import sys\n"
    if kill_at:
        dotted, n = kill_at
        code += f"""
import importlib, os, signal
module, name = {dotted!r}.rsplit(".", 1)
try:
    owner = importlib.import_module(module)
except ImportError:
    module, cls = module.rsplit(".", 1)
    owner = getattr(importlib.import_module(module), cls)
original, calls = getattr(owner, name), []
def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, killing)
"""
    code += "from ip2p.datagen.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, check=False, timeout=300)


def _killed(args: list[str], at: str, n: int = 1) -> None:
    result = _datagen(args, kill_at=(at, n))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def _ok(args: list[str]) -> None:
    result = _datagen(args)
    assert result.returncode == 0, result.stderr[-2000:]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


# -- finetune-lm -------------------------------------------------------------------------------------------------------
def test_finetune_killed_while_saving_over_a_fine_tune_keeps_the_old_one_and_a_rerun_replaces_it(tmp_path):
    base = tiny.save_tiny_causal_lm(tmp_path / "lm")
    out = tmp_path / "lm-ft"
    args = ["finetune-lm", "--model", str(base), "--out", str(out), "--epochs", "1", "--batch-size", "8", "--quiet"]
    _ok([*args, "--lr", "1e-3"])
    first = _state(out)
    # Killed after the weights are written, before the tokenizer: the old fine-tune used to be half overwritten.
    _killed([*args, "--lr", "3e-2"], "transformers.PreTrainedTokenizerBase.save_pretrained")
    kept = _state(out)
    assert all(torch.equal(kept[key], first[key]) for key in first)
    assert (out / "tokenizer_config.json").is_file()
    _ok([*args, "--lr", "3e-2"])
    second = _state(out)
    assert any(not torch.equal(second[key], first[key]) for key in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "lm-ft"]  # the killed run's folder is gone


def test_finetune_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path, caplog):
    from ip2p.datagen import cli

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["finetune-lm", "--model", str(tmp_path / "no-model"), "--out", str(out), "--quiet"]) == 2
    assert "is a folder with other files and no config.json" in caplog.text
    assert (out / "notes.txt").read_text() == "keep me"


# -- text --------------------------------------------------------------------------------------------------------------
TRIPLES = [("a red car", "make it blue", "a blue car"), ("a dog on grass", "add snow", "a dog on snow"),
           ("a house", "make it night", "a house at night")]


@pytest.fixture(scope="module")
def tuned_lm(tmp_path_factory) -> Path:
    """A tiny LM that has memorised TRIPLES, so the text stage keeps its captions (~2 s)."""
    from ip2p.datagen import cli

    folder = tmp_path_factory.mktemp("lm")
    triples = folder / "triples.jsonl"
    triples.write_text("".join(json.dumps({"input": a, "edit": b, "output": c}) + "\n" for a, b, c in TRIPLES))
    base = tiny.save_tiny_causal_lm(folder / "base")
    assert cli.main(["finetune-lm", "--model", str(base), "--triples", str(triples), "--out", str(folder / "tuned"),
                     "--lr", "3e-3", "--epochs", "150", "--batch-size", "3", "--quiet"]) == 0
    return folder / "tuned"


def test_text_stage_killed_before_or_after_a_commit_resumes_to_the_uninterrupted_output(tmp_path, tuned_lm):
    from ip2p.datagen import cli

    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\na dog on grass\na house\n")
    args = ["text", "--model", str(tuned_lm), "--captions", str(captions), "--batch-size", "1", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "whole.jsonl")]) == 0
    whole = (tmp_path / "whole.jsonl").read_text()
    assert len(whole.splitlines()) == 3
    # Kills at the first two progress writes: one of them falls after the first line is appended and flushed but
    # before it is committed, which used to leave an output without a progress file that every rerun refused.
    for n in (1, 2):
        out = tmp_path / f"killed-{n}.jsonl"
        _killed([*args, "--out", str(out)], "ip2p.atomic.write_json", n)
        assert cli.main([*args, "--out", str(out)]) == 0
        assert out.read_text() == whole


def test_text_rerun_with_other_settings_is_refused_before_the_lm_loads(tmp_path, tuned_lm, caplog):
    from ip2p.datagen import cli

    captions, same_length = tmp_path / "captions.txt", tmp_path / "others.txt"
    captions.write_text("a red car\na dog on grass\na house\n")
    same_length.write_text("a blue car\na cat on grass\na barn\n")
    out = tmp_path / "prompts.jsonl"
    args = ["text", "--model", str(tuned_lm), "--captions", str(captions), "--out", str(out), "--batch-size", "1"]
    assert cli.main([*args, "--quiet"]) == 0
    whole = out.read_text()
    fix = "rerun with the ones it was written with, or pass another --out"
    _fails([*args, "--temperature", "0.9"], "(temperature: 0.7 -> 0.9); " + fix, caplog)
    _fails([*args, "--num-retries", "1", "--repetition-penalty", "1.2"],
           "repetition_penalty: 1.0 -> 1.2; num_retries: 3 -> 1", caplog)
    _fails([*args[:4], str(same_length), *args[5:]], f"captions: those of {str(same_length)!r} are not those of",
           caplog)
    _fails(["text", "--model", str(tmp_path / "no-model"), *args[3:]], "model: ", caplog)  # refused, not loaded
    # --device, --dtype and --quiet decide nothing recorded: the finished file is kept as it is.
    assert cli.main([*args, "--device", "cpu", "--dtype", "float32"]) == 0
    assert out.read_text() == whole


# -- bad input ---------------------------------------------------------------------------------------------------------
def _fails(argv: list[str], message: str, caplog) -> None:
    """``argv`` exits with status 2 and one error line containing ``message``, and no traceback."""
    from ip2p.datagen import cli

    caplog.clear()
    assert cli.main(argv) == 2, argv
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (argv, errors)


def test_empty_caption_and_prompt_files_are_errors_not_empty_datasets(tmp_path, caplog):
    from ip2p.datagen import cli

    empty_txt, empty_jsonl = tmp_path / "captions.txt", tmp_path / "prompts.jsonl"
    empty_txt.write_text("\n  \n")
    empty_jsonl.write_text("")
    no_model = str(tmp_path / "no-model")  # never loaded: the inputs are read first
    _fails(["text", "--model", no_model, "--captions", str(empty_txt), "--out", str(tmp_path / "p.jsonl")],
           "captions.txt' has no captions; expected one caption a line", caplog)
    _fails(["run", "--lm", no_model, "--captions", str(empty_txt), "--sd-model", "tiny", "--no-filter",
            "--out", str(tmp_path / "run")], "has no captions", caplog)
    _fails(["images", "--model", "tiny", "--prompts", str(empty_jsonl), "--no-filter", "--out", str(tmp_path / "o"),
            *SMALL], "no caption pairs in " + str(empty_jsonl), caplog)
    assert not (tmp_path / "o" / "data").exists()

    # An LM that keeps no caption: `run` says so instead of writing an empty dataset; a shard without captions is fine.
    lm = tiny.save_tiny_causal_lm(tmp_path / "random-lm")
    captions = tmp_path / "one.txt"
    captions.write_text("a red car\n")
    run = ["run", "--lm", str(lm), "--captions", str(captions), "--sd-model", "tiny", "--no-filter",
           "--max-new-tokens", "3", "--num-retries", "0", *SMALL]
    _fails([*run, "--out", str(tmp_path / "r1")], "the text stage kept none of 1 captions", caplog)
    assert cli.main([*run, "--out", str(tmp_path / "r2"), "--num-shards", "2", "--shard-index", "1"]) == 0


def test_caption_files_not_in_utf8_are_named_and_split_at_line_ends_only(tmp_path, caplog):
    from ip2p.datagen.text import read_captions

    latin = tmp_path / "latin.txt"
    latin.write_bytes("a café\n".encode() + "un café\n".encode("latin-1"))
    for name in ("prompts.jsonl", "triples.jsonl", "safety.txt"):
        (tmp_path / name).write_bytes(latin.read_bytes())
    (tmp_path / "good.txt").write_text("a red car\n")
    no_model = str(tmp_path / "no-model")
    fix = "latin.txt' is not UTF-8 text (invalid continuation byte); convert it, e.g. with iconv"
    _fails(["text", "--model", no_model, "--captions", str(latin), "--out", str(tmp_path / "p.jsonl")], fix, caplog)
    _fails(["text", "--model", no_model, "--captions", str(tmp_path / "good.txt"), "--safety-words",
            str(tmp_path / "safety.txt"), "--out", str(tmp_path / "p.jsonl")], "safety.txt' is not UTF-8", caplog)
    _fails(["images", "--model", "tiny", "--prompts", str(tmp_path / "prompts.jsonl"), "--no-filter",
            "--out", str(tmp_path / "o"), *SMALL], "prompts.jsonl' is not UTF-8", caplog)
    _fails(["finetune-lm", "--model", no_model, "--triples", str(tmp_path / "triples.jsonl"), "--out",
            str(tmp_path / "ft")], "triples.jsonl' is not UTF-8", caplog)
    # U+2028 and U+0085 are not line ends of a caption file (str.splitlines split a caption in two there).
    odd = tmp_path / "odd.txt"
    odd.write_text("a red car\u2028at night\na dog\u0085on grass\r\nA house\n", encoding="utf-8")
    assert read_captions(odd) == ["a red car\u2028at night", "a dog\u0085on grass", "A house"]


def test_text_out_that_is_a_folder_is_named_as_such(tmp_path, caplog):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\n")
    _fails(["text", "--model", str(tmp_path / "no-model"), "--captions", str(captions), "--out", str(tmp_path)],
           f"--out {str(tmp_path)!r} is a folder; pass the JSON-lines file to write", caplog)


def test_a_model_folder_that_is_not_a_causal_lm_is_one_line(tmp_path, caplog):
    # transformers raises multi-line ValueErrors for these (an empty folder's tokenizer, a CLIP config)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\n")
    (tmp_path / "empty").mkdir()
    clip = tiny.save_tiny_clip(tmp_path / "clip")
    for model in (tmp_path / "empty", clip):
        _fails(["text", "--model", str(model), "--captions", str(captions), "--out", str(tmp_path / "p.jsonl")],
               f"language model {str(model)!r} could not be loaded (ValueError); pass a folder with a causal LM",
               caplog)
        _fails(["finetune-lm", "--model", str(model), "--out", str(tmp_path / "tuned")],
               f"--model {str(model)!r} could not be loaded (ValueError); pass a causal LM folder", caplog)


def test_filter_of_a_folder_that_is_not_an_images_stage_output_names_the_missing_columns(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"original_prompt": ["a"], "edit_prompt": ["b"]}), tmp_path / "hub" / "data" / "a.parquet")
    _fails(["filter", "--in", str(tmp_path / "hub"), "--out", str(tmp_path / "out"), "--quiet"],
           "a.parquet lacks the columns input_image, edited_image, input_prompt", caplog)


def test_a_broken_manifest_or_progress_file_is_named_with_the_fix(tmp_path):
    from ip2p.datagen.text import Completion, run_text_stage
    from ip2p.datagen.writer import DatasetWriter

    (tmp_path / "ds" / "_progress").mkdir(parents=True)
    (tmp_path / "ds" / "_progress" / "00000-of-00001.json").write_text("")  # e.g. a disk that failed
    with pytest.raises(ValueError, match=r"00000-of-00001.json is not valid JSON .*; restore it or delete it"):
        DatasetWriter(tmp_path / "ds")
    out = tmp_path / "prompts.jsonl"
    out.write_text("")
    (tmp_path / "prompts.jsonl.progress.json").write_text('{"done": 1')
    with pytest.raises(ValueError, match=r"progress.json is not valid JSON .*; restore it, or delete it and prompts"):
        run_text_stage(["a red car"], out, lambda prompts, seed: [Completion("x")] * len(prompts), progress=False)


# -- images ------------------------------------------------------------------------------------------------------------
def _dataset(out: Path) -> tuple[list[tuple], dict[str, bytes]]:
    """The parquet rows (sorted) and every other file of a dataset folder but its manifests, for comparisons."""
    import pyarrow.parquet as pq

    def value(v):  # image bytes; NaN (unscored) made comparable
        return v["bytes"] if isinstance(v, dict) else "nan" if isinstance(v, float) and math.isnan(v) else v

    rows = sorted(tuple((k, value(v)) for k, v in row.items()) for row in pq.read_table(out / "data").to_pylist())
    files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and p.relative_to(out).parts[0] not in ("data", "_progress")}
    return rows, files


@pytest.fixture(scope="module")
def images_run(tmp_path_factory) -> tuple[list[str], tuple]:
    """An images command without --out (3 pairs, 1 sample each, a commit per pair, both layouts) and the dataset it
    writes when nothing goes wrong (:func:`_dataset`)."""
    from ip2p.datagen import cli

    folder = tmp_path_factory.mktemp("images")
    write_prompts(folder / "prompts.jsonl", 3)
    args = ["images", "--model", "tiny", "--prompts", str(folder / "prompts.jsonl"), "--no-filter",
            "--samples-per-pair", "1", "--rows-per-file", "1", "--format", "both", *SMALL]
    assert cli.main([*args, "--out", str(folder / "whole")]) == 0
    whole = _dataset(folder / "whole")
    assert len(whole[0]) == 3 and len(json.loads(whole[1]["seeds.json"])) == 3
    return args, whole


def test_images_killed_at_each_commit_step_resume_to_the_uninterrupted_dataset(tmp_path, images_run):
    from ip2p.data import open_records
    from ip2p.datagen import cli

    args, whole = images_run
    kills = [("ip2p.atomic.fsync_file", 3),  # the second parquet file written to its temporary name, not renamed
             ("ip2p.atomic.write_json", 2),  # the second parquet file in place, the manifest not yet updated
             ("ip2p.datagen.writer._jpeg", 4)]  # in the middle of the second pair's seeds-layout folder
    for at, n in kills:
        out = tmp_path / f"{at}-{n}"
        _killed([*args, "--out", str(out)], at, n)
        assert cli.main([*args, "--out", str(out)]) == 0
        assert _dataset(out) == whole, at
        assert not [p for p in (out / "data").iterdir() if not p.name.endswith(".parquet")]  # no temporary file
        assert open_records(out / "data", cache_dir=tmp_path / "cache").count() == 3  # what train.py reads


def test_images_resumed_from_other_prompts_is_refused_before_the_model_loads_and_a_grown_file_resumes(
        tmp_path, images_run, caplog, monkeypatch):
    import shutil

    from ip2p.datagen import cli, images

    args, whole = images_run
    prompts = Path(args[args.index("--prompts") + 1])
    out = tmp_path / "out"
    shutil.copytree(prompts.parent / "whole", out)
    lines = prompts.read_text().splitlines()
    edited = tmp_path / "edited.jsonl"  # pair 1 now says something else: resuming would mix two caption sets
    edited.write_text("\n".join([lines[0], lines[1].replace("thing 1", "thing one"), *lines[2:]]) + "\n")
    grown = tmp_path / "grown.jsonl"
    write_prompts(grown, 4)
    argv = [*args, "--out", str(out)]
    argv[argv.index("--prompts") + 1] = str(edited)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patch:
        patch.setattr(images.PairSampler, "from_pretrained", no_model)
        _fails(argv, f"{out} already holds pair id 1 made from other captions or another instruction than 'a photo "
               "of thing one'", caplog)
        assert "resume with the prompts file this folder was made from" in caplog.text
    assert _dataset(out) == whole  # untouched
    argv[argv.index("--prompts") + 1] = str(grown)
    assert cli.main(argv) == 0
    rows, _ = _dataset(out)  # the three pairs kept as they were, the fourth added
    assert len(rows) == 4 and all(row in rows for row in whole[0])


# -- a full disk, a read-only folder -------------------------------------------------------------------------------
def _failing_writes(monkeypatch, after: int, code: int = errno.ENOSPC) -> None:
    """Every flush to disk of ``ip2p.atomic`` (the last step of each file it writes) after the first ``after`` raises
    OSError(``code``), as on a disk that fills up (ENOSPC) or a folder that turns read-only (EROFS); root ignores
    file modes, so chmod cannot make one here."""
    atomic = importlib.import_module("ip2p.atomic")
    original, calls = atomic.fsync_file, []

    def fsync_file(path):
        calls.append(path)
        if len(calls) > after:
            raise OSError(code, os.strerror(code))
        return original(path)

    monkeypatch.setattr(atomic, "fsync_file", fsync_file)


def test_text_and_run_on_a_full_disk_stop_with_one_line_and_resume_from_the_last_commit(tmp_path, tuned_lm,
                                                                                         monkeypatch, caplog):
    from ip2p.datagen import cli

    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\na dog on grass\na house\n")
    args = ["text", "--model", str(tuned_lm), "--captions", str(captions), "--batch-size", "1", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "whole.jsonl")]) == 0
    out = tmp_path / "prompts.jsonl"
    _failing_writes(monkeypatch, after=2)  # the progress file at the start and the first batch's commit
    _fails([*args, "--out", str(out)], f"cannot write {str(out)!r} (No space left on device); free space on its disk "
           "and rerun the same command: it continues from the last commit", caplog)
    assert json.loads((tmp_path / "prompts.jsonl.progress.json").read_text())["done"] == 1  # the first commit kept
    run = ["run", "--lm", str(tuned_lm), "--captions", str(captions), "--sd-model", "tiny", "--no-filter",
           "--out", str(tmp_path / "run"), *SMALL]
    _fails(run, f"cannot write {str(tmp_path / 'run' / 'prompts.jsonl')!r} (No space left on device)", caplog)
    monkeypatch.undo()
    assert cli.main([*args, "--out", str(out)]) == 0
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_images_and_filter_on_a_full_disk_or_read_only_folder_stop_with_one_line_and_resume(tmp_path, images_run,
                                                                                           monkeypatch, caplog):
    from ip2p.datagen import cli
    from ip2p.datagen.writer import DatasetWriter

    args, whole = images_run
    out = tmp_path / "out"
    _failing_writes(monkeypatch, after=2)  # the first pair's parquet file and manifest
    second = out / "data" / "train-00000-of-00001-00001.parquet"
    _fails([*args, "--out", str(out)], f"cannot write {str(second)!r} (No space left on device); free space", caplog)
    assert json.loads((out / "_progress" / "00000-of-00001.json").read_text())["done"] == [0]
    monkeypatch.undo()
    _failing_writes(monkeypatch, after=0, code=errno.EROFS)
    _fails([*args, "--out", str(out)], "(Read-only file system); make its folder writable and rerun the same "
           "command", caplog)
    monkeypatch.undo()
    assert cli.main([*args, "--out", str(out)]) == 0
    assert _dataset(out) == whole

    # filter writes with the same writer; its input needs scores (or a CLIP model) to be filtered.
    scored = tmp_path / "scored"
    writer = DatasetWriter(scored)
    for pair, samples in _scored_pairs(out):
        writer.add_pair(pair, samples, tried=len(samples))
    writer.close()
    kept = tmp_path / "kept"
    _failing_writes(monkeypatch, after=0)
    _fails(["filter", "--in", str(scored), "--out", str(kept), "--quiet"],
           f"cannot write {str(kept / 'data' / 'train-00000-of-00001-00000.parquet')!r} (No space left", caplog)
    monkeypatch.undo()
    assert cli.main(["filter", "--in", str(scored), "--out", str(kept), "--quiet"]) == 0


def _scored_pairs(dataset: Path):
    """The pairs and samples of a parquet dataset, every sample given passing CLIP scores."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from ip2p.datagen.writer import Pair, Sample

    pairs = {}
    for row in pq.read_table(dataset / "data").to_pylist():
        pair = Pair(row["pair_id"], row["input_prompt"], row["edit_prompt"], row["edited_prompt"])
        images = [np.asarray(Image.open(io.BytesIO(row[k]["bytes"])).convert("RGB"))
                  for k in ("input_image", "edited_image")]
        pairs.setdefault(pair, []).append(Sample(pair, row["seed"], row["p2p_threshold"], row["cfg_scale"], *images,
                                                 dict.fromkeys(("clip_sim_0", "clip_sim_1", "clip_sim_dir",
                                                                "clip_sim_image"), 0.9)))
    return pairs.items()


def test_finetune_on_a_full_disk_keeps_the_previous_model_and_says_so(tmp_path, monkeypatch, caplog):
    from ip2p.datagen import cli

    base = tiny.save_tiny_causal_lm(tmp_path / "lm")
    out = tmp_path / "lm-ft"
    args = ["finetune-lm", "--model", str(base), "--out", str(out), "--epochs", "1", "--batch-size", "8", "--quiet"]
    assert cli.main(args) == 0  # a model already there
    before = _state(out)
    _failing_writes(monkeypatch, after=0)
    _fails([*args, "--lr", "3e-2"], f"cannot write {str(out)!r} (No space left on device); free space on its disk "
           "and rerun it (a model already there is kept as it was)", caplog)
    after = _state(out)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "lm-ft"]  # no half-written folder left
