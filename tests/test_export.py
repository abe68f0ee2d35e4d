"""Checkpoint export: the diffusers folder and the original-layout single file, read back by diffusers and by us."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

import ip2p
from ip2p import export, tiny


def _with(components, **extra):
    """The components as a plain namespace, with extra attributes such as ``scale_source_latent``."""
    return types.SimpleNamespace(**vars(components), **extra)


def assert_same_weights(want: torch.nn.Module, got: torch.nn.Module, name: str) -> None:
    """Every tensor of ``want`` is in ``got`` under the same key, bit for bit, and nothing else is."""
    a = {k.removeprefix("text_model."): v for k, v in want.state_dict().items()}
    b = {k.removeprefix("text_model."): v for k, v in got.state_dict().items()}
    assert a.keys() == b.keys(), f"{name}: key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{name}.{key} differs"


def assert_same_models(want, got) -> None:
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(want, name), got[name] if isinstance(got, dict) else getattr(got, name), name)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.fixture(scope="module")
def sd_components():
    """SD-shaped 8-channel editor; seed 7 so its weights differ from every config folder's (seed 0)."""
    return tiny.tiny_components("sd", in_channels=8, seed=7)


@pytest.fixture(scope="module")
def sd_file(sd_components, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "editor.safetensors"
    return export.save_single_file(_with(sd_components, scale_source_latent=True), path,
                                   ip2p_metadata={"lr": 1e-4, "data": {"columns": ["a", "b"]}, "out": Path("/x")})


@pytest.fixture(scope="module")
def sd_base_dir(tmp_path_factory):
    """A 4-channel SD-shaped text-to-image folder: the config an 8-channel file must still load with."""
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("sd_base"), layout="sd", in_channels=4)


# ---- diffusers folder ----------------------------------------------------------------------------------------------

