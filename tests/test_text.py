"""Tests of tbps_lib.data.text: tokenizer, caption masking and noun-phrase extraction."""
from __future__ import annotations

import json
import pickle
import random
import time

import pytest
import torch

from tbps_lib.data import text
from tbps_lib.data.text import (
    IGNORE_INDEX, CaptionTokenizer, NounPhrases, builtin_pos_tags, caption_words, choose_phrase_words,
    clear_noun_phrase_cache, extract_noun_phrases, extract_noun_phrases_batch, mask_mlm, mask_phrase_word,
    mask_random, resolve_tagger,
)

CAPTIONS = [
    "A young woman with long black hair wearing a white blouse, blue jeans and carrying a red handbag.",
    "The man is wearing a grey hoodie and black shorts.",
    "A man in a black T-shirt, khaki shorts and white sneakers, carrying a backpack.",
    "She wears a pink knee-length dress and holds a phone in her left hand.",
    "The woman's hair is tied in a ponytail and she has a blue bag over her shoulder.",
] * 4

BERT_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "woman", "with", "black",
              "hair", "t", "-", "shirt", "##s", "red", "bag", "wear", "##ing", ".", ","]


@pytest.fixture(scope="module")
def trained() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=200, max_length=24)


@pytest.fixture()
def bert_dir(tmp_path):
    path = tmp_path / "bert"
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def test_trained_tokenizer_has_bert_special_ids(trained):
    assert (trained.pad_id, trained.unk_id, trained.cls_id, trained.sep_id, trained.mask_id) == (0, 1, 2, 3, 4)
    assert trained.special_ids == (0, 1, 2, 3, 4)
    assert trained.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(set(CAPTIONS)) < trained.vocab_size <= 200


def test_encoding_layout_padding_and_lengths(trained):
    long_caption = CAPTIONS[0] + " " + CAPTIONS[1]
    batch = trained(["a red bag", long_caption])
    ids, att = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == att.shape == (2, 24) and ids.dtype == att.dtype == torch.long
    n_short = len(trained.tokenize("a red bag"))
    assert ids[0, 0] == trained.cls_id and ids[0, n_short + 1] == trained.sep_id
    assert att[0].tolist() == [1] * (n_short + 2) + [0] * (24 - n_short - 2)
    assert (ids[0, n_short + 2:] == trained.pad_id).all()
    # the long caption is truncated to [CLS] + 22 pieces + [SEP]; its length is counted before truncation
    full = trained.tokenize(long_caption)
    assert len(full) > 22
    assert ids[1, -1] == trained.sep_id and att[1].all()
    assert trained.convert_ids_to_tokens(ids[1, 1:-1]) == full[:22]
    assert batch["token_lengths"].tolist() == [n_short, len(full)]


def test_training_is_deterministic_and_respects_lowercase():
    # tokenizers' own trainer numbers "##" pieces in hash order (issue #1794); ours must not vary
    vocabs = {tuple(sorted(CaptionTokenizer.train(CAPTIONS, vocab_size=150)._backend.get_vocab().items()))
              for _ in range(8)}
    assert len(vocabs) == 1
    a = CaptionTokenizer.train(CAPTIONS, vocab_size=150, max_length=16)
    cased = CaptionTokenizer.train(CAPTIONS, vocab_size=150, max_length=16, lowercase=False)
    assert "A" in cased.tokenize("A man") and "a" in a.tokenize("A man")


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "tok")
    loaded = CaptionTokenizer.load(tmp_path / "tok")
    probe = CAPTIONS[:5] + ["an unseen zebra-print scarf!", ""]
    for key, value in trained.encode_with_words(probe).items():
        assert torch.equal(value, loaded.encode_with_words(probe)[key]), key
    assert loaded.vocab_size == trained.vocab_size and loaded.special_ids == trained.special_ids
    assert CaptionTokenizer.load(tmp_path / "tok", max_length=8)(probe)["input_ids"].shape == (7, 8)
    assert not list((tmp_path / "tok").glob("*.tmp"))


def test_load_errors_name_the_path(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="caption_tokenizer.json"):
        CaptionTokenizer.load(tmp_path / "nowhere")
    trained.save(tmp_path / "tok")
    meta = tmp_path / "tok" / "caption_tokenizer.json"
    meta.write_text(json.dumps({"format_version": 1, "special_tokens": trained.special_tokens}))
    with pytest.raises(ValueError, match="lacks the field 'max_length'"):
        CaptionTokenizer.load(tmp_path / "tok")
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="caption_tokenizer.json is not valid JSON"):
        CaptionTokenizer.load(tmp_path / "tok")


