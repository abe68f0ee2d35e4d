"""The tiny CLIP whose text tower can be the built-in task's text encoder (ip2p.scene_clip, base text options)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ip2p import base, scene_clip, tiny

TEXT = scene_clip.TextPretraining(steps=150, batch_size=64, scenes=256, lr=3e-3)
SPEC = base.BaseSpec(text_pretraining=TEXT)


def test_pooled_text_averages_up_to_the_first_end_token():
    encoder = tiny.tiny_text_encoder(50, max_length=8)
    eos = encoder.config.eos_token_id
    ids = torch.tensor([[3, 4, 5, eos, eos, eos, eos, eos], [6, eos, eos, eos, eos, eos, eos, eos]])
    states = encoder(ids)[0]
    pooled = scene_clip.pooled_text(encoder, ids, eos)
    torch.testing.assert_close(pooled[0], states[0, :4].mean(0))
    torch.testing.assert_close(pooled[1], states[1, :2].mean(0))


@pytest.fixture(scope="module")
def trained():
    images, ids = base.captioned_scenes(TEXT.scenes, scene_clip.TEXT_SEED_BASE, SPEC, workers=1, progress=False)
    tokenizer = tiny.tiny_tokenizer(base._words(SPEC), max_length=SPEC.text_max_length)
    encoder = tiny.tiny_text_encoder(len(tokenizer), seed=2, hidden_size=32, max_length=32)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder, report = scene_clip.pretrain_text_encoder(encoder, images, ids, TEXT, progress=False, heldout=64)
    return encoder, report, before


def test_contrastive_training_learns_to_match_captions_to_scenes(trained):
    encoder, report, before = trained
    # 64 held-out scenes in one batch: chance is 1/64. Colour words alone should lift it well above that.
    assert report["retrieval_before"] < 0.1
    assert report["retrieval"] >= 3 * max(report["retrieval_before"], 1 / 64)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_too_few_scenes_is_a_clear_error():
    encoder = tiny.tiny_text_encoder(50, max_length=8)
    images = np.zeros((10, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="need more than 64 scenes"):
        scene_clip.pretrain_text_encoder(encoder, images, np.zeros((10, 8), np.int64), TEXT, heldout=64)


def test_text_encoder_file_round_trip_and_base(trained, tmp_path):
    encoder, report, _ = trained
    key = base.text_key(SPEC)
    cached = tmp_path / f"text-{base._digest(key)}.safetensors"
    scene_clip.save_text_encoder(encoder, cached, key=key, report=report)
    loaded, header = scene_clip.load_text_encoder(cached)
    assert header["report"]["retrieval"] == report["retrieval"]
    ids = torch.randint(0, 40, (2, 32))
    torch.testing.assert_close(loaded(ids)[0], encoder(ids)[0])
    # build_base finds the cached encoder (no training) and ships it as the pipeline's text encoder.
    out = base.build_base(tmp_path / "base", SPEC, progress=False)
    from transformers import CLIPTextModel

    shipped = CLIPTextModel.from_pretrained(out / "text_encoder")
    torch.testing.assert_close(shipped(ids)[0], encoder(ids)[0])
    meta = base.read_base_meta(out)
    assert meta["text_report"]["retrieval"] == report["retrieval"]
    assert meta["spec"]["text_pretraining"] == json.loads(json.dumps(TEXT.__dict__))
    # Another training setting is another key.
    other = replace(SPEC, text_pretraining=replace(TEXT, steps=151))
    assert not scene_clip.matches(cached, base.text_key(other))
    assert base.BaseSpec.from_dict(SPEC.to_dict()) == SPEC


def test_default_base_has_no_pretrained_text_encoder():
    assert base.BaseSpec().text_pretraining is None
    assert "and" not in base._words(base.BaseSpec()) and "and" in base._words(SPEC)


def test_text_cli_writes_a_file_that_build_finds(tmp_path):
    out = tmp_path / "text.safetensors"
    options = ["--text-steps", "3", "--text-scenes", "1100", "--text-batch-size", "8"]
    assert base.main(["text", "--out", str(out), *options]) == 0
    header = scene_clip.read_text_encoder_header(out)
    spec = base.BaseSpec(text_pretraining=scene_clip.TextPretraining(steps=3, scenes=1100, batch_size=8))
    assert header["key"] == json.loads(json.dumps(base.text_key(spec)))
    assert header["report"]["heldout_scenes"] == scene_clip.HELDOUT_SCENES and header["report"]["steps"] == 3
    with pytest.raises(SystemExit):  # bad options are one parser error, as for the other commands
        base.main(["text", "--out", str(out), "--text-steps", "many"])
    stamp = out.stat().st_mtime_ns
    assert base.main(["text", "--out", str(out), *options]) == 0  # already there: not trained or written again
    assert out.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):  # the UNet's options are not the text encoder's
        base.main(["text", "--out", str(out), "--unet-channels", "32,64", *options])