def test_pipeline_folder_loads_in_diffusers_with_identical_weights_and_runs(tmp_path):
    c = tiny.tiny_components("small", in_channels=8, seed=3)
    out = export.save_pipeline_folder(_with(c, scale_source_latent=True), tmp_path / "editor",
                                      ip2p_metadata={"steps": 10, "out": tmp_path})
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out, safety_checker=None)
    assert_same_models(c, pipe)
    assert pipe.tokenizer.get_vocab() == c.tokenizer.get_vocab()
    unset = "_use_default_values"  # diffusers' bookkeeping, rewritten on every load
    assert {k: v for k, v in pipe.scheduler.config.items() if k != unset} == \
        {k: v for k, v in c.scheduler.config.items() if k != unset}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((out / "ip2p.json").read_text())
    assert meta == {"ip2p_version": ip2p.__version__, "scale_source_latent": True,
                    "ip2p_config": {"steps": 10, "out": str(tmp_path)}}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    result = pipe("make it blue", image=image, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert result.shape == (1, 32, 32, 3) and np.isfinite(result).all()
    assert _siblings(out) == []  # no temporary or old folders left beside it


def test_pipeline_folder_replaces_an_existing_one_completely(tmp_path):
    target = tmp_path / "editor"
    export.save_pipeline_folder(tiny.tiny_components("small", seed=1), target)
    (target / "stale.txt").write_text("from the old save")
    newer = tiny.tiny_components("small", seed=2)
    export.save_pipeline_folder(newer, target)
    assert not (target / "stale.txt").exists()
    assert_same_weights(newer.unet, UNet2DConditionModel.from_pretrained(target, subfolder="unet"), "unet")
    assert _siblings(target) == []


def test_pipeline_folder_refuses_to_replace_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        export.save_pipeline_folder(tiny.tiny_components("small"), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "precious"
    assert not any(p.name.startswith(f".{tmp_path.name}.") for p in tmp_path.parent.iterdir())


def test_pipeline_folder_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "editor"
    old = tiny.tiny_components("small", seed=1)
    export.save_pipeline_folder(old, target)

    def crash(self, save_directory, **kwargs):
        Path(save_directory, "unet").mkdir(parents=True)
        Path(save_directory, "unet", "diffusion_pytorch_model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionInstructPix2PixPipeline, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        export.save_pipeline_folder(tiny.tiny_components("small", seed=2), target)
    monkeypatch.undo()
    assert_same_models(old, StableDiffusionInstructPix2PixPipeline.from_pretrained(target, safety_checker=None))
    assert _siblings(target) == []


def test_pipeline_folder_swap_failure_restores_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "editor"
    old = tiny.tiny_components("small", seed=1)
    export.save_pipeline_folder(old, target)
    real_rename, calls = export.os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old moved aside; now fail to move the new one in
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        export.save_pipeline_folder(tiny.tiny_components("small", seed=2), target)
    monkeypatch.undo()
    assert len(calls) == 3 and calls[2][1] == "editor"  # the old folder was put back
    assert_same_weights(old.unet, UNet2DConditionModel.from_pretrained(target, subfolder="unet"), "unet")
    assert _siblings(target) == []


# ---- single file: layout and round trips -----------------------------------------------------------------------------

def test_single_file_round_trips_through_diffusers_from_single_file(sd_components, sd_file, tiny_sd_editor_dir):
    pipe = StableDiffusionInstructPix2PixPipeline.from_single_file(str(sd_file), config=str(tiny_sd_editor_dir),
                                                                   local_files_only=True)
    assert_same_models(sd_components, pipe)


def test_load_single_file_gives_the_same_weights_tokenizer_scheduler(sd_components, sd_file, tiny_sd_editor_dir):
    loaded = export.load_single_file(sd_file, config_dir=str(tiny_sd_editor_dir))
    assert set(loaded) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "metadata"}
    assert_same_models(sd_components, loaded)
    assert loaded["tokenizer"].get_vocab() == sd_components.tokenizer.get_vocab()
    assert type(loaded["scheduler"]) is type(sd_components.scheduler)
    assert loaded["metadata"]["scale_source_latent"] is True


def test_single_file_suffix_in_capitals_is_written_as_the_loader_reads_it(sd_components, tiny_sd_editor_dir,
                                                                           tmp_path):
    path = export.save_single_file(sd_components, tmp_path / "EDITOR.SAFETENSORS")
    assert_same_models(sd_components, export.load_single_file(path, config_dir=str(tiny_sd_editor_dir)))


def test_single_file_samples_as_its_run_trained_it(sd_components, sd_base_dir, tmp_path):
    """A file from a run with x0 prediction on zero-terminal-SNR betas, loaded with its base's (PNDM, epsilon) config
    folder, gets the run's scheduler settings, and a class that can step them: not the base's, silently."""
    from ip2p.sampling import unsupported

    run = {"config": {"model": {"prediction_type": "sample", "zero_terminal_snr": True}}, "step": 3}
    path = export.save_single_file(sd_components, tmp_path / "x0.safetensors", ip2p_metadata=run)
    scheduler = export.load_single_file(path, config_dir=str(sd_base_dir))["scheduler"]
    assert scheduler.config.prediction_type == "sample"
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert unsupported(type(scheduler), scheduler.config) is None
    base = export.load_single_file(path, config_dir=str(sd_base_dir))  # the same file, read again: stable
    assert dict(base["scheduler"].config) == dict(scheduler.config)
    plain = export.save_single_file(sd_components, tmp_path / "eps.safetensors", ip2p_metadata={"config": {}})
    kept = export.load_single_file(plain, config_dir=str(sd_base_dir))["scheduler"]
    assert type(kept) is type(sd_components.scheduler) and kept.config.prediction_type == "epsilon"


def test_single_file_uses_the_original_sd_key_names(sd_components, sd_file):
    with safe_open(str(sd_file), framework="pt") as f:
        keys = set(f.keys())
        conv_in = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert conv_in.shape == (32, 8, 3, 3)
    assert vae_q.ndim == 4 and vae_q.shape[2:] == (1, 1)  # LDM's VAE attention is 1x1 convs
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    # SD 1.x's block numbering: 12 input blocks (downsamplers at 3, 6, 9; no attention at the deepest level), and
    # upsamplers in slot 1 after attention-free blocks, slot 2 after attention.
    blocks = {".".join(k.split(".")[2:5]) for k in keys if k.startswith("model.diffusion_model.input_blocks.")}
    assert blocks == {"input_blocks.0.0", "input_blocks.1.0", "input_blocks.1.1", "input_blocks.2.0",
                      "input_blocks.2.1", "input_blocks.3.0", "input_blocks.4.0", "input_blocks.4.1",
                      "input_blocks.5.0", "input_blocks.5.1", "input_blocks.6.0", "input_blocks.7.0",
                      "input_blocks.7.1", "input_blocks.8.0", "input_blocks.8.1", "input_blocks.9.0",
                      "input_blocks.10.0", "input_blocks.11.0"}
    for key in ("input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "middle_block.1.proj_in.weight",
                "time_embed.0.weight", "out.2.weight", "input_blocks.7.0.skip_connection.weight",
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.1.0.in_layers.2.weight"):
        assert "model.diffusion_model." + key in keys, key
    assert "model.diffusion_model.output_blocks.11.2.conv.weight" not in keys  # the last level never upsamples
    for key in ("encoder.down.0.downsample.conv.weight", "decoder.up.3.upsample.conv.weight",
                "encoder.down.2.block.0.nin_shortcut.weight", "decoder.up.0.block.2.conv2.weight",
                "encoder.mid.block_2.norm1.weight", "decoder.norm_out.weight", "post_quant_conv.weight"):
        assert "first_stage_model." + key in keys, key
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in keys
    counts = sum(len(getattr(sd_components, n).state_dict()) for n in ("unet", "vae", "text_encoder"))
    assert len(keys) == counts  # every weight written once, nothing dropped


def test_eight_channel_file_loads_with_a_four_channel_config_folder(sd_components, sd_file, sd_base_dir):
    assert UNet2DConditionModel.load_config(sd_base_dir, subfolder="unet")["in_channels"] == 4
    loaded = export.load_single_file(sd_file, config_dir=str(sd_base_dir))
    assert loaded["unet"].config.in_channels == 8
    assert_same_models(sd_components, loaded)


def test_two_level_layout_maps_from_its_config_and_round_trips(tmp_path, tiny_editor_dir):
    c = tiny.tiny_components("small", in_channels=8, seed=4)
    path = export.save_single_file(c, tmp_path / "small.safetensors")
    pipe = StableDiffusionInstructPix2PixPipeline.from_single_file(str(path), config=str(tiny_editor_dir),
                                                                   local_files_only=True)
    assert_same_models(c, pipe)
    keys = set(load_file(path))
    # Attention sits on level 1 only, so its upsampler (first up level) goes in slot 2; six input blocks in all.
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys
    assert "model.diffusion_model.input_blocks.4.1.proj_in.weight" in keys
    assert not any(k.startswith("model.diffusion_model.input_blocks.6.") for k in keys)


def test_pooled_text_unet_round_trips_through_the_single_file(tmp_path):
    """A base UNet with the pooled instruction in its timestep embedding and scale-shift ResNets survives the file."""
    from ip2p import base

    c = tiny.tiny_components("small", in_channels=8, seed=4)
    c.unet = base.make_unet(base.UNetSpec(block_out_channels=(32, 32), layers_per_block=1, attention=(False, True),
                                          pooled_text=True, scale_shift=True), 4, 32, 16, seed=9)
    c.unet.register_to_config(in_channels=8)
    c.unet.conv_in = torch.nn.Conv2d(8, 32, 3, padding=1)
    config_dir = export.save_pipeline_folder(c, tmp_path / "pooled")
    path = export.save_single_file(c, tmp_path / "pooled.safetensors")
    keys = set(load_file(path))
    assert "model.diffusion_model.add_embedding.pool.k_proj.weight" in keys
    assert "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight" in keys
    loaded = export.load_single_file(path, config_dir=str(config_dir))
    assert_same_models(c, loaded)
    assert loaded["unet"].config.addition_embed_type == "text"
    x, t, text = torch.randn(1, 8, 16, 16), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.equal(c.unet(x, t, text).sample, loaded["unet"](x, t, text).sample)
    broken = {k: v for k, v in load_file(path).items() if ".add_embedding." not in k}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="lacks .* unet weights.*add_embedding"):
        export.load_single_file(tmp_path / "broken.safetensors", config_dir=str(config_dir))


def test_sd2_style_text_encoder_is_written_in_open_clip_layout(tmp_path):
    c = tiny.tiny_components("sd", in_channels=8, seed=5)
    config = c.text_encoder.config
    config.hidden_act = "gelu"  # OpenCLIP (SD 2.x) rather than OpenAI CLIP (SD 1.x)
    torch.manual_seed(6)
    c.text_encoder = CLIPTextModel(config).eval()
    config_dir = export.save_pipeline_folder(c, tmp_path / "sd2")
    path = export.save_single_file(c, tmp_path / "sd2.safetensors")
    state = load_file(path)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    fused = state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert fused.shape == (3 * config.hidden_size, config.hidden_size)
    layer = c.text_encoder.state_dict()
    prefix = "" if "encoder.layers.0.self_attn.k_proj.weight" in layer else "text_model."
    assert torch.equal(fused[config.hidden_size:2 * config.hidden_size],
                       layer[prefix + "encoder.layers.0.self_attn.k_proj.weight"])
    pipe = StableDiffusionInstructPix2PixPipeline.from_single_file(str(path), config=str(config_dir),
                                                                   local_files_only=True)
    assert_same_models(c, pipe)
    assert_same_weights(c.text_encoder, export.load_single_file(path, config_dir=str(config_dir))["text_encoder"],
                        "text_encoder")


def test_unmappable_unet_is_refused_with_a_pointer_to_the_folder_format(tmp_path):
    c = tiny.tiny_components("small", in_channels=8)
    c.unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, in_channels=8, out_channels=4, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=16)
    with pytest.raises(ValueError, match="AttnDownBlock2D.*save_pipeline_folder"):
        export.save_single_file(c, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---- single file: metadata, pickles, dtype -------------------------------------------------------------------------

def test_metadata_round_trips_without_loading_tensors(sd_file):
    with safe_open(str(sd_file), framework="pt") as f:
        raw = f.metadata()
    assert raw["format"] == "ldm" and raw["ip2p_version"] == ip2p.__version__
    assert raw["scale_source_latent"] == "true"
    meta = export.read_metadata(sd_file)
    assert meta == {"format": "ldm", "ip2p_version": ip2p.__version__, "scale_source_latent": True,
                    "ip2p_config": {"lr": 1e-4, "data": {"columns": ["a", "b"]}, "out": "/x"}}


def test_pickled_checkpoint_needs_the_explicit_flag_and_loads_only_tensors(sd_components, sd_file,
                                                                           tiny_sd_editor_dir, tmp_path):
    state = load_file(sd_file)
    ckpt = tmp_path / "editor.ckpt"
    torch.save({"state_dict": state, "global_step": 22000}, ckpt)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        export.load_single_file(ckpt, config_dir=str(tiny_sd_editor_dir))
    loaded = export.load_single_file(ckpt, config_dir=str(tiny_sd_editor_dir), allow_pickle=True)
    assert_same_models(sd_components, loaded)
    assert loaded["metadata"] == {}

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "hook": _NotATensor()}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        export.load_single_file(evil, config_dir=str(tiny_sd_editor_dir), allow_pickle=True)


def test_ema_weights_load_only_when_asked(sd_components, sd_file, tiny_sd_editor_dir, tmp_path):
    state = load_file(sd_file)
    # LDM's EMA copy of each UNet parameter, named with the dots removed; made different to tell them apart.
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + key.removeprefix("model.").replace(".", "")] = state[key] + 1
    with_ema = tmp_path / "with_ema.safetensors"
    save_file(state, with_ema)
    raw = export.load_single_file(with_ema, config_dir=str(tiny_sd_editor_dir))
    assert_same_weights(sd_components.unet, raw["unet"], "unet")
    ema = export.load_single_file(with_ema, config_dir=str(tiny_sd_editor_dir), extract_ema=True)
    assert torch.equal(ema["unet"].conv_in.weight, sd_components.unet.conv_in.weight.detach() + 1)
    with pytest.raises(ValueError, match="no EMA weights"):
        export.load_single_file(sd_file, config_dir=str(tiny_sd_editor_dir), extract_ema=True)


