"""The built-in edit task end to end (`python -m ip2p.demo --quick`) and its base model (ip2p.base)."""
import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from ip2p import base, demo, scene_clip
from ip2p.config import load_config
from ip2p.inference import resolve_device


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert demo.main(["--quick", "--output", str(out)]) == 0
    return out


def test_quick_demo_writes_every_output(quick_run):
    for name in ("final", "final.safetensors", "grid.png", "metrics.json", "sweep.png", "sweep.csv", "sweep.json",
                 "data/params.json", "base/model_index.json", "inputs/0.png"):
        assert (quick_run / name).exists(), name
    assert (quick_run / "grid.png").read_bytes()[:4] == b"\x89PNG"
    # The model is an ordinary InstructPix2Pix folder that diffusers loads.
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(quick_run / "final")
    assert pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels
    # Trained for x0 on a zero-terminal-SNR schedule: the export carries both, with a sampler that can step them.
    assert pipe.scheduler.config.prediction_type == "sample" and pipe.scheduler.config.rescale_betas_zero_snr
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_quick_demo_logs_an_infer_command_that_edits_a_held_out_input(quick_run):
    import shlex

    from PIL import Image

    import infer

    metrics = json.loads((quick_run / "metrics.json").read_text())
    args = shlex.split(metrics["infer_command"])
    assert args[1].endswith("infer.py") and args[args.index("--resolution") + 1] == "0"
    assert sorted(p.name for p in (quick_run / "inputs").iterdir())[0] == "0.png"
    assert infer.main(args[2:] + ["--quiet"]) == 0
    edited = Image.open(quick_run / "my_edit.png")
    assert edited.size == Image.open(quick_run / "inputs" / "0.png").size == (64, 64)
    # The browser page with the same settings as defaults.
    from ip2p import webui

    args = shlex.split(metrics["webui_command"])
    assert args[1:3] == ["-m", "ip2p.webui"]
    parsed = webui.build_parser().parse_args(args[3:])
    assert parsed.checkpoint == str(quick_run / "final") and parsed.resolution == 0
    assert (parsed.steps, parsed.scheduler) == (metrics["settings"]["steps"], metrics["settings"]["scheduler"])
    assert parsed.text_guidance == metrics["settings"]["text_guidance"]


def test_quick_demo_metrics_structure(quick_run):
    metrics = json.loads((quick_run / "metrics.json").read_text())
    for split in ("heldout_combinations", "heldout_phrasings"):
        m = metrics[split]
        assert 0.0 <= m["success"] <= 1.0 and 0.0 <= m["strict_success"] <= 1.0
        assert set(m["by_type"]) == {"recolour_object", "recolour_background", "remove_object", "add_object",
                                     "move_object", "change_shape"}
        assert all({"success", "strict_success", "n"} <= set(v) for v in m["by_type"].values())
        assert m["n"] == demo.DEMOS["quick"].n_test
    assert metrics["wall_seconds"] > 0
    assert all(0.0 <= metrics[split]["objects_kept"] <= 1.0 for split in ("heldout_combinations", "heldout_phrasings"))
    assert "objects kept" in demo._summary_line(metrics)
    assert metrics["settings"]["scheduler"] == "euler"  # the default sampler for an x0 model
    assert metrics["settings"]["device"] == str(resolve_device("auto"))  # where --device auto evaluated
    assert set(metrics["timings"]) == {"data", "base", "train", "evaluate", "grid", "sweep"}
    assert metrics["base"]["vae"]["psnr"] > 30  # the shipped VAE's held-out reconstruction quality
    quick_cfg = load_config(demo.CONFIGS / "demo-quick.yaml")
    assert metrics["training"]["max_steps"] == metrics["training"]["steps"] == quick_cfg.train.max_steps
    assert metrics["training"]["samples"] == quick_cfg.train.max_steps * quick_cfg.train.batch_size
    sweep = json.loads((quick_run / "sweep.json").read_text())
    quick = demo.DEMOS["quick"]
    assert len(sweep) == len(quick.image_scales) + len(quick.text_scales)


