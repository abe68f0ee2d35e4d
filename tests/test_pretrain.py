"""The base UNet's text-to-image pretraining (ip2p.base.pretrain_unet and friends) and the scene captions it uses."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ip2p import base, synthetic
from ip2p.synthetic import PALETTE, Scene, SceneObject

TINY = base.BaseSpec(
    unet=base.UNetSpec(block_out_channels=(16, 32), layers_per_block=1, attention=(False, True)),
    unet_pretraining=base.UNetPretraining(steps=6, batch_size=4, scenes=40, lr=1e-3),
)


def test_caption_with_positions_names_each_object_cell():
    scene = Scene("orange", (SceneObject("circle", "red", 10, 10, 8), SceneObject("star", "blue", 32, 54, 8)), 64)
    assert synthetic.caption(scene) == "a red circle and a blue star on an orange background"
    assert synthetic.caption(scene, positions=True) == \
        "a red circle top left and a blue star bottom on an orange background"
    assert synthetic.caption(Scene("white", (), 64), positions=True) == "an empty white background"


def test_random_scene_is_scene_images_scene_and_checks_its_arguments():
    np.testing.assert_array_equal(synthetic.render_scene(synthetic.random_scene(7, 2, 48)),
                                  synthetic.scene_images(3, 7, 48)[2])
    for bad in (dict(seed=-1, index=0), dict(seed=0, index=-2), dict(seed=0, index=0, size=8)):
        with pytest.raises(ValueError, match="invalid|too small"):
            synthetic.random_scene(**bad)


def test_every_caption_word_is_one_token():
    from ip2p import tiny

    tokenizer = tiny.tiny_tokenizer(synthetic.vocabulary(captions=True), max_length=32)
    assert set(synthetic.vocabulary()) < set(synthetic.vocabulary(captions=True))
    assert base._words(TINY) == synthetic.vocabulary(captions=True) and base._words(base.BaseSpec()) == \
        synthetic.vocabulary()  # the default base's tokenizer is unchanged
    for i in range(50):
        text = synthetic.caption(synthetic.random_scene(5, i), positions=True)
        words = text.replace(",", " ,").split()
        ids = tokenizer(text).input_ids[1:-1]
        assert len(ids) == len(words), text


def test_captioned_scenes_do_not_depend_on_the_worker_count():
    one = base.captioned_scenes(9, 3, TINY, workers=1, progress=False)
    two = base.captioned_scenes(9, 3, TINY, workers=2, progress=False)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    np.testing.assert_array_equal(one[0][4], synthetic.render_scene(synthetic.random_scene(3, 4)))


def test_lr_schedule_warms_up_and_decays_to_zero():
    assert base._lr_scale(0, 100, 10) == pytest.approx(0.1)
    assert base._lr_scale(10, 100, 10) == pytest.approx(1.0)
    assert base._lr_scale(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    unet, spec, report = base.pretrain_unet(TINY, workers=1, progress=False, report_scenes=4)
    return unet, spec, report


def test_pretrain_unet_learns_and_reports(pretrained):
    unet, spec, report = pretrained
    assert spec.unet_pretraining.steps == report["steps"] == 6
    assert unet.config.in_channels == TINY.vae.latent_channels and not unet.training
    assert np.isfinite(report["loss_last"])
    for g in ("1", "3"):
        for what in ("objects", "backgrounds", "scenes"):
            assert 0.0 <= report[f"caption_{what}_g{g}"] <= 1.0


def test_pretrain_unet_minutes_fits_the_step_count():
    spec = replace(TINY, unet_pretraining=replace(TINY.unet_pretraining, steps=50))
    _, fitted, report = base.pretrain_unet(spec, workers=1, progress=False, report_scenes=2, minutes=1e-6)
    assert report["steps"] == fitted.unet_pretraining.steps < 50


def test_unet_file_round_trip_and_build_base(pretrained, tmp_path):
    unet, spec, report = pretrained
    path = base.unet_cache_path(spec, tmp_path)
    base.save_unet(unet, path, spec=spec, report=report)
    loaded, header = base.load_unet(path)
    assert header["spec"] == spec.to_dict() and header["report"]["steps"] == 6
    for (name, a), b in zip(unet.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a.half().float(), msg=name)  # stored as float16
    out = base.build_base(tmp_path / "base", spec, progress=False)  # finds the cached file: no training
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert scheduler["prediction_type"] == "sample" and scheduler["rescale_betas_zero_snr"]
    from diffusers import UNet2DConditionModel

    built = UNet2DConditionModel.from_pretrained(out / "unet")
    for (name, a), b in zip(loaded.state_dict().items(), built.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
    assert base.read_base_meta(out)["unet_report"]["steps"] == 6
    # The CLI builds the same base from the same options.
    assert base.main(["build", str(tmp_path / "cli"), "--pretrained-unet", "--unet-channels", "16,32",
                      "--unet-layers", "1", "--pretrain-steps", "6", "--pretrain-batch-size", "4",
                      "--pretrain-scenes", "40"]) == 0
    assert base.read_base_meta(tmp_path / "cli")["spec"] == spec.to_dict()
    # Another spec does not pick this file up.
    other = replace(spec, unet_pretraining=replace(spec.unet_pretraining, steps=7))
    assert not base._unet_matches(path, other) and base.unet_cache_path(other, tmp_path) != path


def test_spec_round_trips_through_dict():
    assert base.BaseSpec.from_dict(TINY.to_dict()) == TINY
    assert base.BaseSpec.from_dict(base.BaseSpec().to_dict()) == base.BaseSpec()


class _Oracle(torch.nn.Module):
    """A 'UNet' that predicts, for each conditional row, the exact latent of its scene (x0 prediction) and zeros for
    the unconditional rows: with text guidance 1 the sampler must end on the scenes' own latents."""

    def __init__(self, latents: torch.Tensor):
        super().__init__()
        self.latents = latents
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = type("C", (), {"in_channels": latents.shape[1], "sample_size": latents.shape[-1]})()

    def forward(self, x, t, encoder_hidden_states):
        n = self.latents.shape[0]
        out = torch.cat([self.latents, torch.zeros_like(self.latents)])
        return type("O", (), {"sample": out[: x.shape[0]] if x.shape[0] == 2 * n else out})()