class _NotATensor:
    """An arbitrary object: unpickling it would mean running code from the file."""


def test_fp16_export_halves_the_file_and_loads_as_fp16(sd_components, sd_file, tiny_sd_editor_dir, tmp_path):
    half = export.save_single_file(sd_components, tmp_path / "half.safetensors", dtype=torch.float16)
    ratio = half.stat().st_size / sd_file.stat().st_size
    assert 0.45 < ratio < 0.55
    state = load_file(half)
    assert {t.dtype for t in state.values()} == {torch.float16}
    loaded = export.load_single_file(half, config_dir=str(tiny_sd_editor_dir), torch_dtype=torch.float16)
    assert loaded["unet"].dtype == torch.float16
    want = sd_components.unet.conv_in.weight.detach().half()
    assert torch.equal(loaded["unet"].conv_in.weight, want)


# ---- single file: errors and atomicity -----------------------------------------------------------------------------

def test_missing_file_is_a_file_not_found_error_naming_it(tmp_path, tiny_sd_editor_dir):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        export.load_single_file(missing, config_dir=str(tiny_sd_editor_dir))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        export.read_metadata(missing)


def test_garbage_file_is_a_value_error_naming_it(tmp_path, tiny_sd_editor_dir):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(ValueError, match="garbage.safetensors.*not a valid safetensors"):
        export.load_single_file(garbage, config_dir=str(tiny_sd_editor_dir))
    with pytest.raises(ValueError, match="garbage.safetensors"):
        export.read_metadata(garbage)
    odd = tmp_path / "weights.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"weights.txt.*expected \.safetensors"):
        export.load_single_file(odd, config_dir=str(tiny_sd_editor_dir))