def test_summary_line_says_when_training_stopped_at_the_time_budget(quick_run):
    metrics = json.loads((quick_run / "metrics.json").read_text())
    assert "trained" not in demo._summary_line(metrics)  # the quick run reaches max_steps
    # On a busy 2-core machine the full demo stopped at step 91 of 400; its summary line did not say so.
    metrics["training"].update(steps=91, max_steps=400, max_minutes=10.5)
    assert "; trained 91 of 400 steps (stopped by train.max_minutes=10.5); " in demo._summary_line(metrics)


def test_time_budget_plan_on_hand_made_costs():
    full = demo.DEMOS["full"]
    assert full.max_minutes == 15 and demo.sweep_settings(full) == 7 + 5 - 1  # (s_T 1.5, s_I 1.2) is edited once
    cost = demo.EditCost(fixed=0.01, per_step=0.002)
    assert cost.seconds(10, 5) == pytest.approx(0.2)
    # Both splits (240 edits x 10 steps) and the sweep (24 examples x 11 settings x 6 steps), x 1.25, + 30 s.
    assert demo.after_training_seconds(full, cost) == pytest.approx(1.25 * (240 * 0.03 + 24 * 11 * 0.022) + 30)
    assert demo.training_minutes(900, 60, 300, cap=10.5) == 9.0  # what is left after evaluation and the sweep
    assert demo.training_minutes(900, 60, 100, cap=10.5) == 10.5  # never longer than the config's own budget
    assert demo.training_minutes(900, 60, 100, cap=0) == 12.33  # a config without one gets the time left
    assert demo.training_minutes(900, 100, 1000, cap=10.5) == 1.0  # too slow a machine still trains a little
    # ... but never longer than the config's own budget (train.max_minutes=0.5 trained a whole minute), and never
    # rounded to 0, which would mean no budget at all.
    assert demo.training_minutes(900, 100, 1000, cap=0.5) == demo.training_minutes(900, 60, 100, cap=0.5) == 0.5
    assert demo.training_minutes(900, 100, 1000, cap=0.001) == 0.001
    assert demo.sweep_size(100, 10, wanted=24, minimum=6) == 10
    assert demo.sweep_size(1000, 10, wanted=24, minimum=6) == 24
    assert demo.sweep_size(-5, 10, wanted=24, minimum=6) == 6
    assert demo.sweep_size(0, 1, wanted=2, minimum=6) == 2


