"""Training end to end: loss goes down, checkpoints are atomic and resumable, any process count gives the same weights."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from safetensors.torch import load_file

import train
from ip2p.config import ConfigError, load_config
from ip2p.training import (
    EMA,
    Trainer,
    bias_timesteps,
    draw_step,
    edit_region_weights,
    list_checkpoints,
    per_example_mse,
    resolve_resume,
    snr_weights,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small synthetic edit dataset written once (the same data path a user's parquet folder takes)."""
    from ip2p.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=48, n_test=4, seed=0, size=32)


def overrides(out, data_dir, *extra):
    return [f"output_dir={out}", "model.pretrained=tiny", f"data.path={data_dir}", "data.resolution=16",
            "data.random_resize=[16,20]", "data.num_workers=0", "train.batch_size=4", "train.max_steps=4",
            "train.lr=1e-3", "train.checkpoint_every=2", "train.log_every=1", "trackers=[]",
            "train.final_single_file=false", *extra]


def unet_weights(folder: Path) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- pure pieces ----------------------------------------------------------------------------------------------

def test_ema_ramp_and_state_round_trip():
    p = [torch.nn.Parameter(torch.zeros(3))]
    ema = EMA(p, decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        p[0].fill_(1.0)
    ema.step(p)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9))
    assert ema.current_decay() == pytest.approx(2 / 11)
    other = EMA(p)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.shadow[0], ema.shadow[0])


def test_draws_depend_only_on_seed_and_example_index():
    a = draw_step([5, 9], seed=1, num_timesteps=1000, latent_shape=(4, 2, 2))
    b = draw_step([9], seed=1, num_timesteps=1000, latent_shape=(4, 2, 2))
    assert a.timesteps[1] == b.timesteps[0] and torch.equal(a.noise[1], b.noise[0])
    assert a.dropout_r[1] == b.dropout_r[0]
    c = draw_step([9], seed=2, num_timesteps=1000, latent_shape=(4, 2, 2))
    assert not torch.equal(b.noise, c.noise)


def test_min_snr_weights_and_loss():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler()
    t = torch.tensor([1, 500, 999])
    w = snr_weights(sched, t, 5.0, "epsilon")
    assert w[0] < 1.0 and w[2] == pytest.approx(1.0)  # high SNR clipped, low SNR untouched (epsilon)
    # Every parameterisation gets the same effective x0 weight min(snr, gamma).
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    x0 = snr_weights(sched, t, 5.0, "sample")
    torch.testing.assert_close(x0, torch.clamp(snr, max=5.0))
    torch.testing.assert_close(snr_weights(sched, t, 5.0, "v_prediction") * (snr + 1), x0)
    torch.testing.assert_close(w * snr, x0)
    assert per_example_mse(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]


def test_timestep_bias_maps_the_uniform_draw():
    t = torch.arange(1000)
    assert torch.equal(bias_timesteps(t, 1000, 1.0), t)
    b = bias_timesteps(t, 1000, 3.0)
    assert b.min() <= 3 and b.max() == 999 and bool((b[1:] >= b[:-1]).all())
    assert (b >= 800).float().mean().item() == pytest.approx(0.2 ** (1 / 3), abs=0.005)  # 58%, not 20%
    plain = draw_step([5, 9, 11], seed=1, num_timesteps=1000, latent_shape=(4, 2, 2))
    biased = draw_step([5, 9, 11], seed=1, num_timesteps=1000, latent_shape=(4, 2, 2), timestep_bias=3.0)
    # Only the timesteps change: noise, dropout and posterior draws are the same stream as with uniform timesteps.
    assert torch.equal(biased.timesteps, bias_timesteps(plain.timesteps, 1000, 3.0))
    assert torch.equal(biased.noise, plain.noise) and torch.equal(biased.dropout_r, plain.dropout_r)


def test_edit_region_weights_and_the_weighted_mse():
    source = torch.zeros(1, 4, 2, 2)
    target = source.clone()
    target[0, :, 0, 1] = 1.0  # changed by the edit
    target[0, 0, 1, 1] = 0.1  # a change under the threshold (channel mean 0.0025)
    w = edit_region_weights(target, source, 9.0, 0.05)
    assert w.shape == (1, 1, 2, 2) and w.flatten().tolist() == [1.0, 10.0, 1.0, 1.0]
    pred = torch.zeros_like(target)
    assert per_example_mse(pred, target).item() == pytest.approx((4 + 0.01) / 16)
    # Weighted mean over the pixels, normalised by the weights: the changed pixel counts 10 times.
    assert per_example_mse(pred, target, w).item() == pytest.approx((10 * 4 + 0.01) / (4 * 13))
    torch.testing.assert_close(per_example_mse(pred, target, torch.ones(1, 1, 2, 2)), per_example_mse(pred, target))


def test_edit_weight_reaches_the_loss(tmp_path, data_dir, monkeypatch):
    import ip2p.training as training

    with pytest.raises(ConfigError, match="edit_weight"):
        load_config(None, ["train.edit_weight=-1"])
    with pytest.raises(ConfigError, match=r"train\.edit_threshold=0(\.0)? must be positive"):
        load_config(None, ["train.edit_threshold=0"])
    with pytest.raises(ConfigError, match="timestep_bias"):
        load_config(None, ["train.timestep_bias=0"])
    cfg = load_config(None, overrides(tmp_path / "w", data_dir, "train.edit_weight=4", "train.timestep_bias=2",
                                      "train.edit_threshold=1e-4"))  # the random tiny VAE's latents change little
    trainer = Trainer(cfg)
    batch = next(iter(trainer._batches(0)))
    seen = {}

    def spy_mse(pred, goal, pixel_weights=None):
        seen["w"] = pixel_weights
        return per_example_mse(pred, goal, pixel_weights)

    monkeypatch.setattr(training, "per_example_mse", spy_mse)
    assert torch.isfinite(trainer.micro_step(batch))
    w = seen["w"]
    assert w.shape[1] == 1 and set(w.unique().tolist()) == {1.0, 5.0}  # the test edits change some latent pixels
    sf = trainer.vae.config.scaling_factor
    src, mean, _ = trainer._encode_images(batch["source"], batch["target"], batch["record"].tolist(),
                                          batch["valid"].tolist())
    torch.testing.assert_close(w, edit_region_weights(mean * sf, src * sf, 4.0, 1e-4))