def test_pretrained_dir_matches_transformers(bert_dir):
    from transformers import BertTokenizerFast

    captions = ["A woman with black hair wearing T-shirts.", "red bag, red bag, red bag, red bag", "zebra"]
    ours = CaptionTokenizer.from_pretrained_dir(bert_dir, max_length=10)
    ref = BertTokenizerFast.from_pretrained(str(bert_dir), local_files_only=True)(
        captions, padding="max_length", truncation=True, max_length=10)
    batch = ours(captions)
    assert batch["input_ids"].tolist() == ref["input_ids"]
    assert batch["attention_mask"].tolist() == ref["attention_mask"]
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 2, 3, 4, 5)
    assert ours.convert_ids_to_tokens(batch["input_ids"][0, :4]) == ["[CLS]", "a", "woman", "with"]
    assert batch["token_lengths"].tolist() == [12, 11, 1]  # "zebra" is one [UNK]


def test_pretrained_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionTokenizer.from_pretrained_dir(tmp_path / "missing", max_length=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no BERT vocabulary in .*empty.*vocab\.txt, tokenizer\.json"):
        CaptionTokenizer.from_pretrained_dir(tmp_path / "empty", max_length=8)


def test_word_ids_align_pieces_with_caption_words(bert_dir):
    tok = CaptionTokenizer.from_pretrained_dir(bert_dir, max_length=16)
    caption = "A woman wearing T-shirts, red bags."
    batch = tok.encode_with_words([caption, ""])
    words = caption_words(caption)
    assert words == ["a", "woman", "wearing", "t-shirts", ",", "red", "bags", "."]
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0])
    n = int(batch["attention_mask"][0].sum())
    got = list(zip(tokens[1:n - 1], batch["word_ids"][0, 1:n - 1].tolist()))
    assert got == [("a", 0), ("woman", 1), ("wear", 2), ("##ing", 2), ("t", 3), ("-", 3), ("shirt", 3),
                   ("##s", 3), (",", 4), ("red", 5), ("bag", 6), ("##s", 6), (".", 7)]
    assert (batch["word_ids"][0, [0, n - 1]] == -1).all() and (batch["word_ids"][0, n:] == -1).all()
    assert (batch["word_ids"][1] == -1).all()


def test_decode_and_token_lookup(trained):
    ids = trained(["a man is wearing a grey hoodie"])["input_ids"][0]
    assert trained.decode(ids) == "a man is wearing a grey hoodie"
    assert trained.decode(ids, skip_special_tokens=False).startswith("[CLS]")
    with pytest.raises(ValueError, match="token id 99999 is outside the vocabulary"):
        trained.convert_ids_to_tokens([99999])
    with pytest.raises(ValueError, match="one id sequence"):
        trained.decode(torch.zeros(2, 3, dtype=torch.long))


def test_bad_tokenizer_input(trained):
    with pytest.raises(TypeError, match="list of strings"):
        trained("a single caption")
    with pytest.raises(TypeError, match="caption 1 is a int"):
        trained(["fine", 3])
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        CaptionTokenizer.train(CAPTIONS, max_length=1)
    with pytest.raises(ValueError, match="empty list of captions"):
        CaptionTokenizer.train([])


