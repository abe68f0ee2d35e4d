"""Data generation under SIGKILL and bad input: a kill never corrupts what is written, bad input gets one clear line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ip2p import tiny

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--height", "16", "--width", "16", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two cores are shared with other jobs; more threads than cores makes tiny models orders of magnitude slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _datagen(args: list[str], *, kill_in: str | None = None) -> subprocess.CompletedProcess:
    """``python -m ip2p.datagen ARGS`` in a fresh process; ``kill_in="module.Class.method"`` SIGKILLs the process
    the first time that method is called (a kill at an exact point, without timing)."""
    code = "import sys\n"
    if kill_in:
        module, owner, method = kill_in.rsplit(".", 2)
        code += (f"import os, signal, importlib\nowner = getattr(importlib.import_module({module!r}), {owner!r})\n"
                 f"setattr(owner, {method!r}, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))\n")
    code += "from ip2p.datagen.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


# -- finetune-lm -------------------------------------------------------------------------------------------------------
def test_finetune_killed_while_saving_over_a_fine_tune_keeps_the_old_one_and_a_rerun_replaces_it(tmp_path):
    base = tiny.save_tiny_causal_lm(tmp_path / "lm")
    out = tmp_path / "lm-ft"
    args = ["finetune-lm", "--model", str(base), "--out", str(out), "--epochs", "1", "--batch-size", "8", "--quiet"]
    assert _datagen([*args, "--lr", "1e-3"]).returncode == 0
    first = _state(out)
    # Killed after the weights are written, before the tokenizer: the old fine-tune used to be half overwritten.
    killed = _datagen([*args, "--lr", "3e-2"], kill_in="transformers.PreTrainedTokenizerBase.save_pretrained")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    kept = _state(out)
    assert all(torch.equal(kept[key], first[key]) for key in first)
    assert (out / "tokenizer_config.json").is_file()
    assert _datagen([*args, "--lr", "3e-2"]).returncode == 0
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