# ---- end to end -------------------------------------------------------------------------------------------------

def test_train_main_end_to_end_exports_a_loadable_editor(tmp_path, data_dir):
    out = tmp_path / "run"
    img = ROOT / "configs" / "examples" / "scene0.png"
    rc = train.main(overrides(out, data_dir, "trackers=[tensorboard]", "validation.every=2",
                              f"validation.images=[{img}]", "validation.instructions=[turn the star cyan]",
                              "validation.steps=2", "validation.resolution=32", "train.final_single_file=true",
                              "model.prediction_type=v_prediction"))
    assert rc == 0
    assert (out / "config.yaml").is_file() and load_config(out / "config.yaml").train.max_steps == 4
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert (out / "validation" / "step-000002.png").is_file() and (out / "validation" / "step-000004.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out / "final")
    assert pipe.unet.config.in_channels == 8 and pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("x", image=torch.rand(1, 3, 16, 16), num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    assert (out / "final.safetensors").is_file()
    # EMA weights are what gets exported: they differ from the raw weights in the last checkpoint.
    raw = load_file(out / "checkpoints" / "step-000004" / "model.safetensors")
    assert max_diff(raw, unet_weights(out / "final")) > 0
    # Training on without the single file: the earlier one must not sit beside the newer final/ as if it were it.
    assert train.main(overrides(out, data_dir, "train.max_steps=5", "resume=latest")) == 0
    assert not (out / "final.safetensors").exists()


def test_sample_prediction_trains_and_exports_a_pipeline_diffusers_can_sample(tmp_path, data_dir):
    """prediction_type=sample: the UNet learns x0; validation and the export use a sampler that can step it."""
    from ip2p.tiny import save_tiny_pipeline

    base = save_tiny_pipeline(tmp_path / "base", in_channels=4)
    # Stable Diffusion 1.5's scheduler JSON as shipped: PNDM, no prediction_type key (so diffusers lists it under
    # _use_default_values when loading, and from_config would drop a naive override of it).
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}))
    out = tmp_path / "x0"
    img = ROOT / "configs" / "examples" / "scene0.png"
    rc = train.main(overrides(out, data_dir, f"model.pretrained={base}", "model.prediction_type=sample",
                              "validation.every=4",
                              f"validation.images=[{img}]", "validation.instructions=[x]", "validation.steps=2",
                              "validation.resolution=32"))
    assert rc == 0 and (out / "validation" / "step-000004.png").is_file()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out / "final")
    # PNDM cannot step x0 predictions: the export switches to Euler.
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.prediction_type == "sample"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("x", image=torch.rand(1, 3, 16, 16), num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(image).all()
    # A validation sampler that cannot step x0 predictions is refused before training starts.
    assert train.main(overrides(tmp_path / "bad", data_dir, "model.prediction_type=sample",
                                f"validation.images=[{img}]", "validation.instructions=[x]",
                                "validation.scheduler=euler_a")) == 2
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_zero_terminal_snr_trains_from_pure_noise_and_exports_the_schedule(tmp_path, data_dir):
    cfg = load_config(None, overrides(tmp_path / "z", data_dir, "model.zero_terminal_snr=true",
                                      "model.prediction_type=v_prediction", "train.max_steps=2"))
    trainer = Trainer(cfg)
    # The last training timestep holds no trace of the target: sampling from pure noise starts where training did.
    assert trainer.noise_scheduler.alphas_cumprod[-1].item() == 0.0
    trainer.run()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "z" / "final")
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # Epsilon prediction is meaningless at zero SNR: refused before any training step.
    assert train.main(overrides(tmp_path / "eps", data_dir, "model.zero_terminal_snr=true")) == 2
    assert not (tmp_path / "eps" / "checkpoints").exists()


def test_sample_prediction_target_is_the_clean_latent(tmp_path, data_dir, monkeypatch):
    import ip2p.training as training

    cfg = load_config(None, overrides(tmp_path / "t", data_dir, "model.prediction_type=sample",
                                      "train.condition_dropout=0"))
    trainer = Trainer(cfg)
    batch = next(iter(trainer._batches(0)))
    seen = {}
    forward = trainer.unet.forward

    def spy_unet(sample, timestep, **kwargs):
        seen["input"], seen["t"] = sample.detach().clone(), timestep
        return forward(sample, timestep, **kwargs)

    def spy_mse(pred, goal, pixel_weights=None):
        seen["goal"] = goal.detach().clone()
        return per_example_mse(pred, goal, pixel_weights)

    monkeypatch.setattr(trainer.unet, "forward", spy_unet)
    monkeypatch.setattr(training, "per_example_mse", spy_mse)
    trainer.micro_step(batch)
    draws = draw_step(batch["index"].tolist(), cfg.seed, 1000, tuple(seen["goal"].shape[1:]))
    # The goal is exactly the latent that was noised into the UNet's first channels: x0, not epsilon or v.
    noisy = trainer.noise_scheduler.add_noise(seen["goal"], draws.noise, seen["t"])
    torch.testing.assert_close(seen["input"][:, :4], noisy)
    assert not torch.allclose(seen["goal"], draws.noise, atol=0.5)