def test_diffusers_layout_file_is_refused_as_the_wrong_layout(tmp_path, sd_components, tiny_sd_editor_dir):
    wrong = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd_components.unet.state_dict().items()}, wrong)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is not an original-layout.*diffusers"):
        export.load_single_file(wrong, config_dir=str(tiny_sd_editor_dir))


def test_file_missing_weights_or_wrong_config_names_what_is_missing(tmp_path, sd_file, tiny_sd_editor_dir,
                                                                    tiny_editor_dir):
    state = load_file(sd_file)
    del state["model.diffusion_model.middle_block.1.proj_in.weight"]
    short = tmp_path / "short.safetensors"
    save_file(state, short)
    with pytest.raises(ValueError, match="lacks 1 unet weights.*middle_block.1.proj_in.weight"):
        export.load_single_file(short, config_dir=str(tiny_sd_editor_dir))
    with pytest.raises(ValueError, match="--config-dir"):  # SD-shaped file, 2-level config
        export.load_single_file(sd_file, config_dir=str(tiny_editor_dir))


def test_file_weights_the_config_has_no_place_for_are_refused_not_dropped(tmp_path, sd_file, tiny_sd_editor_dir):
    """diffusers reads such a file into the config's smaller model, silently: here a UNet with two transformer layers
    per block, or a VAE with mid-block attention, read with a config that has one layer or no attention."""
    from diffusers import AutoencoderKL

    c = tiny.tiny_components("sd", in_channels=8, seed=3)
    torch.manual_seed(4)
    c.unet = UNet2DConditionModel(**dict(c.unet.config, transformer_layers_per_block=2)).eval()
    deep = export.save_single_file(c, tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match=r"holds \d+ unet weights .*no place for .*transformer_blocks\.1\."):
        export.load_single_file(deep, config_dir=str(tiny_sd_editor_dir))
    c = tiny.tiny_components("sd", in_channels=8)
    c.vae = AutoencoderKL(**dict(c.vae.config, mid_block_add_attention=False)).eval()
    no_attention = export.save_pipeline_folder(c, tmp_path / "no-attention")
    with pytest.raises(ValueError, match=r"holds \d+ vae weights .*no place for .*mid\.attn_1\."):
        export.load_single_file(sd_file, config_dir=str(no_attention))


