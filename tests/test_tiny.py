"""The tiny local tokenizer: character-level by default, whole-word tokens for a given vocabulary."""

import pytest
from transformers import CLIPTokenizer

from ip2p import synthetic
from ip2p.tiny import tiny_tokenizer, write_tokenizer_files


def tokens(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[1:-1]


def test_character_level_by_default():
    assert tokens(tiny_tokenizer(), "red star") == ["r", "e", "d</w>", "s", "t", "a", "r</w>"]


def test_every_vocabulary_word_is_one_token_and_others_fall_back_to_characters(tmp_path):
    words = synthetic.vocabulary()
    for tokenizer in (tiny_tokenizer(words, max_length=32),
                      CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path, words), model_max_length=32)):
        assert tokenizer.model_max_length == 32
        for word in words:  # prefixes of one another ("to", "top"; "re...", "red") included
            assert tokens(tokenizer, word) == [f"{word}</w>"], word
        assert tokens(tokenizer, "Move the RED star, bottom-right!") == [
            "move</w>", "the</w>", "red</w>", "star</w>", ",</w>", "bottom</w>", "-</w>", "right</w>", "!</w>"]
        assert tokens(tokenizer, "sketch") == ["s", "k", "e", "t", "c", "h</w>"]  # unknown: characters


def test_vocabulary_is_the_training_phrasings_words_only():
    words = set(synthetic.vocabulary())
    assert set(synthetic.COLOURS) | set(synthetic.SHAPES) <= words
    assert {"recolour", "corner", "into", "background"} <= words
    heldout_only = {"morph", "wipe", "give", "switch", "sketch", "push", "bring", "leave", "include", "let"}
    assert not words & heldout_only


def test_bad_words_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lower-case ASCII letters; got 'Red'"):
        write_tokenizer_files(tmp_path, ["Red"])