def test_loss_falls_when_overfitting(tmp_path, data_dir):
    cfg = load_config(None, overrides(tmp_path / "fit", data_dir, "train.max_steps=30", "train.checkpoint_every=0",
                                      "train.condition_dropout=0", "data.shuffle=false", "train.ema=false"))
    trainer = Trainer(cfg)
    batch = next(iter(trainer._batches(0)))
    # The same batch (and the same per-example noise and timesteps) every step: the loss must fall.
    losses = [trainer.micro_step(batch).item() for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_fine_tunes_an_8_channel_editor(tmp_path, data_dir, tiny_editor_dir):
    out = tmp_path / "run8"
    assert train.main(overrides(out, data_dir, f"model.pretrained={tiny_editor_dir}", "train.max_steps=2",
                                "train.ema=false")) == 0
    before = load_file(Path(tiny_editor_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    after = unet_weights(out / "final")
    assert after["conv_in.weight"].shape[1] == 8
    assert max_diff(before, after) > 0


def test_bad_config_and_missing_data_are_clear_errors(tmp_path, caplog):
    assert train.main([f"output_dir={tmp_path}", "train.max_step=3"]) == 2
    assert "did you mean 'max_steps'" in caplog.text
    caplog.clear()
    assert train.main(overrides(tmp_path / "r", tmp_path / "no-such-data")) == 2
    assert "no-such-data" in caplog.text


def test_max_minutes_stops_early_and_still_saves_and_exports(tmp_path, data_dir, caplog):
    out = tmp_path / "run"
    # A budget already spent after the first step: the run ends there, as it would at max_steps.
    assert train.main(overrides(out, data_dir, "train.max_steps=50", "train.max_minutes=1e-9")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "train.max_minutes=1e-09 reached at step 1 of 50" in caplog.text
    assert load_config(out / "config.yaml").train.max_minutes == pytest.approx(1e-9)
    assert train.main(overrides(tmp_path / "bad", data_dir, "train.max_minutes=-1")) == 2


def test_resume_reproduces_an_uninterrupted_run(tmp_path, data_dir, caplog):
    full = tmp_path / "full"
    assert train.main(overrides(full, data_dir, "train.max_steps=4")) == 0
    part = tmp_path / "part"
    assert train.main(overrides(part, data_dir, "train.max_steps=2")) == 0
    assert train.main(overrides(part, data_dir, "train.max_steps=4", "resume=latest")) == 0
    assert max_diff(unet_weights(full / "final"), unet_weights(part / "final")) <= 1e-6
    raw_full = load_file(full / "checkpoints" / "step-000004" / "model.safetensors")
    raw_part = load_file(part / "checkpoints" / "step-000004" / "model.safetensors")
    assert max_diff(raw_full, raw_part) <= 1e-6
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path), str(full))
    # A checkpoint past max_steps trains nothing: said, not silently exported as final.
    assert train.main(overrides(full, data_dir, "train.max_steps=2", "resume=latest")) == 0
    assert "the checkpoint is at step 4, past train.max_steps=2" in caplog.text


def _env():
    # The child must compute with this process's thread count, or a resumed run differs in the last bits.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("WORLD_SIZE", None)
    return env


def test_sigkill_after_a_checkpoint_then_resume_matches(tmp_path, data_dir):
    full = tmp_path / "full"
    assert train.main(overrides(full, data_dir, "train.max_steps=6", "train.checkpoint_every=3")) == 0
    killed = tmp_path / "killed"
    args = overrides(killed, data_dir, "train.max_steps=6", "train.checkpoint_every=3")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(killed) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = list_checkpoints(killed)
    assert found and found[-1][0] == 3, "the run was killed before its first checkpoint"
    assert not (killed / "final").exists()
    assert train.main([*args, "resume=latest"]) == 0
    assert max_diff(unet_weights(full / "final"), unet_weights(killed / "final")) <= 1e-6


_KILL_DURING_SWAP = """
import os, signal, sys
import train
real = os.rename
def rename(src, dst):
    real(src, dst)
    if ".old-" in os.fspath(dst):  # the checkpoint being replaced is aside, the new one not yet in: die here
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
sys.exit(train.main(sys.argv[1:]))
"""


def test_kill_while_replacing_a_checkpoint_then_resume_restores_it(tmp_path, data_dir, caplog):
    out = tmp_path / "swap"
    args = overrides(out, data_dir, "train.max_steps=4", "train.checkpoint_every=2")
    assert train.main(args) == 0
    step2 = str(list_checkpoints(out)[0][1])
    # A run resumed from step 2 saves step 4 again, replacing the one there; it is killed between the two renames.
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SWAP, *args, f"resume={step2}"], env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert list((out / "checkpoints").glob(".step-000004.old-*"))
    # The next run puts the step-4 checkpoint back and resumes from it: nothing left to train.
    caplog.set_level(logging.INFO)
    assert train.main([*args, "resume=latest"]) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert "restored" in caplog.text and "at step 4" in caplog.text
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, data_dir):
    out = tmp_path / "term"
    args = overrides(out, data_dir, "train.max_steps=100000", "train.checkpoint_every=2",
                     "train.checkpoints_total_limit=0")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(out) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, log = proc.communicate(timeout=300)
    assert proc.returncode == 143, log[-2000:]
    found = list_checkpoints(out)
    # The periodic checkpoint at step 2 was there before SIGTERM; SIGTERM added a newer one at a step boundary.
    assert found[0][0] == 2 and found[-1][0] > 2
    state = json.loads((found[-1][1] / "ip2p_state.json").read_text())
    assert state["step"] == found[-1][0]
    assert "resume with resume=latest" in log