def test_time_budget_shortens_training_and_the_sweep(tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "run"
    # 0.3 seconds: far less than the quick run needs, so training gets the floor and the sweep its minimum.
    assert demo.main(["--quick", "--output", str(out), "--max-minutes", "0.005"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    plan = metrics["budget"]
    assert plan["max_minutes"] == 0.005 and plan["train_max_minutes"] == 1.0
    assert plan["edit_seconds"]["per_step"] >= 0 and plan["edit_seconds"]["fixed"] >= 0  # clamped: noise may
    assert plan["edit_seconds"]["per_step"] + plan["edit_seconds"]["fixed"] > 0  # make a part 0, never the sum
    assert metrics["training"]["max_minutes"] == 1.0  # what training ran under (demo-quick.yaml has no budget)
    quick = demo.DEMOS["quick"]
    assert plan["sweep_examples"] == metrics["sweep"]["examples"] == quick.sweep_min_examples < quick.sweep_examples
    assert "plan" in metrics["timings"]
    assert "the sweep takes 2 of its 6 examples" in caplog.text
    assert demo._summary_line(metrics).endswith("(over the 0.005-minute budget)")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--quick", "--output", str(out), "--max-minutes", "-1"])
    assert exit_info.value.code == 2


def test_ctrl_c_during_training_is_one_line_and_the_rerun_keeps_data_and_base(tmp_path, caplog, monkeypatch):
    from ip2p import training

    caplog.set_level("INFO")
    out = tmp_path / "run"
    real = training.train

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert demo.main(["--quick", "--output", str(out)]) == 130  # was a KeyboardInterrupt traceback
    assert "interrupted; run the same command again" in caplog.text
    stamps = {name: (out / name / file).stat().st_mtime_ns for name, file in (("data", "params.json"),
                                                                              ("base", "model_index.json"))}
    monkeypatch.setattr(training, "train", real)
    caplog.clear()
    assert demo.main(["--quick", "--output", str(out)]) == 0
    assert "not regenerating" in caplog.text and "not rebuilding" in caplog.text
    assert stamps == {name: (out / name / file).stat().st_mtime_ns for name, file in (("data", "params.json"),
                                                                                       ("base", "model_index.json"))}


def test_a_rerun_stopped_after_training_leaves_no_results_of_the_previous_run(quick_run, tmp_path, monkeypatch, caplog):
    import shutil

    from ip2p.eval import sweep
    from ip2p.models import read_ip2p_meta

    caplog.set_level("INFO")
    out = tmp_path / "run"
    shutil.copytree(quick_run, out)
    (out / "inputs" / "mine.png").write_bytes(b"not the demo's")
    before = json.loads((out / "metrics.json").read_text())["training"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "guidance_sweep", interrupted)
    # A rerun with other settings, stopped after it replaced the model: the earlier run's metrics.json (8 steps) and
    # sweep files were left beside the new 4-step model, as if they described it.
    assert demo.main(["--quick", "--output", str(out), "train.max_steps=4"]) == 130
    assert before["steps"] == 8 and read_ip2p_meta(out / "final")["ip2p_config"]["step"] == 4
    for name in ("metrics.json", "sweep.json", "sweep.csv", "sweep.png"):
        assert not (out / name).exists(), name
    assert (out / "inputs" / "mine.png").read_bytes() == b"not the demo's"  # only the names the demo writes go
    assert "deleted the previous run's results" in caplog.text


def test_infer_command_names_this_interpreter_when_run_from_another_folder(tmp_path, monkeypatch):
    import shlex
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", "/opt/somewhere/.venv/bin/python")
    sampling = dict(steps=10, scheduler="euler", text_guidance=1.5, image_guidance=1.2, seed=0)
    args = shlex.split(demo.infer_command("runs/demo/final", "runs/demo/inputs/0.png", "x", sampling, "out.png"))
    assert args[0] == "/opt/somewhere/.venv/bin/python"  # was a bare `python`: often one without torch
    assert args[1] == str(demo.CONFIGS.parent / "infer.py")


def test_bad_override_fails_before_data_and_base_are_built(tmp_path, caplog):
    out = tmp_path / "bad"
    assert demo.main(["--quick", "--output", str(out), "train.max_minutes=abc"]) == 2
    assert "train.max_minutes='abc'" in caplog.text
    assert not (out / "data").exists() and not (out / "base").exists()
    assert demo.main(["--quick", "--output", str(out), "--device", "banana"]) == 2
    assert "--device 'banana' is not a device name" in caplog.text
    assert not out.exists()  # not even an empty output folder is left
    assert demo.main(["--quick", "--output", str(out), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in caplog.text and not out.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert demo.main(["--quick", "--output", str(a_file)]) == 2
    assert "is a file; pass a folder" in caplog.text and a_file.read_text() == "keep me"


def test_demo_configs_load():
    for name in ("demo.yaml", "demo-quick.yaml"):
        cfg = load_config(demo.CONFIGS / name)
        # Left/right instructions: a flip would contradict them; 64 px scenes are used as they are.
        assert not cfg.data.random_flip and not cfg.data.random_crop and cfg.data.resolution == 64
        # x0 prediction on a zero-terminal-SNR schedule: see docs/demo.md for the measurements behind both.
        assert cfg.model.prediction_type == "sample" and cfg.model.zero_terminal_snr
    # The full demo must end within 15 minutes: on a slower machine its training stops at a wall-clock budget
    # that leaves room for data, base, evaluation and the sweep (docs/demo.md).
    assert 0 < load_config(demo.CONFIGS / "demo.yaml").train.max_minutes <= 11


def test_shipped_vae_matches_the_default_spec():
    vae, header = base.load_vae(base.VAE_ASSET)
    assert header["spec"]["latent_channels"] == base.VaeSpec().latent_channels == vae.config.latent_channels
    assert base._vae_matches(base.VAE_ASSET, base.VaeSpec(), base.VaeTraining())
    assert header["report"]["psnr"] > 35 and header["report"]["oracle_success"] == 1.0
    assert abs(vae.config.scaling_factor * header["report"]["latent_std"] - 1) < 1e-6


def test_shipped_text_encoder_matches_the_default_pretrained_text_spec():
    # `--pretrained-text` bases use the shipped asset instead of training a text encoder for minutes.
    spec = base.BaseSpec(text_pretraining=base.TextPretraining())
    assert scene_clip.matches(base.TEXT_ASSET, base.text_key(spec))
    text_encoder, header = scene_clip.load_text_encoder(base.TEXT_ASSET)
    assert text_encoder.config.hidden_size == spec.text_hidden_size
    assert text_encoder.config.num_hidden_layers == spec.text_layers
    assert header["report"]["retrieval"] > 0.5 > header["report"]["retrieval_before"]
    tokenizer, loaded, _ = base._text_components(spec, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), text_encoder.state_dict().values()))


def test_vae_command_writes_the_given_spec_and_training(tmp_path):
    out = tmp_path / "vae.safetensors"
    assert base.main(["vae", "--out", str(out), "--channels", "16,16", "--latent-channels", "4",
                      "--layers-per-block", "1", "--steps", "3", "--batch-size", "4", "--lr", "5e-4",
                      "--seed", "7"]) == 0
    vae, header = base.load_vae(out)
    assert header["spec"] == {**dataclasses.asdict(base.VaeSpec()), "block_out_channels": [16, 16],
                              "latent_channels": 4, "layers_per_block": 1}
    assert header["training"] == {**dataclasses.asdict(base.VaeTraining()), "steps": 3, "batch_size": 4, "lr": 5e-4,
                                  "seed": 7}
    assert vae.config.latent_channels == 4 and list(vae.config.block_out_channels) == [16, 16]
    assert header["report"]["images"] > 0 and "psnr" in header["report"]
    # The file is found again only for exactly these settings.
    spec = base.VaeSpec(block_out_channels=(16, 16), latent_channels=4, layers_per_block=1)
    assert base._vae_matches(out, spec, base.VaeTraining(steps=3, batch_size=4, lr=5e-4, seed=7))
    assert not base._vae_matches(out, spec, base.VaeTraining(steps=4, batch_size=4, lr=5e-4, seed=7))


def test_build_base_is_cached_and_checked(tmp_path):
    spec = demo.DEMOS["quick"].base
    out = base.build_base(tmp_path / "base", spec, progress=False)
    stamp = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert base.build_base(out, spec, progress=False) == out  # same spec: kept
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert base.read_base_meta(out)["spec"] == spec.to_dict()
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="is not an ip2p base folder"):  # never replaced, whatever the flags
        base.build_base(precious, spec, progress=False, force=True)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="one flag per level"):
        base.make_unet(base.UNetSpec(block_out_channels=(32, 64), attention=(True,)), 16, 32, 16)


def test_base_unet_adds_the_pooled_instruction_to_the_timestep_embedding():
    small = dict(block_out_channels=(32, 32), layers_per_block=1, attention=(False, True))
    unet = base.make_unet(base.UNetSpec(**small, pooled_text=True, scale_shift=True), 16, 32, 16)
    assert unet.config.addition_embed_type == "text" and unet.config.resnet_time_scale_shift == "scale_shift"
    # The pooled path alone carries the instruction to the attention-free first level: its features change with it.
    x, t = torch.randn(1, 16, 16, 16), torch.tensor([999])
    seen = []
    unet.down_blocks[0].register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        for text in (torch.zeros(1, 6, 32), torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))):
            unet(x, t, text)
    assert (seen[0] - seen[1]).abs().max() > 1e-3
    plain = base.make_unet(base.UNetSpec(**small), 16, 32, 16)  # SD's conditioning, the default
    assert plain.config.addition_embed_type is None and plain.config.resnet_time_scale_shift == "default"
    seen.clear()
    plain.down_blocks[0].register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        for text in (torch.zeros(1, 6, 32), torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))):
            plain(x, t, text)
    assert torch.equal(seen[0], seen[1])  # there the text reaches only the levels with cross-attention
    with pytest.raises(ValueError, match="multiple of it"):
        base.make_unet(base.UNetSpec(**small, attention_heads=3, pooled_text=True), 16, 32, 16)


