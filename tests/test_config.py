"""Config loading: YAML, key=value overrides, strict keys and types, round trips."""

import re
from pathlib import Path

import pytest

from ip2p import config as cfgmod
from ip2p.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.01 and cfg.train.lr_schedule == "constant"
    assert cfg.train.condition_dropout == 0.05 and cfg.train.ema_decay == 0.9999
    assert cfg.data.resolution == 256 and cfg.data.random_resize == [256, 288]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: runs/a\ntrain:\n  max_steps: 5\n  lr: 0.001\ndata:\n  path: x\n")
    cfg = load_config(path, ["train.max_steps=7", "output_dir=runs/b", "trackers=[]", "train.lr=2e-5",
                             "model.prediction_type=v_prediction", "resume=null", "train.mixed_precision=no"])
    assert cfg.train.max_steps == 7 and cfg.output_dir == "runs/b" and cfg.trackers == []
    assert cfg.train.lr == pytest.approx(2e-5) and isinstance(cfg.train.lr, float)
    assert cfg.data.path == "x" and cfg.model.prediction_type == "v_prediction" and cfg.resume is None
    assert cfg.train.mixed_precision == "no"  # YAML 1.1 reads a bare no as false


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "did you mean 'max_steps'"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.max_steps=abc", "train.max_steps='abc': expected an integer"),
    ("train.ema=maybe", "expected true or false"),
    ("train.mixed_precision=fp8", "choose one of no, fp16, bf16"),
    ("data.cache=all", "choose one of none, text, text+latents"),
    ("trackers=[mlflow]", "mlflow"),
    ("train.condition_dropout=0.5", "condition_dropout"),
    ("data.random_resize=[300,280]", "random_resize"),
    ("train", "key=value"),
    ("validation.every=5", "validation.images is empty"),
    # Values the loop would divide by, negate the loss with, or hand to numpy/torch as an unnamed error.
    ("train.log_every=0", "train.log_every=0 must be at least 1"),
    ("train.snr_gamma=-1", "train.snr_gamma=-1.0 must be at least 0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every=-1 must be at least 0"),
    ("train.checkpoints_total_limit=-2", "train.checkpoints_total_limit=-2 must be at least 0"),
    ("train.lr_warmup_steps=-1", "train.lr_warmup_steps=-1 must be at least 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 must be at least 0"),
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("validation.text_guidance=inf", "validation.text_guidance=inf must be a finite number"),
    ("train.adam_beta1=1.5", "train.adam_beta1=1.5 must be in [0, 1)"),
    ("train.adam_eps=0", "train.adam_eps=0.0 must be positive"),
    ("seed=-1", "seed=-1 must be in [0, 2**32 - 1]"),
    ("data.resolution=4", "data.resolution=4 must be at least 8"),
    ("data.resolution=250", "data.resolution=250 must be a multiple of 8 (the VAE's downsampling), e.g. 248 or 256"),
    ("validation.steps=0", "validation.steps=0 must be at least 1"),
    ("output_dir=", "output_dir is empty"),
])
def test_bad_keys_and_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    section = tmp_path / "section.yaml"
    section.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(section)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=11", "data.path=some/where", "validation.every=2",
                             "validation.images=[a.png]", "validation.instructions=[make it red]"])
    cfgmod.save(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert cfgmod.from_dict(cfgmod.to_dict(cfg)) == cfg


def test_reference_documents_every_key():
    rows = cfgmod.reference()
    keys = {k for k, _, _ in rows}
    for required in ("output_dir", "seed", "model.pretrained", "data.path", "train.max_steps", "train.batch_size",
                     "train.checkpoint_every", "resume"):
        assert required in keys
    assert all(doc for key, _, doc in rows if key in ("data.path", "train.batch_size", "resume"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.max_steps >= 1


def test_configs_readme_documents_every_key():
    readme = (Path(__file__).resolve().parent.parent / "configs" / "README.md").read_text()
    missing = [key for key, _, _ in cfgmod.reference() if f"`{key}`" not in readme]
    assert not missing, f"configs/README.md lacks {missing}; regenerate its table from ip2p.config.reference()"


def test_unreadable_config_paths_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path))} is a folder, not a YAML file"):
        load_config(tmp_path)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(binary))} is not UTF-8 text"):
        load_config(binary)


def test_a_key_given_twice_in_the_yaml_file_is_an_error(tmp_path):
    # PyYAML keeps the last of two equal keys: a second `train:` section would silently drop the first one.
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  max_steps: 5\ndata:\n  path: x\ntrain:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice .*lines 1 and 5"):
        load_config(path)
    path.write_text("train:\n  lr: 1.0e-3\n  max_steps: 5\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice"):
        load_config(path)


def test_a_yaml_path_given_without_config_flag_says_so():
    with pytest.raises(ConfigError, match=r"--config configs/tiny.yaml"):
        load_config(None, ["configs/tiny.yaml"])


def test_train_without_a_dataset_fails_before_loading_the_base_model(monkeypatch, caplog):
    # `python train.py` with no --config used to download (or, offline, fail to find) Stable Diffusion before it
    # noticed that data.path was empty.
    import train
    from ip2p import training

    def never(cfg):
        raise AssertionError("train() must not start without a dataset")

    monkeypatch.setattr(training, "train", never)
    assert train.main([]) == 2
    assert "data.path is empty: pass --config configs/<name>.yaml" in caplog.text
    assert train.main(["data.path= "]) == 2


def test_paths_starting_with_a_tilde_are_expanded(tmp_path, monkeypatch):
    # YAML values and quoted overrides reach the config unexpanded; "~/runs" must not become a folder named "~".
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["output_dir=~/runs/x", "model.pretrained=~/models/sd", "resume=~/runs/x/ck",
                             "data.path=~/data", "validation.images=[~/a.png]", "validation.instructions=[x]"])
    assert cfg.output_dir == str(tmp_path / "runs/x") and cfg.resume == str(tmp_path / "runs/x/ck")
    assert cfg.model.pretrained == str(tmp_path / "models/sd") and cfg.data.path == str(tmp_path / "data")
    assert cfg.validation.images == [str(tmp_path / "a.png")]
    assert load_config(None, ["resume=latest"]).resume == "latest"