def _with_text_layers(components, layers: int, act: str):
    config = components.text_encoder.config
    torch.manual_seed(8)
    components.text_encoder = CLIPTextModel(type(config)(**{**config.to_dict(), "num_hidden_layers": layers,
                                                            "hidden_act": act})).eval()
    return components


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])  # SD 1.x (Hugging Face names) and SD 2.x (OpenCLIP names)
def test_file_text_encoder_layers_the_config_has_no_place_for_are_refused_not_dropped(tmp_path, act):
    """diffusers' CLIP converter drops them silently: five text layers read with a three-layer config load as a
    three-layer text encoder. SD 2.x files hold one OpenCLIP layer more than diffusers' config (the penultimate layer
    conditions), which must still load."""
    config_dir = export.save_pipeline_folder(_with_text_layers(tiny.tiny_components("sd", in_channels=8), 3, act),
                                             tmp_path / "config")
    deep = export.save_single_file(_with_text_layers(tiny.tiny_components("sd", in_channels=8), 5, act),
                                   tmp_path / "deep.safetensors")
    first_unused = r"layers\.3\." if act == "quick_gelu" else r"resblocks\.4\."  # OpenCLIP's layer 3 is allowed
    with pytest.raises(ValueError, match=r"holds \d+ text_encoder weights .*no place for .*" + first_unused):
        export.load_single_file(deep, config_dir=str(config_dir))
    one_more = _with_text_layers(tiny.tiny_components("sd", in_channels=8), 4, act)
    path = export.save_single_file(one_more, tmp_path / "one-more.safetensors")
    if act == "quick_gelu":
        with pytest.raises(ValueError, match=r"holds \d+ text_encoder weights .*no place for .*layers\.3\."):
            export.load_single_file(path, config_dir=str(config_dir))
    else:
        loaded = export.load_single_file(path, config_dir=str(config_dir))["text_encoder"]
        assert loaded.config.num_hidden_layers == 3
        want = {k.removeprefix("text_model."): v for k, v in one_more.text_encoder.state_dict().items()}
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, want[key.removeprefix("text_model.")]), key