def test_shifted_cosine_schedule_lowers_log_snr_by_2_ln_shift(tmp_path):
    import numpy as np
    from diffusers import DDPMScheduler

    def log_snr(betas):
        ab = DDPMScheduler(trained_betas=betas).alphas_cumprod.double().numpy()
        return np.log(ab / (1 - ab))

    plain, shifted = log_snr(base.shifted_cosine_betas(1.0)), log_snr(base.shifted_cosine_betas(16.0))
    assert np.allclose(shifted - plain, -2 * np.log(16.0), atol=0.02)  # diffusers keeps float32
    assert abs(plain[499]) < 0.02  # the cosine schedule's midpoint has SNR 1
    assert np.all(np.diff(plain) < 0) and np.isfinite(plain[-1])  # decreasing, the last SNR tiny but finite
    with pytest.raises(ValueError, match="noise_shift must be > 0"):
        base.shifted_cosine_betas(0.0)
    # A base with noise_shift carries the schedule in its scheduler config, which every sampler reads.
    spec = base.BaseSpec(unet=demo.DEMOS["quick"].base.unet, noise_shift=16.0)
    out = base.build_base(tmp_path / "base", spec, progress=False)
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert np.allclose(config["trained_betas"], base.shifted_cosine_betas(16.0))
    assert base.BaseSpec.from_dict(base.read_base_meta(out)["spec"]) == spec


