"""Data generation: resume after SIGKILL with no duplicate and no lost pair; two processes share the work."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from test_datagen_support import (  # noqa: F401 (one_thread: an autouse fixture)
    REPO,
    one_thread,
    small,
    subprocess_env,
    write_prompts,
)

from ip2p.datagen import cli
from ip2p.datagen.images import sample_seeds

SMALL = small()


def _run_subprocess(args, env_extra=None):
    return subprocess.Popen([sys.executable, "-m", "ip2p.datagen", *args], cwd=REPO,
                            env=subprocess_env(**(env_extra or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(path, columns=["pair_id", "seed", "edit_prompt"]).to_pylist()
    return rows


# -- resume --------------------------------------------------------------------------------------------
def test_two_processes_one_killed_and_resumed_cover_every_pair_exactly_once(tmp_path):
    """Shard 0 runs in its own process (rank from RANK/WORLD_SIZE, as accelerate/torchrun set them) and is SIGKILLed
    mid-run; shard 1 runs here meanwhile (rank from the flags); then shard 0 is resumed. Every pair must end up in the
    dataset exactly once, with the seeds an uninterrupted run would have used."""
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    n_pairs = 16
    write_prompts(prompts, n_pairs)
    args = ["images", "--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--no-filter",
            "--samples-per-pair", "2", "--batch-size", "2", "--rows-per-file", "3", "--format", "both", *SMALL]
    manifest = out / "_progress" / "00000-of-00002.json"
    process = _run_subprocess(args, {"RANK": "0", "WORLD_SIZE": "2"})
    results = []
    shard_1 = threading.Thread(target=lambda: results.append(cli.main([*args, "--num-shards", "2",
                                                                        "--shard-index", "1"])))
    shard_1.start()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            if manifest.is_file() and json.loads(manifest.read_text())["done"]:
                break
            time.sleep(0.02)
        assert process.poll() is None, process.stdout.read()  # still running: the kill lands mid-run
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        shard_1.join(timeout=180)
    assert results == [0]
    done_at_kill = json.loads(manifest.read_text())["done"]
    assert 0 < len(done_at_kill) < n_pairs // 2
    assert cli.main([*args, "--num-shards", "2", "--shard-index", "0"]) == 0  # resume shard 0

    rows = _rows(out)
    keys = [(r["pair_id"], r["seed"]) for r in rows]
    expected = {(i, seed) for i in range(n_pairs) for seed in sample_seeds(0, i, 2)}
    assert len(keys) == len(set(keys)) == 2 * n_pairs and set(keys) == expected  # no duplicate, no lost pair
    for rank in range(2):
        table = pq.read_table(sorted((out / "data").glob(f"train-{rank:05d}-of-00002-*.parquet")))
        assert set(table.column("pair_id").to_pylist()) == set(range(rank, n_pairs, 2))
        assert sorted(json.loads((out / "_progress" / f"{rank:05d}-of-00002.json").read_text())["done"]) == list(
            range(rank, n_pairs, 2))
    assert not [p for p in (out / "data").iterdir() if not p.name.endswith(".parquet")]  # no temp files left
    seeds = json.loads((out / "seeds.json").read_text())
    assert seeds == [[f"{i:07d}", sample_seeds(0, i, 2)] for i in range(n_pairs)]
    assert all(json.loads((out / folder / "prompt.json").read_text())["edit"] == f"make it {int(folder)}"
               for folder, _ in seeds)
