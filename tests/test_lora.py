"""LoRA fine-tuning (train.lora_rank): adapters on the attention projections and the whole conv_in, merged on export."""

import json

import numpy as np
import pytest
import test_training
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from PIL import Image
from safetensors.torch import load_file
from test_training import max_diff, torchrun_train, unet_weights

import train
from ip2p import tiny
from ip2p.lora import LoRALinear, add_lora, merge_lora
from ip2p.models import expand_conv_in, load_components

# test_training's fixtures: a clean accelerate state for every test (autouse), and the small dataset.
_fresh_accelerate_state = test_training._fresh_accelerate_state
data_dir = test_training.data_dir


def unet_and_inputs():
    unet = tiny.tiny_unet(layout="small", in_channels=8).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 8, 8, 8)
    context = torch.randn(2, 6, unet.config.cross_attention_dim)
    return unet, (x, torch.tensor(10), context)


def test_adapters_start_as_the_base_and_merge_into_the_same_function():
    unet, (x, t, context) = unet_and_inputs()
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=context).sample
    wrapped = add_lora(unet, rank=2, alpha=4)
    assert wrapped == sum(isinstance(m, LoRALinear) for m in unet.modules()) > 0
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.startswith("conv_in.") for n in trainable)
    assert {"conv_in.weight", "conv_in.bias"} <= trainable
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample, before)  # B = 0 at the start
        for m in unet.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
        adapted = unet(x, t, encoder_hidden_states=context).sample
        assert (adapted - before).abs().max() > 1e-3
        assert merge_lora(unet) == wrapped and not any(isinstance(m, LoRALinear) for m in unet.modules())
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample, adapted, atol=1e-5, rtol=1e-4)


def test_targets_that_name_nothing_are_refused():
    unet, _ = unet_and_inputs()
    with pytest.raises(ValueError, match=r"train.lora_targets=\['to_nothing'\] names no linear layer"):
        add_lora(unet, rank=2, targets=["to_nothing"])


def overrides(out, data_dir, *extra):
    return [f"output_dir={out}", "model.pretrained=tiny", f"data.path={data_dir}", "data.resolution=16",
            "data.random_resize=[16,20]", "data.num_workers=0", "train.batch_size=4", "train.max_steps=4",
            "train.lr=1e-2", "train.checkpoint_every=2", "train.log_every=1", "trackers=[]",
            "train.final_single_file=false", "train.lora_rank=2", *extra]