def test_base_build_cli_options(tmp_path, capsys):
    out = tmp_path / "base"
    assert base.main(["build", str(out), "--unet-channels", "32,32", "--unet-layers", "1", "--unet-attention", "0,1",
                      "--text-hidden-size", "48", "--text-layers", "0", "--noise-shift", "8", "--pooled-text"]) == 0
    spec = base.BaseSpec.from_dict(base.read_base_meta(out)["spec"])
    assert spec.unet.block_out_channels == (32, 32) and spec.unet.attention == (False, True)
    assert spec.unet.pooled_text and not spec.unet.scale_shift
    assert spec.text_hidden_size == 48 and spec.noise_shift == 8.0 and spec.text_layers == 0
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["cross_attention_dim"] == 48 and config["block_out_channels"] == [32, 32]
    # Without layers each position's output is its own token's: prompts differing in one word differ only there.
    from transformers import CLIPTextModel, CLIPTokenizer

    from ip2p.conditioning import encode_text

    encoder, tokenizer = CLIPTextModel.from_pretrained(out / "text_encoder"), CLIPTokenizer.from_pretrained(
        out / "tokenizer")
    assert encoder.config.num_hidden_layers == 0
    embeds = encode_text(encoder, tokenizer, ["make the circle blue", "make the circle red"])
    differs = (embeds[0] - embeds[1]).abs().amax(-1) > 1e-6
    assert differs.nonzero().flatten().tolist() == [4]  # BOS, make, the, circle, <colour>
    for bad, message in ((["--unet-attention", "0,1,1"], "has 3 flags"), (["--unet-attention", "yes"], "0/1 flags"),
                         (["--unet-channels", "24,32"], "not divisible by norm_num_groups"),
                         (["--unet-channels", "32,x"], "'32,x': expected comma-separated whole numbers"),
                         # CLIPTextConfig used to refuse it deep in the build, with a traceback
                         (["--text-hidden-size", "30"], "must be a multiple of the text encoder's 4 attention heads")):
        with pytest.raises(SystemExit):
            base.main(["build", str(tmp_path / "bad"), "--unet-channels", "32,32", *bad])
        assert message in capsys.readouterr().err


def test_bad_output_threads_and_managed_overrides_are_one_line_errors(tmp_path, caplog, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert demo.main(["--quick", "--output", str(a_file)]) == 2
    assert "is a file; pass a folder" in caplog.text and a_file.read_text() == "keep me"
    assert demo.main(["--quick", "--output", str(a_file / "run")]) == 2
    assert "cannot be created" in caplog.text
    # The demo sets these from --output: overriding one would train apart from the data and base it evaluates.
    for key in ("output_dir", "data.path", "model.pretrained"):
        caplog.clear()
        assert demo.main(["--quick", "--output", str(tmp_path / "run"), f"{key}={tmp_path / 'other'}"]) == 2
        assert "use --output DIR instead" in caplog.text
    assert not (tmp_path / "run").exists() and not (tmp_path / "other").exists()
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--quick", "--output", str(tmp_path / "run"), "--threads", "0"])
    assert exit_info.value.code == 2 and "--threads 0 must be at least 1" in capsys.readouterr().err