_TERM_DURING_EXPORT = """
import os, signal, sys
import ip2p.export, train
real = ip2p.export.save_pipeline_folder
def save(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice that lands while the final model is being written
    return real(*a, **k)
ip2p.export.save_pipeline_folder = save
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_during_the_final_export_finishes_it(tmp_path, data_dir):
    out = tmp_path / "term-export"
    args = overrides(out, data_dir, "train.max_steps=2")
    proc = subprocess.run([sys.executable, "-c", _TERM_DURING_EXPORT, *args], env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SIGTERM arrived during the final checkpoint or export" in proc.stderr
    assert (out / "final" / "unet" / "config.json").is_file()
    assert [s for s, _ in list_checkpoints(out)] == [2]


def test_interrupted_checkpoint_write_leaves_latest_intact(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "atomic"
    assert train.main(overrides(out, data_dir, "train.max_steps=2")) == 0
    cfg = load_config(None, overrides(out, data_dir, "train.max_steps=4", "resume=latest"))
    trainer = Trainer(cfg)
    trainer.load_checkpoint(resolve_resume("latest", str(out)))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(trainer.accelerator, "save_state", boom)
    trainer.global_step = 3
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    found = list_checkpoints(out)
    assert [s for s, _ in found] == [2]
    assert resolve_resume("latest", str(out)) == found[-1][1]
    assert (found[-1][1] / "model.safetensors").is_file()


def _free_port() -> int:
    """A port no one listens on now, so that two test runs on one machine do not meet at torchrun's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_train(args: list[str]) -> str:
    """Run train.py under torchrun with 2 CPU processes (gloo) and return its stderr; a failure shows its end."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "train.py"), *args]
    result = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_two_processes_match_one(tmp_path, data_dir):
    """torchrun with 2 CPU processes (gloo) and half the per-process batch ends with the same weights.

    Adam divides by sqrt(v) + eps, so float-rounding differences in near-zero gradients (batch-size dependent
    kernels, the all-reduce's summation order) can become updates of up to 2 x lr; a larger eps keeps that rounding
    from being amplified while a real difference in the data or the draws still moves the weights by ~lr.
    """
    common = ("train.max_steps=2", "train.checkpoint_every=0", "train.lr=1e-4", "train.adam_eps=1e-4")
    one = tmp_path / "one"
    assert train.main(overrides(one, data_dir, *common, "train.batch_size=4")) == 0
    two = tmp_path / "two"
    torchrun_train(overrides(two, data_dir, *common, "train.batch_size=2"))
    assert max_diff(unet_weights(one / "final"), unet_weights(two / "final")) <= 1e-5
    # The bound has teeth: another seed (other noise, timesteps, dropout) moves the weights far more.
    other = tmp_path / "other"
    assert train.main(overrides(other, data_dir, *common, "train.batch_size=4", "seed=1")) == 0
    assert max_diff(unet_weights(one / "final"), unet_weights(other / "final")) > 1e-4
    # The run's messages come once, from the main process (STYLE), not once per process.
    log = torchrun_train(overrides(two, data_dir, *common, "train.batch_size=2", "resume=latest"))
    assert log.count("resumed from") == 1, log[-3000:]


def test_latent_cache_skips_the_vae_and_changes_nothing(tmp_path, monkeypatch):
    from ip2p.synthetic import write_dataset

    small = write_dataset(tmp_path / "small", n_train=8, n_test=1, seed=0, size=32)
    fixed = ("data.random_crop=false", "data.random_flip=false", "data.random_resize=[16,16]",
             "train.max_steps=4", "train.checkpoint_every=0", "train.lr=1e-4")
    plain = tmp_path / "plain"
    assert train.main(overrides(plain, small, *fixed)) == 0
    calls = []
    import ip2p.training as training_mod

    real = training_mod.encode_posterior
    monkeypatch.setattr(training_mod, "encode_posterior", lambda vae, x: calls.append(len(x)) or real(vae, x))
    cached = tmp_path / "cached"
    assert train.main(overrides(cached, small, *fixed, "data.cache=text+latents")) == 0
    assert sum(calls) == 8  # 4 steps x batch 4 = two epochs of 8 examples: the second epoch is all cache hits
    # Cached encodings are the uncached ones (the posterior's parameters, not a sample, are cached).
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()
    trainer = Trainer(load_config(None, overrides(cached, small, *fixed, "data.cache=text+latents")))
    batch = next(iter(trainer._batches(0)))
    args = (batch["source"], batch["target"], batch["record"].tolist(), batch["valid"].tolist())
    first, again = trainer._encode_images(*args), trainer._encode_images(*args)
    trainer.cfg.data.cache = "none"
    fresh = trainer._encode_images(*args)
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)
    # The cache is on disk too: a new run (resume, restart) reads it instead of encoding.
    assert len(list((cached / "cache").rglob("*.safetensors"))) == 8
    calls.clear()
    trainer.cfg.data.cache = "text+latents"
    trainer.latent_cache.clear()
    again = trainer._encode_images(*args)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(first, again))
    # Other columns, or the same path with other data, must not read this cache (it trained swapped images).
    folder = trainer._cache_path(0).parent.parent
    trainer._cache_dir = None
    trainer.cfg.data.source_column, trainer.cfg.data.target_column = "edited_image", "input_image"
    assert trainer._cache_path(0).parent.parent != folder
    trainer._cache_dir = None
    trainer.cfg.data.source_column = trainer.cfg.data.target_column = None
    assert trainer._cache_path(0).parent.parent == folder
    trainer._cache_dir, trainer.cfg.data.subset = None, "clean"  # another configuration of a hub dataset
    assert trainer._cache_path(0).parent.parent != folder
    trainer._cache_dir, trainer.cfg.data.subset = None, None
    trainer.cfg.train.mixed_precision = "bf16"  # the VAE encodes in bf16 then: other latents
    assert trainer._cache_path(0).parent.parent != folder
    trainer._cache_dir, trainer.cfg.train.mixed_precision = None, "no"
    assert trainer._cache_path(0).parent.parent == folder
    trainer._cache_dir = None
    shard = sorted(Path(small).rglob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0")
    trainer._cache_dir = None
    assert trainer._cache_path(0).parent.parent != folder
    with pytest.raises(Exception, match="fixed preprocessing"):
        load_config(None, ["data.cache=text+latents"])


def test_cache_memory_budget_bounds_the_in_memory_caches_and_changes_nothing(tmp_path, monkeypatch, caplog):
    from ip2p.synthetic import write_dataset

    small = write_dataset(tmp_path / "small", n_train=8, n_test=1, seed=0, size=32)
    args = ("data.random_crop=false", "data.random_flip=false", "data.random_resize=[16,16]", "train.max_steps=6",
            "train.checkpoint_every=0", "data.cache=text+latents")
    runs = []
    real_run = Trainer.run
    monkeypatch.setattr(Trainer, "run", lambda self: runs.append(self) or real_run(self))
    assert train.main(overrides(tmp_path / "all", small, *args)) == 0
    whole = runs[-1]
    assert len(whole.latent_cache) == 8 and whole.text_cache
    assert all(t.device.type == "cpu" for entry in whole.latent_cache.values() for t in entry)  # never the GPU's
    caplog.set_level(logging.INFO, logger="ip2p.training")
    for name, gib in (("half", whole.cache_bytes / 2 / 2**30), ("none", 0)):
        assert train.main(overrides(tmp_path / name, small, *args, f"data.cache_memory_gb={gib!r}")) == 0
        bounded = runs[-1]
        assert bounded.cache_bytes <= gib * 2**30 and len(bounded.latent_cache) < 8
        # The same training: what is not in memory is encoded again (text) or read from the disk cache (latents).
        assert max_diff(unet_weights(tmp_path / "all" / "final"), unet_weights(tmp_path / name / "final")) == 0
        assert len(list((tmp_path / name / "cache").rglob("*.safetensors"))) == 8
    assert "reached data.cache_memory_gb=" in caplog.text
    with pytest.raises(Exception, match="cache_memory_gb=-1.0 must be >= 0"):
        load_config(None, ["data.cache_memory_gb=-1"])


def test_latent_cache_files_load_on_a_multi_process_cpu_device(tmp_path, data_dir, monkeypatch, caplog):
    # torchrun on CPUs puts process i on torch.device("cpu", i), a name safetensors refuses to load to: every cached
    # file was then "unreadable" and encoded again.
    fixed = ("data.random_crop=false", "data.random_flip=false", "data.random_resize=[16,16]")
    trainer = Trainer(load_config(None, overrides(tmp_path / "run", data_dir, *fixed, "data.cache=text+latents")))
    entry = tuple(torch.randn(4, 8, 8) for _ in range(3))
    trainer._store_cached(3, entry)
    monkeypatch.setattr(type(trainer.accelerator), "device", property(lambda self: torch.device("cpu", 1)))
    trainer._load_cached(3)
    assert "unreadable" not in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(trainer.latent_cache[3], entry))


_KILL_DURING_CACHE_WRITE = """
import os, signal, sys
import safetensors.torch
import train
real = safetensors.torch.save_file
written = []
def save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    if "/cache/latents-" in str(filename):
        written.append(filename)
        if len(written) == 3:  # the third latent is written, not yet under its name: die here
            os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_file
sys.exit(train.main(sys.argv[1:]))
"""


def test_kill_while_writing_the_latent_cache_leaves_whole_files_and_no_litter(tmp_path, data_dir):
    out = tmp_path / "cached"
    args = overrides(out, data_dir, "data.random_crop=false", "data.random_flip=false", "data.random_resize=[16,16]",
                     "data.cache=text+latents", "train.max_steps=1", "train.checkpoint_every=0")
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_CACHE_WRITE, *args], env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    files = sorted(p for p in (out / "cache").rglob("*") if p.is_file())
    assert [p.name.startswith(".") for p in files].count(True) == 1  # the killed write's, under no final name
    assert all(load_file(p) for p in files if not p.name.startswith("."))
    # The next run sweeps it away (thousands of cache files a folder: not at each write) and fills the cache.
    assert train.main(args) == 0
    files = [p.name for p in (out / "cache").rglob("*") if p.is_file()]
    assert len(files) == 4 and not [name for name in files if name.startswith(".")], files


def test_cached_records_are_not_decoded_again_and_training_is_unchanged(tmp_path, monkeypatch):
    from ip2p.data import batches as batches_mod
    from ip2p.synthetic import write_dataset

    small = write_dataset(tmp_path / "small", n_train=8, n_test=1, seed=0, size=32)
    args = ("data.random_crop=false", "data.random_flip=false", "data.random_resize=[16,16]", "train.max_steps=8",
            "train.checkpoint_every=0", "data.cache=text+latents")  # 8 steps x batch 4 = four epochs of 8 records
    decoded = []
    real = batches_mod.decode_image
    monkeypatch.setattr(batches_mod, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    assert train.main(overrides(tmp_path / "skip", small, *args)) == 0
    assert len(decoded) == 16  # source and target of each record in the first epoch only (64 without the skip)
    # The same run decoding every image every epoch ends with the same weights.
    real_batches = Trainer._batches
    monkeypatch.setattr(Trainer, "_batches", lambda self, start, cached=frozenset(): real_batches(self, start))
    decoded.clear()
    assert train.main(overrides(tmp_path / "all", small, *args)) == 0
    assert len(decoded) == 64
    assert max_diff(unet_weights(tmp_path / "skip" / "final"), unet_weights(tmp_path / "all" / "final")) == 0


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, data_dir):
    # adam_eps: see test_two_processes_match_one.
    common = ("train.max_steps=2", "train.checkpoint_every=0", "train.lr=1e-4", "train.adam_eps=1e-4")
    big = tmp_path / "big"
    assert train.main(overrides(big, data_dir, *common, "train.batch_size=4")) == 0
    acc = tmp_path / "acc"
    assert train.main(overrides(acc, data_dir, *common, "train.batch_size=2", "train.gradient_accumulation=2")) == 0
    assert max_diff(unet_weights(big / "final"), unet_weights(acc / "final")) <= 1e-5


def test_resuming_with_another_accumulation_split_of_the_same_global_batch_matches(tmp_path, data_dir):
    """A checkpoint of step 1 (batch 4), resumed as batch 2 x accumulation 2: the same global batch, so the same
    weights as the uninterrupted run; Accelerate's saved micro-step count must not shift the accumulation windows."""
    common = ("train.max_steps=3", "train.checkpoint_every=1", "train.lr=1e-4", "train.adam_eps=1e-4")
    big = tmp_path / "big"
    assert train.main(overrides(big, data_dir, *common, "train.batch_size=4")) == 0
    split = tmp_path / "split"
    assert train.main(overrides(split, data_dir, *common, "train.batch_size=4", "train.max_steps=1")) == 0
    assert train.main(overrides(split, data_dir, *common, "train.batch_size=2", "train.gradient_accumulation=2",
                                "resume=latest")) == 0
    assert max_diff(unet_weights(big / "final"), unet_weights(split / "final")) <= 1e-5


def test_wandb_logs_offline_into_the_run_folder(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    img = ROOT / "configs" / "examples" / "scene0.png"
    assert train.main(overrides(out, data_dir, "trackers=[wandb]", "train.max_steps=2", "validation.every=2",
                                f"validation.images=[{img}]", "validation.instructions=[x]", "validation.steps=1",
                                "validation.resolution=32")) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    assert (out / "validation" / "step-000002.png").is_file()


def test_a_diverged_loss_is_a_clear_error(tmp_path, data_dir, caplog, monkeypatch):
    import ip2p.training as training_mod

    monkeypatch.setattr(training_mod, "per_example_mse", lambda pred, goal, weights=None: pred.float().mean((1, 2, 3))
                        * float("nan"))
    assert train.main(overrides(tmp_path / "nan", data_dir)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "loss is nan at step 1" in errors[0] and "lower train.lr" in errors[0]


def test_wandb_that_cannot_start_is_a_clear_error(tmp_path, data_dir, caplog, monkeypatch):
    import wandb

    def no_login(*args, **kwargs):  # what wandb.init says online without an API key
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    assert train.main(overrides(tmp_path / "wb", data_dir, "trackers=[wandb]")) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "No API key configured" in errors[0] and "WANDB_MODE=offline" in errors[0]


def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path, data_dir):
    out = tmp_path / "bf16"
    assert train.main(overrides(out, data_dir, "train.mixed_precision=bf16", "model.gradient_checkpointing=true",
                                "train.max_steps=2", "train.noise_offset=0.1", "train.snr_gamma=5",
                                "train.lr_schedule=cosine", "train.lr_warmup_steps=1")) == 0
    weights = unet_weights(out / "final")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert weights["conv_in.weight"].dtype == torch.float32  # master weights stay fp32


@pytest.mark.skipif(torch.accelerator.is_available(), reason="fp16 trains on an accelerator")
def test_fp16_on_the_cpu_is_a_clear_error_before_the_model_loads(tmp_path, data_dir, caplog):
    assert train.main(overrides(tmp_path / "fp16", data_dir, "train.mixed_precision=fp16")) != 0
    assert "train.mixed_precision=fp16 needs a GPU; on the CPU use train.mixed_precision=bf16 or no" in caplog.text


def test_missing_optional_packages_are_clear_errors_before_the_model_loads(tmp_path, data_dir, caplog, monkeypatch):
    # Before: the error came after the base model loaded (for a hub id, after its download).
    import builtins
    import importlib.util

    from ip2p import training

    real_import, real_find_spec = builtins.__import__, importlib.util.find_spec

    def no_optional(name, *args, **kwargs):
        if name in ("xformers", "bitsandbytes"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    def loads(*args, **kwargs):
        raise AssertionError("the base model loaded before the missing package was named")

    monkeypatch.setattr(builtins, "__import__", no_optional)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("xformers", "bitsandbytes") else real_find_spec(name, *a))
    monkeypatch.setattr(training, "load_components", loads)
    assert train.main(overrides(tmp_path / "x", data_dir, "model.attention=xformers")) == 2
    assert "model.attention=xformers needs xformers, which is not installed" in caplog.text
    assert train.main(overrides(tmp_path / "b", data_dir, "train.optimizer=adamw8bit")) == 2
    assert "train.optimizer=adamw8bit needs bitsandbytes" in caplog.text


def _records_with_unreadable_sources(folder: Path, sources: list[str | None]) -> Path:
    """A parquet dataset in ``folder`` of 20x20 one-colour images; a None source is bytes no decoder reads."""
    import io

    from datasets import Dataset, Features, Image as ImageFeature, Value
    from PIL import Image

    def png(colour):
        if colour is None:
            return {"bytes": b"not an image", "path": None}
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    targets = ["blue", "red", "grey", "green"]
    rows = {"input_image": [png(c) for c in sources], "edit_prompt": [f"make it {t}" for t in targets[:len(sources)]],
            "edited_image": [png(t) for t in targets[:len(sources)]]}
    features = Features({"input_image": ImageFeature(), "edit_prompt": Value("string"),
                         "edited_image": ImageFeature()})
    folder.mkdir()
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


def test_bad_records_are_skipped_counted_and_never_fatal(tmp_path):
    _records_with_unreadable_sources(tmp_path / "bad", ["red", None, "blue", "green"])
    out = tmp_path / "run"
    assert train.main(overrides(out, tmp_path / "bad", "train.max_steps=2", "train.batch_size=2",
                                "data.shuffle=false")) == 0
    state = json.loads((list_checkpoints(out)[-1][1] / "ip2p_state.json").read_text())
    assert state["bad_records"] == 1  # 2 steps x 2 = one pass over 4 rows, one of them corrupt
    assert (out / "final" / "model_index.json").is_file()
    # With 2 processes each sees half of every batch; the count is the run's, not the first process's share.
    two = tmp_path / "two"
    torchrun_train(overrides(two, tmp_path / "bad", "train.max_steps=2", "train.batch_size=1", "data.shuffle=false",
                             "train.checkpoint_every=0"))
    assert json.loads((list_checkpoints(two)[-1][1] / "ip2p_state.json").read_text())["bad_records"] == 1


def test_a_step_whose_whole_batch_is_bad_updates_nothing(tmp_path, caplog):
    _records_with_unreadable_sources(tmp_path / "bad", ["red", "blue", None, None])
    # Step 2's batch is rows 2-3, both unreadable: AdamW on zero gradients would still move the weights (momentum).
    # "accum": the step's two micro-batches of one record each, read one at a time, both bad
    for name, run in (("one", train.main), ("accum", train.main), ("two", torchrun_train)):
        out = tmp_path / name
        per_process = {"one": ["train.batch_size=2"], "two": ["train.batch_size=1"],
                       "accum": ["train.batch_size=1", "train.gradient_accumulation=2"]}[name]
        result = run(overrides(out, tmp_path / "bad", "train.max_steps=2", *per_process, "data.shuffle=false",
                               "train.checkpoint_every=1", "train.weight_decay=0.01"))
        assert result == 0 if name != "two" else "updates nothing" in result
        (_, first), (_, second) = list_checkpoints(out)
        assert max_diff(load_file(first / "model.safetensors"), load_file(second / "model.safetensors")) == 0
        state = json.loads((second / "ip2p_state.json").read_text())
        assert state["skipped_steps"] == 1 and state["bad_records"] == 2 and state["step"] == 2
    assert "step 2: every record of its batch was bad; the step updates nothing" in caplog.text


def test_damaged_checkpoint_is_a_clear_error_and_latest_falls_back(tmp_path, data_dir, caplog):
    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.checkpoint_every=1", "train.max_steps=2")) == 0
    newest = out / "checkpoints" / "step-000002"
    (newest / "model.safetensors").write_bytes(b"torn")
    assert train.main(overrides(out, data_dir, "train.max_steps=3", f"resume={newest}")) == 2
    assert f"checkpoint {newest} cannot be loaded" in caplog.text and "Traceback" not in caplog.text
    assert train.main(overrides(out, data_dir, "train.checkpoint_every=1", "train.max_steps=3", "resume=latest")) == 0
    assert "trying the one before it" in caplog.text  # and step 1 loaded: steps 2 and 3 were trained again
    # The damaged step 2 was written again (moved aside first, never deleted before its replacement was in place).
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3]
    assert load_file(newest / "model.safetensors") and not list((out / "checkpoints").glob(".*"))


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors"])
def test_a_truncated_checkpoint_file_is_named_with_the_fix(tmp_path, data_dir, caplog, name):
    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.max_steps=1")) == 0
    folder = list_checkpoints(out)[-1][1]
    torn = folder / name
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a copy or a disk that stopped halfway
    caplog.clear()
    assert train.main(overrides(out, data_dir, "train.max_steps=2", f"resume={folder}")) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text
    assert f"checkpoint {folder} cannot be loaded: {name} is damaged" in errors[0]
    assert "resume=latest" in errors[0] and "move it aside" in errors[0]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.checkpoint_every=2", "train.max_steps=4",
                                "train.checkpoints_total_limit=0")) == 0
    older = out / "checkpoints" / "step-000002"
    # Resumed from the older checkpoint, with room for one: the newest left must be the one this run wrote.
    assert train.main(overrides(out, data_dir, "train.checkpoint_every=1", "train.max_steps=3",
                                "train.checkpoints_total_limit=1", f"resume={older}")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [3]
    # Every file is as readable as the umask allows (safetensors alone writes its weights owner-only).
    folder = list_checkpoints(out)[0][1]
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {modes["ip2p_state.json"]}, modes


def test_unusable_data_and_validation_images_fail_before_training(tmp_path, data_dir, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "ints").mkdir()
    table = pq.read_table(next(Path(data_dir).glob("data/train-*.parquet")))
    index = table.schema.get_field_index("edit_prompt")
    table = table.set_column(index, "edit_prompt", pa.array(range(table.num_rows)))  # a column of the wrong type
    pq.write_table(table, tmp_path / "ints" / "train.parquet")
    out = tmp_path / "run"
    assert train.main(overrides(out, tmp_path / "ints", "train.max_steps=1000")) == 2
    assert "the first 48 examples" in caplog.text and "instruction has type int" in caplog.text  # one epoch
    caplog.clear()
    missing, out = tmp_path / "missing.png", tmp_path / "validated"
    assert train.main(overrides(out, data_dir, "validation.every=2", f"validation.images=[{missing}]",
                                "validation.instructions=[x]")) == 2
    assert "validation.images" in caplog.text and str(missing) in caplog.text and not list_checkpoints(out)


def test_validation_steps_the_sampler_cannot_take_fail_before_training(tmp_path, data_dir, caplog):
    """DDIM indexes the training timesteps: 1000 validation steps would stop the run at its first validation."""
    out = tmp_path / "run"
    image = ROOT / "configs" / "examples" / "scene0.png"
    assert train.main(overrides(out, data_dir, "validation.every=2", f"validation.images=[{image}]",
                                "validation.instructions=[x]", "validation.scheduler=ddim",
                                "validation.steps=1000")) == 2
    assert "validation.steps: steps=1000 is too many for the DDIMScheduler" in caplog.text
    assert not (out / "config.yaml").exists() and not list_checkpoints(out)  # nothing was trained


def test_a_wrong_data_path_or_column_fails_before_the_base_model_loads(tmp_path, data_dir, caplog, monkeypatch):
    # Loading Stable Diffusion takes minutes: a typo in the data settings must not wait for it.
    import ip2p.training as training_mod

    def never(*args, **kwargs):
        raise AssertionError("the base model loaded before the data was checked")

    monkeypatch.setattr(training_mod, "load_components", never)
    assert train.main(overrides(tmp_path / "a", tmp_path / "no-such-data")) == 2
    assert "no-such-data" in caplog.text
    caplog.clear()
    assert train.main(overrides(tmp_path / "b", data_dir, "data.instruction_column=prompt_typo")) == 2
    assert "prompt_typo" in caplog.text


def test_an_output_dir_that_is_a_file_is_a_clear_error(tmp_path, data_dir, caplog):
    (tmp_path / "taken").write_text("x")
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):
        assert train.main(overrides(out, data_dir)) == 2
        assert f"output_dir={str(out)!r} cannot be used as the run folder" in caplog.text
        caplog.clear()


