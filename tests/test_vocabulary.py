from __future__ import annotations

from collections import Counter

import pytest

from updown.data.vocabulary import AnswerVocabulary, Vocabulary, tokenize_caption


def test_special_tokens_have_fixed_distinct_indices():
    vocabulary = Vocabulary.from_counts(Counter({"dog": 9, "cat": 9, "a": 20, "rare": 2}), min_count=5)
    assert vocabulary.tokens[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert (vocabulary.pad_index, vocabulary.unk_index, vocabulary.bos_index, vocabulary.eos_index) == (
        0,
        1,
        2,
        3,
    )
    # Most frequent first, ties alphabetical; words under min_count are left out.
    assert vocabulary.tokens[4:] == ["a", "cat", "dog"]


def test_encode_decode_round_trip_and_unknown_words():
    vocabulary = Vocabulary(["<pad>", "<unk>", "<bos>", "<eos>", "a", "dog"])
    indices = vocabulary.encode(["a", "zebra", "dog"])
    assert indices == [2, 4, 1, 5, 3]
    assert vocabulary.decode([*indices, 0, 0]) == ["a", "<unk>", "dog"]
    assert vocabulary.decode([4, 3, 5]) == ["a"]  # stops at <eos>


def test_save_load_and_bad_files(tmp_path):
    vocabulary = Vocabulary(["<pad>", "<unk>", "<bos>", "<eos>", "x"])
    vocabulary.save(tmp_path / "v.json")
    assert Vocabulary.from_file(tmp_path / "v.json") == vocabulary
    (tmp_path / "bad.json").write_text('{"tokens": ["a", "<pad>"]}')
    with pytest.raises(ValueError, match="bad.json.*must start with"):
        Vocabulary.from_file(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="empty.json: vocabulary JSON is empty"):
        Vocabulary.from_file(tmp_path / "empty.json")
    (tmp_path / "broken.json").write_text('{"tokens": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        Vocabulary.from_file(tmp_path / "broken.json")


def test_answer_vocabulary_rejects_the_empty_answer(tmp_path):
    with pytest.raises(ValueError, match="empty string"):
        AnswerVocabulary(["yes", ""])
    answers = AnswerVocabulary(["yes", "no", "2"])
    answers.save(tmp_path / "a.json")
    loaded = AnswerVocabulary.from_file(tmp_path / "a.json")
    assert loaded == answers and loaded.index("no") == 1 and loaded.index("maybe") == -1


def test_tokenize_caption():
    assert tokenize_caption("A Dog, on the man's bed.\n") == ["a", "dog", "on", "the", "man's", "bed"]