def test_tokenizer_pickles(trained):
    clone = pickle.loads(pickle.dumps(trained))
    assert torch.equal(clone(CAPTIONS)["input_ids"], trained(CAPTIONS)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------
SPECIAL = (0, 1, 2, 3, 4)  # PAD UNK CLS SEP MASK


def random_batch(n: int, length: int, seed: int, min_real: int = 0, vocab: int = 100):
    """[CLS] w... [SEP] [PAD]... rows with a random number of real tokens (about 5% of them [UNK])."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(min_real, length - 1, (n, 1), generator=g)
    pos = torch.arange(length).unsqueeze(0)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    ids[torch.rand(n, length, generator=g) < 0.05] = 1
    ids[:, 0] = 2
    ids = torch.where(pos == real + 1, torch.full_like(ids, 3), ids)
    att = (pos <= real + 1).long()
    return ids * att, att


def real_tokens(ids, att):
    return att.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))


def test_mask_random_invariants():
    ids, att = random_batch(300, 40, seed=0)
    ids[0, 1], ids[0, 2:], att[0, 2:] = 3, 0, 0  # "[CLS] [SEP]": a caption with no real token
    masked, labels = mask_random(ids, att, 0.1, 4, SPECIAL, torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    real = real_tokens(ids, att)
    assert not (selected & ~real).any()  # never special or padding
    assert torch.equal(selected, masked != ids)  # labels exactly where masked
    assert (masked[selected] == 4).all() and torch.equal(labels[selected], ids[selected])
    n_real = real.sum(1)
    expected = torch.where(n_real > 0, torch.clamp(torch.floor(0.1 * n_real + 0.5), min=1), 0)
    assert selected.sum(1).tolist() == expected.long().tolist()
    assert selected[0].sum() == 0


def test_mask_random_is_deterministic_and_ratio_holds():
    ids, att = random_batch(2000, 64, seed=2, min_real=20)
    first = mask_random(ids, att, 0.1, 4, SPECIAL, torch.Generator().manual_seed(7))
    again = mask_random(ids, att, 0.1, 4, SPECIAL, torch.Generator().manual_seed(7))
    other = mask_random(ids, att, 0.1, 4, SPECIAL, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    share = (first[1] != IGNORE_INDEX).sum() / real_tokens(ids, att).sum()
    assert abs(float(share) - 0.1) < 0.01


def test_mask_random_rejects_bad_arguments():
    ids, att = random_batch(4, 10, seed=3)
    with pytest.raises(ValueError, match="ratio must be in"):
        mask_random(ids, att, 0.0, 4, SPECIAL)
    with pytest.raises(ValueError, match="same shape"):
        mask_random(ids, att[:, :5], 0.1, 4, SPECIAL)


def test_mask_mlm_80_10_10():
    ids, att = random_batch(3000, 64, seed=4, min_real=20, vocab=1000)
    masked, labels = mask_mlm(ids, att, mask_id=4, special_ids=SPECIAL, vocab_size=1000,
                              generator=torch.Generator().manual_seed(5))
    selected = labels != IGNORE_INDEX
    real = real_tokens(ids, att)
    assert not (selected & ~real).any() and torch.equal(labels[selected], ids[selected])
    assert not ((masked != ids) & ~selected).any()
    assert abs(float(selected.sum() / real.sum()) - 0.15) < 0.01
    n = float(selected.sum())
    to_mask = float((masked[selected] == 4).sum()) / n
    unchanged = float((masked[selected] == ids[selected]).sum()) / n
    swapped = masked[selected & (masked != 4) & (masked != ids)]
    assert abs(to_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02
    assert abs(swapped.numel() / n - 0.1) < 0.02
    assert not torch.isin(swapped, torch.tensor(SPECIAL)).any() and (swapped < 1000).all()
    again = mask_mlm(ids, att, mask_id=4, special_ids=SPECIAL, vocab_size=1000,
                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(masked, again[0])


def test_phrase_word_masking_covers_every_piece(bert_dir):
    tok = CaptionTokenizer.from_pretrained_dir(bert_dir, max_length=16)
    captions = ["A woman wearing T-shirts and a red bag.", "red bag"]
    batch = tok.encode_with_words(captions)
    t_shirts = caption_words(captions[0]).index("t-shirts")
    masked, labels = mask_phrase_word(batch["input_ids"], batch["word_ids"], torch.tensor([t_shirts, -1]),
                                      tok.mask_id)
    pieces = batch["word_ids"][0] == t_shirts
    assert int(pieces.sum()) == 4  # t - shirt ##s
    ids = batch["input_ids"][0]
    assert (masked[0, pieces] == tok.mask_id).all() and torch.equal(masked[0, ~pieces], ids[~pieces])
    assert torch.equal(labels[0, pieces], ids[pieces]) and (labels[0, ~pieces] == IGNORE_INDEX).all()
    assert torch.equal(masked[1], batch["input_ids"][1]) and (labels[1] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="caption 1: word 9 has no token"):
        mask_phrase_word(batch["input_ids"], batch["word_ids"], torch.tensor([0, 9]), tok.mask_id)


def test_choose_phrase_words_stays_inside_phrases(bert_dir):
    tok = CaptionTokenizer.from_pretrained_dir(bert_dir, max_length=8)
    captions = ["A woman with black hair and a red bag", "a woman", "black hair"]
    batch = tok.encode_with_words(captions)
    # caption 0 keeps 6 words after truncation: "red bag" (words 7-8) is cut away
    spans = [[(0, 2), (3, 5), (6, 9)], [], [(0, 2)]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([choose_phrase_words(batch["word_ids"], spans, g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {0, 1, 3, 4}
    assert set(draws[:, 1].tolist()) == {-1}
    assert set(draws[:, 2].tolist()) == {0, 1}
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = choose_phrase_words(batch["word_ids"], spans, g1)
    assert torch.equal(first, choose_phrase_words(batch["word_ids"], spans, g2))
    with pytest.raises(ValueError, match="word_spans has 2 entries for 3 captions"):
        choose_phrase_words(batch["word_ids"], spans[:2])


# ---------------------------------------------------------------------------------------------
# Words and noun phrases
# ---------------------------------------------------------------------------------------------
def test_caption_words():
    assert caption_words("The woman's T-shirt (light-blue), 2 bags!") == [
        "the", "woman's", "t-shirt", "(", "light-blue", ")", ",", "2", "bags", "!"]
    assert caption_words("Red shoes, white  socks.", punctuation=False) == ["red", "shoes", "white", "socks"]
    assert caption_words("") == []


@pytest.mark.parametrize("caption, phrases", [
    ("a young woman with long black hair wearing a white blouse, blue jeans and carrying a red handbag",
     ["a young woman", "long black hair", "a white blouse", "blue jeans", "a red handbag"]),
    ("The man is wearing a grey hoodie and black shorts.", ["The man", "a grey hoodie", "black shorts"]),
    ("A woman wearing a black and white striped shirt, a knee-length skirt and her long hair in a ponytail.",
     ["A woman", "a black and white striped shirt", "a knee-length skirt", "her long hair", "a ponytail"]),
    ("He is carrying a backpack on his back and holding a cell phone in his left hand.",
     ["a backpack", "his back", "a cell phone", "his left hand"]),
    # typos and unknown words still chunk: unknown words default to nouns, "-y" words to adjectives
    ("The lady has a very long skirt, a whte shrit and a wavy blak jaket with two pokets.",
     ["The lady", "long skirt", "a whte shrit", "a wavy blak jaket", "two pokets"]),
    ("Pedestrian in a light-grey coat walks behind her.", ["Pedestrian", "a light-grey coat"]),
    ("", []),
])
def test_noun_phrases_builtin(caption, phrases):
    result = extract_noun_phrases(caption, tagger="builtin")
    assert list(result.phrases) == phrases and result.tagger == "builtin"
    assert [w.lower() for w in result.words] == caption_words(caption)
    assert [" ".join(result.words[a:b]) for a, b in result.word_spans] == phrases


def test_builtin_tagger_rules():
    assert builtin_pos_tags(["holding", "her", "phone", "behind", "her", "."]) == [
        "VBG", "PRP$", "NN", "IN", "PRP", "."]
    assert builtin_pos_tags(["a", "matching", "jacket"]) == ["DT", "JJ", "NN"]
    assert builtin_pos_tags(["zigzagged", "wavy", "shrits", "sleeveless", "two-tone", "well-dressed", "3rd"]) == [
        "VBN", "JJ", "NNS", "JJ", "NN", "JJ", "CD"]


def test_builtin_tagger_reads_through_typos():
    typos = ["balck", "yelow", "wite", "weairng", "wmoan", "craries", "jaket", "blck"]
    assert builtin_pos_tags(typos) == ["JJ", "JJ", "JJ", "VBG", "NN", "VBZ", "NN", "JJ"]
    assert text._typo_tag("cel") is None and text._typo_tag("tell") is None  # too short to guess from
    # "trhee" is a transposition of both "three" (CD) and "there" (EX): left to the suffix rules
    assert text._typo_tag("trhee") is None and builtin_pos_tags(["trhee"]) == ["NN"]
    result = extract_noun_phrases("A young wmoan weairng a balck jaket and whtie sneakrs.", tagger="builtin")
    assert result.phrases == ("A young wmoan", "a balck jaket", "whtie sneakrs")


def test_max_phrases_and_argument_errors():
    caption = CAPTIONS[0]
    first_two = extract_noun_phrases(caption, max_phrases=2, tagger="builtin").phrases
    assert first_two == ("A young woman", "long black hair")
    with pytest.raises(ValueError, match="max_phrases must be a positive int"):
        extract_noun_phrases(caption, max_phrases=0)
    with pytest.raises(ValueError, match="unknown tagger 'spacy'"):
        extract_noun_phrases(caption, tagger="spacy")
    with pytest.raises(TypeError, match="text must be a str"):
        extract_noun_phrases(None)


def test_batch_matches_single_and_caches():
    batch = extract_noun_phrases_batch(CAPTIONS, tagger="builtin")
    assert batch == [extract_noun_phrases(c, tagger="builtin") for c in CAPTIONS]
    assert batch[0] is batch[5]  # the repeated caption is parsed once
    assert isinstance(batch[0], NounPhrases) and isinstance(batch[0].phrases, tuple)


def whole_sentence_spans(tags):
    """Reference: one RegexpParser.parse over the full tag sequence."""
    tree = text._chunker().parse([(i, t) for i, t in enumerate(tags)])
    return [(c.leaves()[0][0], c.leaves()[-1][0] + 1) for c in tree if not isinstance(c, tuple)]


def test_segmented_chunking_equals_whole_sentence_parse():
    rng = random.Random(0)
    tag_set = ["DT", "PRP$", "CD", "JJ", "JJR", "VBN", "NN", "NNS", "NNP", "CC", "IN", "VBG", "VBZ", ",", ".",
               "RB", "PRP"]
    for _ in range(400):
        tags = [rng.choice(tag_set) for _ in range(rng.randint(0, 30))]
        assert text._chunk_spans(tags) == whole_sentence_spans(tags), tags


@pytest.fixture()
def fresh_cache():
    clear_noun_phrase_cache()
    yield
    clear_noun_phrase_cache()


def test_auto_uses_builtin_without_nltk_data(fresh_cache, monkeypatch):
    import nltk

    def missing(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", missing)
    assert resolve_tagger("auto") == "builtin"
    assert extract_noun_phrases(CAPTIONS[1]).tagger == "builtin"
    with pytest.raises(LookupError, match="averaged_perceptron_tagger.*tagger='builtin'"):
        extract_noun_phrases(CAPTIONS[1], tagger="nltk-perceptron")


def test_nltk_perceptron_path(fresh_cache, monkeypatch):
    from nltk.tag.perceptron import PerceptronTagger

    tagger = PerceptronTagger(load=False)
    training = [[(w, t) for w, t in zip(text._WORD_RE.findall(c), builtin_pos_tags(text._WORD_RE.findall(c)))]
                for c in CAPTIONS[:5]]
    random.seed(0)  # PerceptronTagger.train shuffles with the global random module
    tagger.train(training, nr_iter=5)
    monkeypatch.setattr(text, "_nltk_tagger", lambda: tagger)
    result = extract_noun_phrases(CAPTIONS[1])
    assert result.tagger == "nltk-perceptron" and resolve_tagger() == "nltk-perceptron"
    assert result.phrases == ("The man", "a grey hoodie", "black shorts")


def test_lexicon_rejects_duplicates(monkeypatch, tmp_path):
    bad = tmp_path / "lexicon.txt"
    bad.write_text("# comment\nNN bag\nJJ red bag\n", encoding="utf-8")
    monkeypatch.setattr(text, "LEXICON_PATH", bad)
    with pytest.raises(ValueError, match="line 3: 'bag' already has the tag NN"):
        text.person_lexicon.__wrapped__()
    assert text.person_lexicon()["handbag"] == "NN"  # the shipped lexicon loads


def test_extraction_speed(fresh_cache):
    """Loose guard against a slow path (the measured rate is in the report, far above this)."""
    rng = random.Random(1)
    pool = "a the black white red blue long short striped hair shirt jeans bag shoes with and wearing , .".split()
    captions = [" ".join(rng.choice(pool) for _ in range(25)) for _ in range(2000)]
    start = time.process_time()  # CPU time: robust to other jobs sharing the machine
    extract_noun_phrases_batch(captions, tagger="builtin")
    assert time.process_time() - start < 4.0