def test_file_text_encoder_extras_outside_its_layers_load_with_a_warning(tmp_path, sd_file, sd_components,
                                                                          tiny_sd_editor_dir, caplog):
    """A projection head some tools save beside SD 1.x's text encoder: diffusers reads the file, and so do we."""
    state = load_file(sd_file)
    state["cond_stage_model.transformer.text_projection.weight"] = torch.zeros(32, 32)
    path = tmp_path / "projection.safetensors"
    save_file(state, path)
    loaded = export.load_single_file(path, config_dir=str(tiny_sd_editor_dir))
    assert_same_weights(sd_components.text_encoder, loaded["text_encoder"], "text_encoder")
    assert "1 text-encoder weights have no place" in caplog.text and "text_projection" in caplog.text


def test_offline_without_config_dir_explains_the_flag(sd_file, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="--config-dir"):
        export.load_single_file(sd_file)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        export.load_single_file(sd_file, config_dir=str(tmp_path / "absent"))
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match="lacks vae, text_encoder, tokenizer, scheduler"):
        export.load_single_file(sd_file, config_dir=str(tmp_path / "partial"))


def test_an_unreachable_hub_without_the_offline_flag_fails_at_once_or_uses_the_hub_cache(sd_file, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    from ip2p import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_unreachable", lambda: True)  # no network, and the user did not say so
    monkeypatch.setattr(UNet2DConditionModel, "load_config", lambda *a, **k: pytest.fail("tried the hub"))
    with pytest.raises(ValueError, match=r"offline \(HF_HUB_OFFLINE is set or .* cannot be reached\).*--config-dir"):
        export.load_single_file(sd_file)
    # The architecture the keys point to, already in the hub cache: taken from there.
    seen = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: seen.append(repo) or "/cached")
    checkpoint = load_file(sd_file)
    assert export._config_source(None, checkpoint, Path(sd_file)) == (seen[0], True)  # read from the cache only
    assert seen == ["timbrooks/instruct-pix2pix"]


def test_unreachable_hub_architecture_is_a_clear_error(sd_file, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this model")

    monkeypatch.setattr(export, "hub_offline", lambda: False)
    monkeypatch.setattr(UNet2DConditionModel, "load_config", no_network)
    with pytest.raises(FileNotFoundError, match="architecture of .*editor.safetensors from 'org/editor' .*--config-dir"):
        export.load_single_file(sd_file, config_dir="org/editor")


def test_single_file_write_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "editor.safetensors"
    old = tiny.tiny_components("small", seed=1)
    export.save_single_file(old, target, ip2p_metadata={"v": 1})
    before = load_file(target)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export.save_single_file(tiny.tiny_components("small", seed=2), target, ip2p_metadata={"v": 2})
    after = load_file(target)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert export.read_metadata(target)["ip2p_config"] == {"v": 1}
    assert list(tmp_path.iterdir()) == [target]


def test_single_file_needs_a_safetensors_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"model.ckpt.*\.safetensors"):
        export.save_single_file(tiny.tiny_components("small"), tmp_path / "model.ckpt")