def test_caption_report_scores_an_exact_model_as_right():
    vae, _ = base.load_vae(base.VAE_ASSET)
    spec = base.BaseSpec(unet_pretraining=base.UNetPretraining())
    tokenizer, text_encoder, report = base._text_components(spec)
    assert report is None  # a random text encoder
    n = 6
    scenes = [synthetic.random_scene(base.CAPTION_EVAL_SEED, i) for i in range(n)]
    images = np.stack([synthetic.render_scene(s) for s in scenes])
    latents = base._encode_latents(vae, images, torch.device("cpu"))
    report = base.caption_report(_Oracle(latents), vae, text_encoder, tokenizer, base.scheduler_config(spec), n=n,
                                 steps=4, guidance=(1.0,))
    assert report["caption_objects_g1"] == 1.0 and report["caption_backgrounds_g1"] == 1.0
    assert report["caption_scenes_g1"] == 1.0
    # The same model told nothing (zeros everywhere) gets the colours wrong.
    blank = base.caption_report(_Oracle(torch.zeros_like(latents)), vae, text_encoder, tokenizer,
                                base.scheduler_config(spec), n=n, steps=4, guidance=(1.0,))
    assert blank["caption_scenes_g1"] < 0.5
    assert set(PALETTE) >= {s.background for s in scenes}


def test_unet_cli_errors_are_one_line(capsys):
    with pytest.raises(SystemExit):
        base.main(["unet", "--unet-channels", "16,32", "--unet-attention", "1"])
    err = capsys.readouterr().err
    # The command's own usage and name, not the top parser's list of commands.
    assert "python -m ip2p.base unet: error: --unet-attention has 1 flags" in err and "{vae,unet" not in err


def test_base_cli_bad_options_fail_in_one_line_before_training(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    out = str(tmp_path / "vae.safetensors")
    cases = [
        (["vae", "--out", out, "--steps", "0"], "--steps 0 must be a finite number >= 1"),
        (["vae", "--out", out, "--lr", "nan"], "--lr nan must be a number > 0"),
        (["vae", "--out", out, "--latent-channels", "0"], "--latent-channels 0"),
        (["vae", "--out", out, "--device", "banana"], "--device 'banana' is not a device name"),
        (["vae", "--out", out, "--threads", "-1"], "--threads -1 must be at least 1"),
        (["vae", "--out", str(tmp_path)], "is a folder; pass the .safetensors file"),
        (["vae", "--out", str(a_file / "vae.safetensors")], "cannot be written"),
        # The shipped VAE is used only for its own settings: writing others over it would make the demo retrain.
        (["vae", "--steps", "10"], "--out defaults to the shipped demo_vae.safetensors"),
        (["text", "--out", out, "--text-steps", "0"], "--text-steps 0 must be"),
        (["unet", "--out", out, "--minutes", "-1"], "--minutes -1.0 must be a number > 0"),
        (["build", str(tmp_path / "b"), "--unet-channels", "0,0"], "--unet-channels 0,0"),
        (["build", str(a_file / "base")], "cannot be written"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            base.main(argv)
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert a_file.read_text() == "keep me" and not (tmp_path / "vae.safetensors").exists()
    assert base._vae_matches(base.VAE_ASSET, base.VaeSpec(), base.VaeTraining())