def test_an_output_dir_that_cannot_be_written_is_a_clear_error_before_the_model_loads(tmp_path, data_dir, caplog,
                                                                                     monkeypatch):
    import ip2p.training as training_mod

    def never(*args, **kwargs):
        raise AssertionError("the base model loaded before the run folder was checked")

    monkeypatch.setattr(training_mod, "load_components", never)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # An existing folder: mkdir succeeds, the first write fails. Root writes to a 0o555 folder, but not into /proc.
    folders = [locked] if os.geteuid() != 0 else []
    folders += [Path("/proc/self")] if Path("/proc/self").is_dir() else []
    for out in folders:
        assert train.main(overrides(out, data_dir)) == 2
        assert f"output_dir={str(out)!r} cannot be used as the run folder" in caplog.text
        assert "Traceback" not in caplog.text
        caplog.clear()


def test_a_run_that_fails_to_start_keeps_the_config_of_the_run_in_its_folder(tmp_path, data_dir, caplog):
    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.max_steps=1")) == 0
    written = (out / "config.yaml").read_text()
    # Pointed at the wrong data, or resumed with a setting its checkpoint cannot load: the run stops, and the folder
    # still says how its checkpoints were trained.
    assert train.main(overrides(out, tmp_path / "no-such-data", "resume=latest")) == 2
    assert train.main(overrides(out, data_dir, "train.max_steps=2", "resume=latest", "train.ema=false")) == 2
    assert (out / "config.yaml").read_text() == written