def test_exports_are_readable_as_the_umask_allows(tmp_path):
    """Other users and tools (a ComfyUI server, a container) read the checkpoint: tempfile's owner-only modes must
    not leak into the published file and folder."""
    import os

    c = tiny.tiny_components("small", seed=1)
    old = os.umask(0o022)
    try:
        single = export.save_single_file(c, tmp_path / "editor.safetensors")
        folder = export.save_pipeline_folder(c, tmp_path / "editor")
    finally:
        os.umask(old)
    assert single.stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["editor", "editor.safetensors"]


def test_config_dir_whose_tokenizer_lost_its_vocabulary_is_refused(sd_file, tiny_sd_editor_dir, tmp_path):
    import shutil

    damaged = shutil.copytree(tiny_sd_editor_dir, tmp_path / "damaged")
    (damaged / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="config_dir=.*damaged.* has a tokenizer without a vocabulary"):
        export.load_single_file(sd_file, config_dir=str(damaged))


@pytest.mark.parametrize("damaged_file", ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                          "scheduler/scheduler_config.json"])
def test_config_dir_with_a_damaged_tokenizer_or_scheduler_file_is_a_value_error_naming_it(
        sd_file, tiny_sd_editor_dir, tmp_path, damaged_file):
    import shutil

    damaged = shutil.copytree(tiny_sd_editor_dir, tmp_path / "damaged")
    (damaged / damaged_file).write_text("[1]" if damaged_file.endswith("_config.json") and "tok" in damaged_file
                                        else "{broken")
    with pytest.raises(ValueError, match="config_dir=.*damaged.* has a damaged tokenizer or scheduler"):
        export.load_single_file(sd_file, config_dir=str(damaged))


def test_sdxl_single_file_is_refused_as_sdxl(tmp_path, sd_file, tiny_sd_editor_dir):
    """SDXL keeps its two text encoders under conditioner.embedders.*: the error says SDXL, not 'no cond_stage_model'."""
    state = {k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."): v
             for k, v in load_file(sd_file).items()}
    state["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] = torch.zeros(4)
    xl = tmp_path / "sdxl.safetensors"
    save_file(state, xl)
    with pytest.raises(ValueError, match=r"sdxl.safetensors is a Stable Diffusion XL checkpoint.*SD 1\.x/2\.x"):
        export.load_single_file(xl, config_dir=str(tiny_sd_editor_dir))


@pytest.mark.parametrize("change", [
    {"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80},
    {"down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}])
def test_config_dir_of_an_architecture_no_single_file_holds_is_a_load_error(sd_file, tiny_sd_editor_dir, tmp_path,
                                                                           change):
    """An SDXL-like or otherwise unmappable config folder: the error is about reading the file with that folder, not
    advice to save a diffusers folder (the writer's message)."""
    import shutil

    other = shutil.copytree(tiny_sd_editor_dir, tmp_path / "other")
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=r"config_dir=.*other.* has a unet .*editor.safetensors.*--config-dir") as e:
        export.load_single_file(sd_file, config_dir=str(other))
    assert "save_pipeline_folder" not in str(e.value)


def test_lora_adapter_file_given_as_the_checkpoint_points_at_the_lora_flag(tmp_path, tiny_sd_editor_dir):
    """final.lora.safetensors beside final.safetensors is easily passed as --checkpoint: say it is adapters (--lora),
    not 'one diffusers component'."""
    from ip2p.lora import add_lora, save_adapter

    unet = tiny.tiny_unet("sd", in_channels=8)
    add_lora(unet, 2)
    adapter = save_adapter(unet, tmp_path / "final.lora.safetensors", base="tiny-sd", scheduler_config={})
    with pytest.raises(ValueError, match=r"final.lora.safetensors .*LoRA adapters.*--lora") as e:
        export.load_single_file(adapter, config_dir=str(tiny_sd_editor_dir))
    assert "pipeline folder" not in str(e.value)


def test_single_file_path_that_is_a_folder_is_refused_before_writing(tmp_path):
    folder = export.save_pipeline_folder(tiny.tiny_components("small"), tmp_path / "final.safetensors")
    with pytest.raises(ValueError, match=r"final.safetensors' is an existing folder; expected a file path"):
        export.save_single_file(tiny.tiny_components("small"), folder)
    assert (folder / "model_index.json").is_file() and _siblings(folder) == []
