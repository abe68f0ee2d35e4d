"""Surgery, guidance, condition dropout and the edit loop, checked against diffusers' pipeline."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from ip2p import tiny
from ip2p.conditioning import apply_dropout, draw_dropout, dropout_masks, encode_source, encode_text
from ip2p.guidance import branch_weights, combine, needed_branches, two_scale_denoiser
from ip2p.models import EditorModel, expand_conv_in, load_editor
from ip2p.sampling import NO_SAMPLE_PREDICTION, SCHEDULERS, default_scheduler, edit, make_scheduler


# ---- conv_in surgery ----------------------------------------------------------------------------------------------

def test_expand_conv_in_keeps_weights_bias_and_zeroes_new_channels():
    unet = tiny.tiny_unet("small", in_channels=4, seed=3)
    old_w, old_b = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    assert expand_conv_in(unet) is True
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    assert torch.equal(unet.conv_in.weight[:, :4], old_w)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    assert torch.equal(unet.conv_in.bias, old_b) and old_b.abs().sum() > 0


def test_expanded_unet_equals_base_at_step_0_for_any_source_latent():
    base = tiny.tiny_unet("small", in_channels=4, seed=5)
    expanded = tiny.tiny_unet("small", in_channels=4, seed=5)
    expand_conv_in(expanded)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 900])
    want = base(x, t, encoder_hidden_states=ctx).sample
    for src in (torch.randn(2, 4, 16, 16, generator=g) * 5, torch.zeros(2, 4, 16, 16)):
        got = expanded(torch.cat([x, src], 1), t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_expand_conv_in_leaves_8_channel_unet_alone_and_rejects_others():
    unet = tiny.tiny_unet("small", in_channels=8)
    w = unet.conv_in.weight.clone()
    assert expand_conv_in(unet) is False
    assert torch.equal(unet.conv_in.weight, w)
    with pytest.raises(ValueError, match="9 input channels"):
        expand_conv_in(tiny.tiny_unet("small", in_channels=9))


def test_load_editor_expands_a_base_and_refuses_base_without_expand(tiny_base_dir):
    model = load_editor(tiny_base_dir)
    assert model.unet.conv_in.in_channels == 8
    assert model.scale_source_latent is False
    with pytest.raises(ValueError, match="base text-to-image model"):
        load_editor(tiny_base_dir, expand=False)


def test_load_editor_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_editor(tmp_path)
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        load_editor(str(tmp_path / "not-a-model"))
    # A path that does not exist is named as one, not looked up on the hub as an id.
    for missing in (str(tmp_path / "absent"), "./absent", "runs/x/final", "~/absent"):
        with pytest.raises(FileNotFoundError, match="does not exist: no such folder or file here"):
            load_editor(missing)


def test_a_checkpoint_path_may_start_with_a_tilde(tiny_editor_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_editor_dir.parent))
    assert load_editor(f"~/{tiny_editor_dir.name}").unet.conv_in.in_channels == 8


@pytest.mark.parametrize("change, message", [
    ({"addition_embed_type": "text_time", "addition_time_embed_dim": 8}, "Stable Diffusion XL model"),
    ({"class_embed_type": "timestep"}, "conditioned on class labels"),
], ids=["sdxl", "class-labels"])
def test_unets_that_need_other_inputs_are_refused_before_their_weights_load(tiny_editor_dir, tmp_path, change,
                                                                           message, monkeypatch):
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "other"
    shutil.copytree(tiny_editor_dir, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", lambda *a, **k: pytest.fail("read the weights"))
    with pytest.raises(ValueError, match=message):
        load_editor(folder)


# ---- guidance -------------------------------------------------------------------------------------------------------

def _eps():
    g = torch.Generator().manual_seed(1)
    return {b: torch.randn(2, 4, 8, 8, generator=g) for b in ("full", "image", "none")}


def test_guidance_formula_and_identities():
    eps = _eps()
    s_t, s_i = 7.5, 1.5
    want = eps["none"] + s_i * (eps["image"] - eps["none"]) + s_t * (eps["full"] - eps["image"])
    torch.testing.assert_close(combine(eps, s_t, s_i), want)
    # s_T = s_I = 1 is the fully conditioned branch alone.
    assert needed_branches(1.0, 1.0) == ("full",)
    torch.testing.assert_close(combine({"full": eps["full"]}, 1.0, 1.0), eps["full"])
    # Dropping zero-weight branches gives the same value as the three-branch formula.
    for s_t, s_i in [(7.5, 1.0), (2.0, 2.0), (0.0, 1.3), (0.0, 0.0), (0.0, 1.0), (3.0, 0.0)]:
        sub = {b: eps[b] for b in needed_branches(s_t, s_i)}
        full = eps["none"] + s_i * (eps["image"] - eps["none"]) + s_t * (eps["full"] - eps["image"])
        torch.testing.assert_close(combine(sub, s_t, s_i), full, rtol=1e-5, atol=1e-5)
    assert sum(branch_weights(4.2, 1.7).values()) == pytest.approx(1.0)


def test_denoiser_batches_only_needed_branches():
    calls = []

    class FakeUNet(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, return_dict=False):
            calls.append(x.shape[0])
            return (x[:, :4] + encoder_hidden_states.mean() + x[:, 4:].sum(dim=(1, 2, 3), keepdim=True),)

    text, null = torch.ones(2, 77, 32), torch.zeros(2, 77, 32)
    src = torch.ones(2, 4, 8, 8)
    x = torch.zeros(2, 4, 8, 8)
    for (s_t, s_i), rows in {(7.5, 1.5): 6, (7.5, 1.0): 4, (1.0, 1.0): 2}.items():
        calls.clear()
        out = two_scale_denoiser(FakeUNet(), text, null, src, s_t, s_i)(x, torch.tensor(1))
        assert calls == [rows]
        assert out.shape == x.shape
    # With s_T = s_I = 1 only the full branch is used: text mean 1 plus source sum 256.
    assert torch.allclose(out, torch.full_like(out, 1.0 + 256.0))


# ---- condition dropout ----------------------------------------------------------------------------------------------

def test_dropout_bands_are_exact():
    p = 0.05
    r = torch.tensor([0.0, 0.049, 0.05, 0.099, 0.1, 0.149, 0.15, 0.99])
    drop_text, drop_image = dropout_masks(r, p)
    assert drop_text.tolist() == [True, True, True, True, False, False, False, False]
    assert drop_image.tolist() == [False, False, True, True, True, True, False, False]


def test_dropout_rates():
    drop_text, drop_image = draw_dropout(200_000, 0.05, torch.Generator().manual_seed(0))
    text_only = (drop_text & ~drop_image).float().mean().item()
    both = (drop_text & drop_image).float().mean().item()
    image_only = (~drop_text & drop_image).float().mean().item()
    for rate in (text_only, both, image_only):
        assert abs(rate - 0.05) < 0.003
    with pytest.raises(ValueError, match="p=0.5"):
        dropout_masks(torch.rand(3), 0.5)


def test_apply_dropout_uses_null_text_and_zero_image():
    text = torch.ones(3, 77, 8)
    null = torch.full((1, 77, 8), -1.0)
    src = torch.ones(3, 4, 2, 2)
    t, i = apply_dropout(text, null, src, torch.tensor([True, False, True]), torch.tensor([False, True, True]))
    assert torch.equal(t[0], null[0]) and torch.equal(t[1], text[1]) and torch.equal(t[2], null[0])
    assert torch.equal(i[0], src[0]) and i[1].abs().sum() == 0 and i[2].abs().sum() == 0


# ---- edit loop vs diffusers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def editor_and_pipe(tiny_editor_dir):
    model = load_editor(tiny_editor_dir, expand=False)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_editor_dir)
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_edit_matches_diffusers_pipeline(editor_and_pipe, scheduler, size):
    model, pipe = editor_and_pipe
    g = torch.Generator().manual_seed(42)
    image = torch.rand(1, 3, *size, generator=g) * 2 - 1
    pipe.scheduler = make_scheduler(scheduler, model.scheduler.config)
    want = pipe("make it winter", image=(image + 1) / 2, num_inference_steps=4, guidance_scale=7.5,
                image_guidance_scale=1.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    got = edit(model, image, ["make it winter"], steps=4, text_guidance=7.5, image_guidance=1.5,
               scheduler=make_scheduler(scheduler, model.scheduler.config),
               generator=torch.Generator().manual_seed(0), progress=False)
    assert got.shape == want.shape == (1, 3, *size)
    assert (got - want).abs().max().item() <= 1e-5


def test_edit_matches_diffusers_for_batches_and_several_outputs(editor_and_pipe):
    model, pipe = editor_and_pipe
    pipe.scheduler = make_scheduler("euler_a", model.scheduler.config)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["make it winter", "turn the cat black"]
    want = pipe(prompts, image=(images + 1) / 2, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                output_type="pt").images
    got = edit(model, images, prompts, steps=3, scheduler=make_scheduler("euler_a", model.scheduler.config),
               generator=torch.Generator().manual_seed(7), progress=False)
    assert (got - want).abs().max().item() <= 1e-5
    # Several outputs of one input: diffusers tiles the single image, which is right for a batch of one.
    want = pipe("add snow", image=(images[:1] + 1) / 2, num_inference_steps=3, num_images_per_prompt=3,
                generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = edit(model, images[:1], ["add snow"], steps=3, num_images_per_input=3,
               scheduler=make_scheduler("euler_a", model.scheduler.config),
               generator=torch.Generator().manual_seed(3), progress=False)
    assert got.shape == (3, 3, 32, 32)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got[0] - got[1]).abs().max() > 1e-3  # different noise per output


def test_edit_is_bit_identical_to_diffusers_for_a_linear_projection_unet(tmp_path):
    """SD 2.x UNets project attention inputs with Linear layers; over a few tokens PyTorch takes another matmul kernel
    for weights that do not require grad, so the editor must leave the flags as diffusers does."""
    from diffusers import UNet2DConditionModel

    c = tiny.tiny_components("small", in_channels=8, seed=1)
    torch.manual_seed(2)
    c.unet = UNet2DConditionModel(**dict(c.unet.config, use_linear_projection=True)).eval()
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=c.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    model = load_editor(tmp_path, expand=False)
    image = torch.rand(1, 3, 4, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1  # latent 2x6: 3 tokens deep
    pipe.scheduler = make_scheduler("euler", model.scheduler.config)
    want = pipe("x", image=(image + 1) / 2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="latent").images
    got = edit(model, image, ["x"], steps=2, scheduler=make_scheduler("euler", model.scheduler.config),
               generator=torch.Generator().manual_seed(0), progress=False, output="latent")
    assert torch.equal(got, want)


def test_encode_text_masks_as_diffusers_for_encoders_trained_with_a_mask():
    c = tiny.tiny_components("small", in_channels=8)
    c.text_encoder.config.use_attention_mask = True
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=c.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    full, null, _ = pipe._encode_prompt(["make it winter"], "cpu", 1, True, None).chunk(3)
    assert torch.equal(encode_text(c.text_encoder, c.tokenizer, ["make it winter"]), full)
    assert torch.equal(encode_text(c.text_encoder, c.tokenizer, [""]), null)


def test_tokenizer_longer_than_the_text_encoder_is_a_clear_error(editor_and_pipe):
    """diffusers fails inside the text encoder, or overflows for a tokenizer saved without a length (1e30)."""
    model, _ = editor_and_pipe
    short = tiny.tiny_text_encoder(len(model.tokenizer), max_length=64)
    with pytest.raises(ValueError, match="model_max_length=77 tokens but the text encoder has 64 positions"):
        encode_text(short, model.tokenizer, ["x"])
    unbounded = tiny.tiny_tokenizer(max_length=int(1e30))
    broken = EditorModel(model.unet, model.vae, model.text_encoder, unbounded, model.scheduler)
    with pytest.raises(ValueError, match="set model_max_length to 77 in tokenizer/tokenizer_config.json"):
        edit(broken, torch.zeros(1, 3, 16, 16), ["x"], steps=1, progress=False)


def test_edit_is_reproducible_and_seed_dependent(editor_and_pipe):
    model, _ = editor_and_pipe
    image = torch.zeros(1, 3, 16, 16)
    run = lambda seed: edit(model, image, ["x"], steps=2, generator=torch.Generator().manual_seed(seed),  # noqa: E731
                            progress=False)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_edit_with_s_i_one_matches_three_branch_value(editor_and_pipe):
    model, _ = editor_and_pipe
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    src = encode_source(model.vae, image)
    text = encode_text(model.text_encoder, model.tokenizer, ["hello"])
    null = encode_text(model.text_encoder, model.tokenizer, [""])
    t = torch.tensor(500)
    two = two_scale_denoiser(model.unet, text, null, src, 7.5, 1.0)(x, t)
    # Force all three branches by nudging s_I by 0 through the generic formula.
    ctx = torch.cat([text, null, null])
    inp = torch.cat([torch.cat([x] * 3), torch.cat([src, src, torch.zeros_like(src)])], 1)
    full, img, none = model.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(3)
    want = none + 1.0 * (img - none) + 7.5 * (full - img)
    torch.testing.assert_close(two, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpm++"])
def test_sample_prediction_edit_matches_diffusers(editor_and_pipe, scheduler):
    """A model trained to predict x0 ("sample") is sampled exactly as diffusers samples it."""
    model, pipe = editor_and_pipe
    config = dict(model.scheduler.config, prediction_type="sample")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    pipe.scheduler = make_scheduler(scheduler, config)
    want = pipe("x", image=(image + 1) / 2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
    got = edit(model, image, ["x"], steps=3, scheduler=make_scheduler(scheduler, config),
               generator=torch.Generator().manual_seed(0), progress=False)
    assert (got - want).abs().max().item() <= 1e-5


def test_sample_prediction_refuses_samplers_that_cannot_step_it(editor_and_pipe):
    model, _ = editor_and_pipe
    config = dict(model.scheduler.config, prediction_type="sample")
    assert default_scheduler("sample") == "euler" and default_scheduler("epsilon") == "euler_a"
    assert type(make_scheduler(None, config)).__name__ == "EulerDiscreteScheduler"
    for name, cls in SCHEDULERS.items():
        if issubclass(cls, NO_SAMPLE_PREDICTION):
            with pytest.raises(ValueError, match=f"{cls.__name__} sampler cannot use .*choose one of euler"):
                make_scheduler(name, config)
    # A scheduler object loaded from a folder is checked when sampling starts, before any UNet call.
    pndm = SCHEDULERS["pndm"].from_config(config)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        edit(model, torch.zeros(1, 3, 16, 16), ["x"], steps=1, scheduler=pndm, progress=False)


@pytest.mark.parametrize("scheduler", ["euler_a", "ddim", "unipc"])
def test_zero_terminal_snr_edit_matches_diffusers(editor_and_pipe, scheduler):
    model, pipe = editor_and_pipe
    config = dict(model.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    pipe.scheduler = make_scheduler(scheduler, config)
    assert pipe.scheduler.config.rescale_betas_zero_snr
    want = pipe("x", image=(image + 1) / 2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
    got = edit(model, image, ["x"], steps=3, scheduler=make_scheduler(scheduler, config),
               generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.isfinite(got).all() and (got - want).abs().max().item() <= 1e-5


def test_zero_terminal_snr_refuses_samplers_without_the_option(editor_and_pipe):
    model, _ = editor_and_pipe
    config = dict(model.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    for name in ("pndm", "lms", "heun"):  # their configs have no such option: they would sample with other betas
        with pytest.raises(ValueError, match="zero terminal SNR; choose one of euler_a, euler, ddim"):
            make_scheduler(name, config)


def test_edit_rejects_bad_inputs(editor_and_pipe):
    model, _ = editor_and_pipe
    with pytest.raises(ValueError, match="multiple of 2"):
        edit(model, torch.zeros(1, 3, 15, 16), ["x"], steps=1, progress=False)
    with pytest.raises(ValueError, match="instructions"):
        edit(model, torch.zeros(2, 3, 16, 16), ["x"], steps=1, progress=False)
    with pytest.raises(ValueError, match="scheduler='nope'"):
        make_scheduler("nope", model.scheduler.config)


def test_editor_model_is_a_plain_container(editor_and_pipe):
    model, _ = editor_and_pipe
    assert isinstance(model, EditorModel)
    assert model.vae_scale_factor == 2 and model.latent_channels == 4


def test_importing_diffusers_pipelines_through_ip2p_prints_no_torchvision_notice():
    # transformers warns once per image processor that it falls back to the PIL version without torchvision;
    # ip2p does not use torchvision, so the package drops exactly that notice (a fresh interpreter: warn-once state).
    code = "import ip2p\nfrom diffusers import StableDiffusionInstructPix2PixPipeline\nimport ip2p.eval.clip\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "requires torchvision" not in out.stderr + out.stdout
    # The filter is that narrow: other warnings of the same logger still pass.
    logger = logging.getLogger("transformers.utils.import_utils")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "another notice", None, None)
    assert all(f.filter(record) for f in logger.filters)


def test_a_hub_id_without_network_reads_the_hub_cache_at_once_or_says_why_it_cannot(tmp_path, monkeypatch,
                                                                                     tiny_editor_dir):
    # No network: the id is looked up in the local hub cache only (no half minute of retries), and a miss says so.
    import shutil
    import socket

    import huggingface_hub.constants

    from ip2p import models

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--editor" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_editor_dir, snapshot)
    (cache / "models--someone--editor" / "refs").mkdir()
    (cache / "models--someone--editor" / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert models.hub_unreachable()
    components, _ = models.load_components("someone/editor")
    expected, _ = models.load_components(str(tiny_editor_dir))
    assert all(torch.equal(a, b) for a, b in zip(components["unet"].state_dict().values(),
                                                 expected["unet"].state_dict().values()))
    with pytest.raises(FileNotFoundError, match=r"cannot be reached from this machine.*hf download someone/other"):
        models.load_components("someone/other")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the proxy resolves names: not known here
    assert not models.hub_unreachable()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_steps_a_sampler_cannot_take_are_refused_before_sampling(name):
    """DDIM, DDPM and PNDM index past the training timesteps (IndexError) and DPM++/UniPC give NaN from 1000 steps of
    a 1000-timestep model; the sigma samplers take any number."""
    from ip2p.sampling import ANY_STEPS, sample

    scheduler = make_scheduler(name, tiny.SD_SCHEDULER_CONFIG)
    calls = []

    def denoiser(x, t):
        calls.append(t)
        return x * 0.1

    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sample(denoiser, scheduler, noise, steps=999, progress=False)).all()
    calls.clear()
    if issubclass(SCHEDULERS[name], ANY_STEPS):
        assert torch.isfinite(sample(denoiser, scheduler, noise, steps=1000, progress=False)).all()
    else:
        with pytest.raises(ValueError, match=r"steps=1000 is too many .* at most 999 .* euler_a, euler, lms, heun"):
            sample(denoiser, scheduler, noise, steps=1000, progress=False)
        assert calls == []