def test_lora_run_trains_only_adapters_and_conv_in_exports_a_whole_model_and_resumes(tmp_path, data_dir):
    full = tmp_path / "full"
    assert train.main(overrides(full, data_dir)) == 0
    exported = unet_weights(full / "final")
    base_unet = load_components("tiny")[0]["unet"]
    expand_conv_in(base_unet, 4)
    base_weights = base_unet.state_dict()
    assert exported.keys() == base_weights.keys()  # merged: no adapter tensors, the base's own layout
    changed = {k for k in exported if not torch.equal(exported[k], base_weights[k].to(exported[k].dtype))}
    assert "conv_in.weight" in changed and any(".to_q." in k for k in changed)
    assert all(k.startswith("conv_in.") or any(f".{t}." in k for t in ("to_q", "to_k", "to_v", "to_out"))
               for k in changed), sorted(changed)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(full / "final")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("x", image=torch.rand(1, 3, 16, 16), num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(image).all()
    # Checkpoints keep the adapters apart, and a resumed run ends where the uninterrupted one did.
    assert any(".lora_A." in k for k in load_file(full / "checkpoints" / "step-000004" / "model.safetensors"))
    part = tmp_path / "part"
    assert train.main(overrides(part, data_dir, "train.max_steps=2")) == 0
    assert train.main(overrides(part, data_dir, "resume=latest")) == 0
    assert max_diff(unet_weights(part / "final"), exported) <= 1e-6


def test_the_adapter_file_alone_rebuilds_the_exported_model_on_its_base(tmp_path, data_dir, tiny_base_dir, photo,
                                                                       caplog):
    from ip2p.models import load_editor

    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.max_steps=2", "model.prediction_type=sample")) == 0
    adapter = out / "final.lora.safetensors"
    keys = load_file(adapter).keys()
    assert {"conv_in.weight", "conv_in.bias"} < keys and all(k.startswith("conv_in.") or ".lora_" in k for k in keys)
    rebuilt = load_editor("tiny", lora=adapter, expand=False)
    exported = load_editor(out / "final", expand=False)
    assert max_diff(rebuilt.unet.state_dict(), exported.unet.state_dict()) <= 1e-6
    # The run's scheduler comes with the adapters (this run predicted x0; the base predicts noise).
    assert rebuilt.scheduler.config.prediction_type == exported.scheduler.config.prediction_type == "sample"
    assert "were trained on" not in caplog.text
    # The same architecture (and here the same weights) from another place: applied, with a word that it differs.
    elsewhere = load_editor(tiny_base_dir, lora=adapter, expand=False)
    assert max_diff(elsewhere.unet.state_dict(), exported.unet.state_dict()) <= 1e-6
    assert f"were trained on tiny; applying them to {tiny_base_dir}" in caplog.text
    with pytest.raises(ValueError, match="does not fit this base model: .*trained on 'tiny': pass that"):
        load_editor("tiny-sd", lora=adapter)
    with pytest.raises(ValueError, match="is not an ip2p LoRA adapter"):
        load_editor("tiny", lora=next((out / "final" / "unet").glob("*.safetensors")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_editor("tiny", lora=tmp_path / "absent.safetensors")
    for merged in (out / "final", out / "final.safetensors"):  # the adapters would be applied a second time
        with pytest.raises(ValueError, match="already merged in; use it alone, or pass the base"):
            load_editor(merged, lora=adapter)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(adapter), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(adapter)
    name = next(k for k in sorted(tensors) if k.endswith(".lora_A.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])  # another rank than the header's
    save_file(tensors, tmp_path / "bad.safetensors", metadata=header)
    with pytest.raises(ValueError, match=f"lacks or shapes otherwise \\(e.g. {name.removesuffix('.lora_A.weight')}"):
        load_editor("tiny", lora=tmp_path / "bad.safetensors")
    # infer.py: the base and the adapter make the same picture as the exported model.
    import infer

    common = ["--image", str(photo), "--instruction", "x", "--steps", "2", "--seed", "3", "--quiet",
              "--resolution", "24"]
    assert infer.main(["--checkpoint", "tiny", "--lora", str(adapter), "--output", str(tmp_path / "a.png"),
                       *common]) == 0
    assert infer.main(["--checkpoint", str(out / "final"), "--output", str(tmp_path / "b.png"), *common]) == 0
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("a.png", "b.png"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert json.loads((tmp_path / "a.json").read_text())["lora"] == str(adapter)
    # eval: the same scores from the base and the adapter as from the exported model.
    from ip2p.eval.__main__ import main as evaluate

    scores = []
    for model in (["--checkpoint", "tiny", "--lora", str(adapter)], ["--checkpoint", str(out / "final")]):
        folder = tmp_path / f"eval{len(scores)}"
        assert evaluate([*model, "--data", str(data_dir), "--limit", "2", "--steps", "1", "--output",
                         str(folder)]) == 0
        metrics = json.loads((folder / "metrics.json").read_text())  # settings name the checkpoint: left out
        scores.append({split: {k: v for k, v in m.items() if k != "settings"} for split, m in metrics.items()})
    assert scores[0] == scores[1] and scores[0]["test_heldout_combinations"]["n"] == 2
    # A later run of the whole UNet in the same folder removes the adapters, which are not its model.
    assert train.main(overrides(out, data_dir, "train.max_steps=2", "train.lora_rank=0")) == 0
    assert not adapter.exists()


def test_resuming_a_lora_run_as_a_full_one_is_explained(tmp_path, data_dir, caplog):
    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.max_steps=2")) == 0
    assert train.main(overrides(out, data_dir, "train.lora_rank=0", "resume=latest")) == 2
    assert "train.lora_rank" in caplog.text


def test_two_processes_train_the_same_adapters_as_one(tmp_path, data_dir):
    """torchrun (gloo, 2 CPU processes, half the batch each): DDP with a frozen UNet and trained adapters."""
    common = ("train.max_steps=2", "train.checkpoint_every=0", "train.lr=1e-3", "train.adam_eps=1e-4")
    one = tmp_path / "one"
    assert train.main(overrides(one, data_dir, *common)) == 0
    two = tmp_path / "two"
    torchrun_train(overrides(two, data_dir, *common, "train.batch_size=2"))
    assert max_diff(unet_weights(one / "final"), unet_weights(two / "final")) <= 1e-5


def test_resuming_with_another_alpha_is_refused_and_the_same_scale_resumes(tmp_path, data_dir, caplog):
    """alpha / rank scales what the adapters add: another alpha changes the saved model's function at once."""
    out = tmp_path / "run"
    assert train.main(overrides(out, data_dir, "train.max_steps=2")) == 0
    assert train.main(overrides(out, data_dir, "train.lora_alpha=8", "resume=latest")) == 2
    assert "train.lora_alpha" in caplog.text
    assert train.main(overrides(out, data_dir, "train.lora_alpha=2", "resume=latest")) == 0  # 0 means alpha = rank


def test_an_empty_target_list_fails_when_the_config_loads():
    from ip2p.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.lora_targets is empty"):
        load_config(None, ["model.pretrained=tiny", "train.lora_rank=2", "train.lora_targets=[]"])


def test_lora_settings_without_a_rank_are_said_to_do_nothing(tmp_path, data_dir, caplog):
    assert train.main(overrides(tmp_path / "run", data_dir, "train.lora_rank=0", "train.lora_alpha=8",
                                "train.max_steps=1")) == 0
    assert "train.lora_rank=0 trains the whole UNet" in caplog.text


@pytest.mark.parametrize("damage", ["conv_in_bias", "scheduler_config", "scale_source_latent", "config_not_object"])
def test_a_damaged_adapter_file_is_a_one_line_value_error_naming_it(tmp_path, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ip2p.lora import load_adapter, save_adapter

    unet = tiny.tiny_unet(layout="small", in_channels=8)
    add_lora(unet, 2)
    good = save_adapter(unet, tmp_path / "good.safetensors", base="tiny", scheduler_config={"beta_start": 0.001})
    with safe_open(str(good), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(good)
    if damage == "conv_in_bias":
        tensors["conv_in.bias"] = tensors["conv_in.bias"][:3].contiguous()
    else:
        header[damage.replace("config_not_object", "scheduler_config")] = "[1]" if damage.endswith("object") else "{x"
    save_file(tensors, tmp_path / "bad.safetensors", metadata=header)
    match = ("its conv_in is .* with bias \\(3,\\)" if damage == "conv_in_bias" else
             "has no valid rank, alpha, scheduler_config or scale_source_latent in its header")
    with pytest.raises(ValueError, match=f"--lora '{tmp_path / 'bad.safetensors'}'.*{match}"):
        load_adapter(tiny.tiny_unet(layout="small", in_channels=8), tmp_path / "bad.safetensors")


def test_an_adapter_path_that_is_a_folder_is_said_to_be_one(tmp_path):
    from ip2p.lora import load_adapter

    with pytest.raises(ValueError, match=f"--lora '{tmp_path}' is a folder; pass the final.lora.safetensors file"):
        load_adapter(tiny.tiny_unet(layout="small", in_channels=8), tmp_path)