def test_resuming_an_older_checkpoint_starts_a_new_line_with_this_runs_settings(tmp_path, data_dir, caplog):
    out = tmp_path / "run"
    common = ("train.ema=false", "train.checkpoints_total_limit=0")
    assert train.main(overrides(out, data_dir, *common, "train.max_steps=3", "train.checkpoint_every=1")) == 0
    old_step2 = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    # Resumed from step 1 with a new learning rate: the saved optimizer and LR schedule states must not override it.
    assert train.main(overrides(out, data_dir, *common, "train.max_steps=2", "train.checkpoint_every=0",
                                "train.lr=1e-2", f"resume={out / 'checkpoints' / 'step-000001'}")) == 0
    # Step 3 belonged to the abandoned run: resume=latest must not pick it up, so it is gone once this run saves.
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert "step-000003 aside to abandoned-step-000003: this run, resumed from an older checkpoint," in caplog.text
    # ... but nothing is lost: it is moved aside, whole, where resume=latest does not look.
    assert (out / "checkpoints" / "abandoned-step-000003" / "model.safetensors").is_file()
    # The final step's checkpoint is this run's, not the abandoned run's checkpoint of the same step.
    new_step2 = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert max_diff(new_step2, unet_weights(out / "final")) == 0
    assert max_diff(new_step2, old_step2) > 0
    optimizer = torch.load(out / "checkpoints" / "step-000002" / "optimizer.bin", weights_only=True)
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(1e-2)
    # A run started from scratch in the same output_dir replaces the later checkpoints too, and says it started so.
    caplog.clear()
    assert train.main(overrides(out, data_dir, *common, "train.max_steps=1", "train.checkpoint_every=0")) == 0
    assert "step-000002 aside to abandoned-step-000002: this run, started from scratch, replaces" in caplog.text


def test_a_resumed_run_uses_its_own_ema_decay(tmp_path, data_dir):
    """The saved EMA state carries the old decay; the resumed run's config (written beside it) names the new one."""
    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.max_steps=1", "train.ema_decay=0.99")) == 0
    assert train.main(overrides(out, data_dir, "train.max_steps=2", "train.ema_decay=0.5", "resume=latest")) == 0
    ema = torch.load(out / "checkpoints" / "step-000002" / "custom_checkpoint_1.pkl", weights_only=False)
    assert ema["decay"] == 0.5 and ema["num_updates"] == 2


def test_resume_with_another_ema_setting_or_batch_is_explained(tmp_path, data_dir, caplog, monkeypatch):
    from ip2p import atomic

    synced = []
    real_fsync = atomic.fsync_file
    monkeypatch.setattr(atomic, "fsync_file", lambda path: synced.append(Path(path).name) or real_fsync(path))
    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.max_steps=1")) == 0
    # Every file of a checkpoint reaches the disk before its folder is renamed into place (a crash, not just a kill).
    assert set(synced) >= {p.name for p in list_checkpoints(out)[0][1].iterdir()}
    caplog.clear()
    assert train.main(overrides(out, data_dir, "train.max_steps=2", "resume=latest", "train.ema=false")) == 2
    assert "was saved with train.ema=true" in caplog.text and "trying the one before it" not in caplog.text
    caplog.clear()
    assert train.main(overrides(out, data_dir, "train.max_steps=2", "resume=latest", "train.batch_size=2")) == 0
    assert "global batch of 4" in caplog.text and "this run's is 2" in caplog.text


def test_a_step_whose_whole_batch_is_bad_leaves_the_ema_alone(tmp_path):
    # The EMA is what final/ exports (train.ema=true by default): a skipped step must not move it toward the weights
    # nor advance its warm-up.
    _records_with_unreadable_sources(tmp_path / "bad", ["red", "blue", None, None])
    out = tmp_path / "run"
    assert train.main(overrides(out, tmp_path / "bad", "train.max_steps=2", "train.batch_size=2",
                                "data.shuffle=false", "train.checkpoint_every=1")) == 0
    (_, first), (_, second) = list_checkpoints(out)
    ema = [next(state for state in (torch.load(f, weights_only=False) for f in sorted(path.glob("custom_checkpoint_*")))
                if isinstance(state, dict) and "num_updates" in state) for path in (first, second)]
    assert ema[0]["num_updates"] == ema[1]["num_updates"] == 1
    assert all(torch.equal(a, b) for a, b in zip(ema[0]["shadow"], ema[1]["shadow"]))
