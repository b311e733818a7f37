"""Caption text processing: tokenizer, caption masking (MCM / MLM / MPM) and noun phrases.

Three independent parts, used by every method:

Tokenizer (`CaptionTokenizer`)
    One interface over two backends, both a `tokenizers.Tokenizer` (WordPiece) underneath: a BERT
    vocabulary read from a local directory (`from_pretrained_dir`), or a WordPiece vocabulary
    trained offline on the training captions (`train`) with BERT's special tokens and BERT-style
    normalisation and pre-tokenisation (deterministic: the same captions give the same
    vocabulary). `save` / `load` store it next to a run's checkpoint.
    Calling it gives fixed-length `[CLS] ... [SEP] [PAD]...` id tensors, and `token_lengths`: the
    number of word-piece tokens of each caption before truncation, which the adaptive margin of
    the Sew paper (Eq. (10)) reads as the caption's "total tokens length".

Masking (`mask_random`, `mask_mlm`, `choose_phrase_words`, `mask_phrase_word`)
    Pure functions on id tensors that return `(masked_ids, labels)` with labels = the original id
    at masked positions and -100 elsewhere (the ignore index of `torch.nn.functional.cross_entropy`).
    Special and padding tokens are never masked. `mask_random` and `mask_mlm` mask an exact share
    of each caption's real tokens, round(ratio * n) and at least one, instead of drawing a
    Bernoulli per token, so a short caption is never left without a target. For MPM (LAIP),
    `choose_phrase_words` draws one word inside the noun phrases and `mask_phrase_word` masks all
    of its word pieces; LAIP feeds a phrase on its own, whose single span is (0, n_words).

Noun phrases (`extract_noun_phrases`, `extract_noun_phrases_batch`, `caption_words`)
    Words come from a regex tokeniser (no NLTK data needed): a word is a run of letters/digits,
    possibly joined by inner hyphens or apostrophes ("t-shirt", "woman's"); every other
    non-space character is a word of its own (punctuation). Word indices in `NounPhrases.word_spans`
    and in `CaptionTokenizer.encode_with_words` refer to this tokenisation.
    Part-of-speech tags (Penn Treebank) come from NLTK's averaged perceptron tagger when its data
    is installed, otherwise from a built-in tagger for person descriptions (lexicon in
    `person_lexicon.txt`, typo matching, suffix rules and context rules below). NLTK data is never
    downloaded.
    Chunks come from NLTK's `RegexpParser` with this grammar (rules applied in order):

        NP: {<DT|PRP\\$>?<CD>?<JJ.*|VBN|NN.*>*<JJ.*|VBN><CC><JJ.*|VBN|NN.*>*<NN.*>}
            {<DT|PRP\\$>?<CD>?<JJ.*|VBN|NN.*>*<NN.*>}

    i.e. an optional determiner or possessive ("a", "her"), an optional number, modifiers
    (adjectives, colours, past participles such as "striped", noun modifiers such as "knee
    length"), and a head noun. The first rule keeps coordinated adjectives together ("a black and
    white striped shirt"). Determiners are kept ("a white blouse"); adverbs are not part of a
    phrase ("a very long skirt" gives "long skirt"); present participles are not modifiers, so
    "wearing a white blouse" gives "a white blouse". A phrase string is its words (original
    case) joined by single spaces. Results are cached per caption, and the chunker runs on the
    pieces of a sentence between words that no rule can chunk (see `_chunk_spans`).
"""
from __future__ import annotations

import bisect
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

if TYPE_CHECKING:  # pragma: no cover
    from tbps_lib.data.formats import Record, TBPSDataset

from tbps_lib.utils import IGNORE_INDEX, atomic_write_text  # noqa: F401 (IGNORE_INDEX: labels of unmasked positions)

BERT_SPECIAL_TOKENS: dict[str, str] = {
    "pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]",
}
"""Role -> token string; a trained vocabulary gives them the ids 0..4 in this order."""

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "caption_tokenizer.json"
_META_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
class CaptionTokenizer:
    """Fixed-length WordPiece tokenizer for captions with a uniform interface over its backends.

    Build it with `from_pretrained_dir`, `train` or `load`; the constructor wraps an existing
    `tokenizers.Tokenizer` whose post-processor adds `[CLS] ... [SEP]` (checked here).
    """

    def __init__(self, backend: Tokenizer, max_length: int,
                 special_tokens: Mapping[str, str] = BERT_SPECIAL_TOKENS, source: str = "") -> None:
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
        missing_roles = sorted(set(BERT_SPECIAL_TOKENS) - set(special_tokens))
        if missing_roles:
            raise ValueError(f"special_tokens lacks the roles {missing_roles}")
        self._backend = Tokenizer.from_str(backend.to_str())  # own copy: settings below are ours
        self._backend.no_padding()
        self._backend.no_truncation()
        self.max_length = max_length
        self.source = source
        self.special_tokens = dict(special_tokens)
        self._ids = {}
        for role, token in self.special_tokens.items():
            token_id = self._backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"special token {token!r} ({role}) is not in the vocabulary "
                                 f"of {source or 'the tokenizer'}")
            self._ids[role] = token_id
        self._check_template()

    def _check_template(self) -> None:
        """Fail early if the backend does not wrap a caption in [CLS] ... [SEP]."""
        ids = self._backend.encode("a").ids
        if len(ids) < 2 or ids[0] != self.cls_id or ids[-1] != self.sep_id:
            raise ValueError(f"tokenizer from {self.source or 'the given backend'} does not produce "
                             f"[CLS] ... [SEP] (got ids {ids}); its post-processor must add them")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike, max_length: int) -> "CaptionTokenizer":
        """Read a BERT WordPiece tokenizer from a local directory (never the network).

        The directory must hold `vocab.txt` or `tokenizer.json` (as saved by transformers).
        """
        path = Path(path)
        looked_for = ("vocab.txt", "tokenizer.json")
        if not path.is_dir():
            raise FileNotFoundError(f"BERT tokenizer directory {path} does not exist "
                                    f"(expected a folder with one of {', '.join(looked_for)})")
        if not any((path / name).is_file() for name in looked_for):
            # transformers >= 5 would silently build an empty vocabulary here
            raise FileNotFoundError(f"no BERT vocabulary in {path}: looked for {', '.join(looked_for)}")
        from transformers import BertTokenizerFast  # heavy import, only needed here

        hf = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
        specials = {"pad": hf.pad_token, "unk": hf.unk_token, "cls": hf.cls_token,
                    "sep": hf.sep_token, "mask": hf.mask_token}
        return cls(hf.backend_tokenizer, max_length, specials, source=f"pretrained:{path}")

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 8000, max_length: int = 64,
              lowercase: bool = True, min_frequency: int = 2) -> "CaptionTokenizer":
        """Train a WordPiece vocabulary on `captions` (offline), BERT-style.

        Special tokens get the ids [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. Every character seen
        in the captions is kept in the vocabulary whatever `min_frequency` is. The same captions
        always give the same vocabulary.
        """
        captions = _caption_list(captions)
        if not captions:
            raise ValueError("cannot train a tokenizer on an empty list of captions")
        if vocab_size <= len(BERT_SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the {len(BERT_SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        specials = list(BERT_SPECIAL_TOKENS.values())
        scratch = _bert_pipeline(models.WordPiece(unk_token=BERT_SPECIAL_TOKENS["unk"]), lowercase)
        # Seeding every "##c" piece as a special token fixes its id; the trainer would otherwise
        # number them in hash-map order, which breaks count ties differently on every run
        # (huggingface/tokenizers issue #1794). They become ordinary vocabulary entries below.
        seeds = _continuation_pieces(scratch, captions)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials + seeds, show_progress=False)
        scratch.train_from_iterator(captions, trainer=trainer, length=len(captions))
        vocab = scratch.get_vocab(with_added_tokens=False)
        tok = _bert_pipeline(models.WordPiece(vocab=vocab, unk_token=BERT_SPECIAL_TOKENS["unk"]), lowercase)
        tok.add_special_tokens(specials)
        source = f"trained(vocab_size={vocab_size}, captions={len(captions)}, lowercase={lowercase})"
        return cls(tok, max_length, BERT_SPECIAL_TOKENS, source=source)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `caption_tokenizer.json` (max length, special tokens) atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": _META_VERSION, "max_length": self.max_length,
                "special_tokens": self.special_tokens, "source": self.source}
        atomic_write_text(directory / TOKENIZER_FILE, self._backend.to_str())
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, max_length: int | None = None) -> "CaptionTokenizer":
        """Reload a tokenizer written by `save` (optionally with another `max_length`)."""
        directory = Path(directory)
        missing = [n for n in (TOKENIZER_FILE, META_FILE) if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"saved tokenizer in {directory} is incomplete: missing {', '.join(missing)}")
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path} is not valid JSON: {err}") from None
        for key in ("format_version", "max_length", "special_tokens"):
            if key not in meta:
                raise ValueError(f"{meta_path} lacks the field {key!r}")
        if meta["format_version"] != _META_VERSION:
            raise ValueError(f"{meta_path} has format_version {meta['format_version']}, expected {_META_VERSION}")
        backend = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        return cls(backend, max_length or meta["max_length"], meta["special_tokens"],
                   source=meta.get("source", str(directory)))

    # -- encoding -------------------------------------------------------------------------------
    def __call__(self, captions: Iterable[str]) -> dict[str, torch.Tensor]:
        """Encode captions: `input_ids`, `attention_mask` [n, max_length] and `token_lengths` [n]."""
        return self._encode(captions, with_words=False)

    def encode_with_words(self, captions: Iterable[str]) -> dict[str, torch.Tensor]:
        """As `__call__`, plus `word_ids` [n, max_length]: the `caption_words` index of the word
        each token belongs to (all sub-word pieces of a word share it), -1 at [CLS]/[SEP]/[PAD]."""
        return self._encode(captions, with_words=True)

    def _encode(self, captions: Iterable[str], with_words: bool) -> dict[str, torch.Tensor]:
        captions = _caption_list(captions)
        n, length = len(captions), self.max_length
        input_ids = np.full((n, length), self.pad_id, dtype=np.int64)
        attention = np.zeros((n, length), dtype=np.int64)
        token_lengths = np.zeros(n, dtype=np.int64)
        word_ids = np.full((n, length), -1, dtype=np.int64)
        for row, (text, enc) in enumerate(zip(captions, self._backend.encode_batch(captions))):
            ids = enc.ids
            token_lengths[row] = len(ids) - 2  # everything between [CLS] and [SEP]
            if len(ids) > length:
                ids = ids[: length - 1] + [self.sep_id]
            input_ids[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
            if with_words:
                word_ids[row, 1: len(ids) - 1] = _token_word_ids(text, enc.offsets[1: len(ids) - 1], row)
        out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
               "token_lengths": torch.from_numpy(token_lengths)}
        if with_words:
            out["word_ids"] = torch.from_numpy(word_ids)
        return out

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of one caption, without special tokens and without truncation."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (word pieces merged back into words)."""
        return self._backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Token strings of one id sequence; an id outside the vocabulary is an error."""
        tokens = []
        for token_id in _as_id_list(ids):
            token = self._backend.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
            tokens.append(token)
        return tokens

    # -- properties -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    @property
    def cls_id(self) -> int:
        return self._ids["cls"]

    @property
    def sep_id(self) -> int:
        return self._ids["sep"]

    @property
    def mask_id(self) -> int:
        return self._ids["mask"]

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that masking must never touch: [PAD] [UNK] [CLS] [SEP] [MASK]."""
        return tuple(sorted(self._ids.values()))

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, source={self.source!r})"


def _bert_pipeline(model: models.Model, lowercase: bool) -> Tokenizer:
    """A tokenizer around `model` with BERT's normaliser, pre-tokeniser, [CLS]/[SEP] template and decoder.

    The template needs the ids of [CLS]/[SEP]; before training they are not known yet, so the
    post-processor is only set when the model has a vocabulary.
    """
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_tok, sep_tok = BERT_SPECIAL_TOKENS["cls"], BERT_SPECIAL_TOKENS["sep"]
    cls_id, sep_id = tok.token_to_id(cls_tok), tok.token_to_id(sep_tok)
    if cls_id is not None and sep_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_tok} $A {sep_tok}", pair=f"{cls_tok} $A {sep_tok} $B:1 {sep_tok}:1",
            special_tokens=[(cls_tok, cls_id), (sep_tok, sep_id)])
    return tok


def _continuation_pieces(tok: Tokenizer, captions: list[str]) -> list[str]:
    """Sorted "##c" for every character c that occurs after the first one of a pre-tokenised word."""
    chars: set[str] = set()
    for caption in captions:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(caption)):
            chars.update(word[1:])
    return ["##" + c for c in sorted(chars)]


def _caption_list(captions: Iterable[str]) -> list[str]:
    """`captions` as a list, checking that it is a collection of strings (not one string)."""
    if isinstance(captions, (str, bytes)) or not isinstance(captions, Iterable):
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
    captions = list(captions)
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is a {type(caption).__name__}, not a str: {caption!r}")
    return captions


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"expected one id sequence (1-D), got a tensor of shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def _token_word_ids(text: str, offsets: Sequence[tuple[int, int]], row: int) -> list[int]:
    """Map each token (by its start character) to the index of the `caption_words` word holding it."""
    spans = [m.span() for m in _WORD_RE.finditer(text)]
    ends = [end for _, end in spans]
    out = []
    for start, _ in offsets:
        w = bisect.bisect_right(ends, start)
        if w == len(spans) or spans[w][0] > start:
            raise ValueError(f"caption {row}: the token at character {start} lies outside every word "
                             f"of {text!r}")
        out.append(w)
    return out


# ----------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------
def mask_random(input_ids: torch.Tensor, attention_mask: torch.Tensor, ratio: float, mask_id: int,
                special_ids: Iterable[int], generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masking Caption Modeling input: replace a `ratio` share of real tokens by [MASK].

    Eq. (11) of the Sew paper masks 10% of the caption tokens; the model swaps the [MASK]
    embedding for a learnable vector. Returns `(masked_ids, labels)`.
    """
    selected = _select_tokens(input_ids, attention_mask, special_ids, ratio, generator)
    masked = input_ids.masked_fill(selected, mask_id)
    return masked, _labels(input_ids, selected)


def mask_mlm(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_id: int,
             special_ids: Iterable[int], vocab_size: int, generator: torch.Generator | None = None,
             ratio: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masked language modelling input: of the selected `ratio` share of real tokens,
    80% become [MASK], 10% a random non-special token, 10% stay unchanged (all are predicted).

    Returns `(masked_ids, labels)`. Used for the MLM row of LAIP's Table V.
    """
    specials = sorted(set(int(i) for i in special_ids))
    if any(not 0 <= i < vocab_size for i in specials):
        raise ValueError(f"special_ids {specials} must lie in [0, vocab_size={vocab_size})")
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[specials] = False
    allowed = keep.nonzero().squeeze(1).to(input_ids.dtype)
    if allowed.numel() == 0:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to draw random replacements from")
    selected = _select_tokens(input_ids, attention_mask, specials, ratio, generator)
    action = _uniform(input_ids.shape, generator).to(input_ids.device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    draw = torch.randint(len(allowed), input_ids.shape, generator=generator, device=_rng_device(generator))
    random_ids = allowed[draw.cpu()].to(input_ids.device)
    masked = torch.where(to_random, random_ids, input_ids.masked_fill(to_mask, mask_id))
    return masked, _labels(input_ids, selected)


def choose_phrase_words(word_ids: torch.Tensor, word_spans: Sequence[Sequence[tuple[int, int]]],
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick, per caption, one word uniformly among the words inside its noun phrases.

    `word_spans[i]` are the `[start, end)` word ranges of caption i's phrases (e.g.
    `NounPhrases.word_spans`; a caption encoded on its own as a phrase has the single span
    `(0, n_words)`). Words cut off by truncation are not candidates. Returns a LongTensor [n]
    of word indices, -1 where a caption has no candidate.
    """
    if word_ids.dim() != 2:
        raise ValueError(f"word_ids must be [n, L], got shape {tuple(word_ids.shape)}")
    if len(word_spans) != word_ids.shape[0]:
        raise ValueError(f"word_spans has {len(word_spans)} entries for {word_ids.shape[0]} captions in word_ids")
    chosen = torch.full((word_ids.shape[0],), -1, dtype=torch.long)
    for row, spans in enumerate(word_spans):
        present = set(word_ids[row].tolist())
        candidates = sorted({w for start, end in spans for w in range(start, end)} & present - {-1})
        if candidates:
            pick = torch.randint(len(candidates), (1,), generator=generator, device=_rng_device(generator))
            chosen[row] = candidates[int(pick)]
    return chosen.to(word_ids.device)


def mask_phrase_word(input_ids: torch.Tensor, word_ids: torch.Tensor, phrase_word_index: torch.Tensor,
                     mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask Phrase Modeling input (Eq. (11) of the LAIP paper): replace every sub-word piece of
    one word per caption, `phrase_word_index[i]` (from `choose_phrase_words`), by [MASK].

    A caption with index -1 is left unmasked. Returns `(masked_ids, labels)`.
    """
    if input_ids.shape != word_ids.shape or phrase_word_index.shape != (input_ids.shape[0],):
        raise ValueError(f"shapes disagree: input_ids {tuple(input_ids.shape)}, word_ids {tuple(word_ids.shape)}, "
                         f"phrase_word_index {tuple(phrase_word_index.shape)} (expected [n, L], [n, L], [n])")
    index = phrase_word_index.to(word_ids.device).unsqueeze(1)
    selected = (word_ids == index) & (index >= 0)
    empty = (index.squeeze(1) >= 0) & ~selected.any(dim=1)
    if empty.any():
        row = int(empty.nonzero()[0])
        raise ValueError(f"caption {row}: word {int(phrase_word_index[row])} has no token in word_ids "
                         "(out of range or truncated away)")
    return input_ids.masked_fill(selected, mask_id), _labels(input_ids, selected)


def _select_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int],
                   ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bool [n, L]: :func:`select_random_tokens` among the real tokens (attended and not special)."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must be 2-D tensors of the same shape")
    specials = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=input_ids.dtype,
                            device=input_ids.device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, specials)
    return select_random_tokens(candidates, ratio, generator)


def select_random_tokens(candidates: torch.Tensor, ratio: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [n, L]: round(ratio * n_candidates) random positions among ``candidates`` per row, at least one
    (none in a row without candidates).

    Ranking per-row random scores (non-candidates last) picks an exact count without a Python loop or a
    host synchronisation. Draws come from ``generator`` (on its device), else from the global generator
    of the candidates' device.
    """
    if candidates.dim() != 2 or candidates.dtype != torch.bool:
        raise ValueError(f"candidates must be a bool [n, L] tensor, got {candidates.dtype} {tuple(candidates.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    n_real = candidates.sum(dim=1)
    n_mask = torch.clamp(torch.floor(ratio * n_real.double() + 0.5).long(), min=1)
    n_mask = torch.minimum(n_mask, n_real)
    device = generator.device if generator is not None else candidates.device
    scores = torch.rand(candidates.shape, generator=generator, device=device).to(candidates.device)
    ranks = scores.masked_fill(~candidates, 2.0).argsort(dim=1).argsort(dim=1)
    return candidates & (ranks < n_mask.unsqueeze(1))


def _uniform(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) draws on the generator's device, so results do not depend on the data's device."""
    return torch.rand(shape, generator=generator, device=_rng_device(generator))


def _rng_device(generator: torch.Generator | None) -> torch.device:
    """Draws happen where the generator lives (the CPU for the global generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def _labels(input_ids: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    return torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


# ----------------------------------------------------------------------------------------------
# Words and noun phrases
# ----------------------------------------------------------------------------------------------
_WORD_RE = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")

NP_GRAMMAR = r"""
NP: {<DT|PRP\$>?<CD>?<JJ.*|VBN|NN.*>*<JJ.*|VBN><CC><JJ.*|VBN|NN.*>*<NN.*>}
    {<DT|PRP\$>?<CD>?<JJ.*|VBN|NN.*>*<NN.*>}
"""
"""Chunk grammar of `extract_noun_phrases` (see the module docstring)."""

TAGGERS = ("auto", "builtin", "nltk-perceptron")
_NLTK_TAGGER_RESOURCES = (
    "taggers/averaged_perceptron_tagger_eng/",  # NLTK >= 3.9
    "taggers/averaged_perceptron_tagger/averaged_perceptron_tagger.pickle",  # older NLTK
)


@dataclass(frozen=True)
class NounPhrases:
    """Noun phrases of one caption, in order of appearance.

    `word_spans[k] = (start, end)` is the half-open range of `words` indices of `phrases[k]`;
    `words` is the caption's tokenisation (original case, punctuation included, as
    `caption_words(text)` before lowercasing); `tagger` names the POS tagger that ran.
    """

    phrases: tuple[str, ...]
    word_spans: tuple[tuple[int, int], ...]
    tagger: str
    words: tuple[str, ...] = ()


def caption_words(text: str, punctuation: bool = True) -> list[str]:
    """Lower-cased words of a caption (the tokenisation that word indices refer to).

    With `punctuation=False` punctuation marks are dropped (for word counts); the indices of
    the result then no longer match `NounPhrases.word_spans`.
    """
    words = [w.lower() for w in _WORD_RE.findall(text)]
    return words if punctuation else [w for w in words if w[0].isalnum() or w[0] == "_"]


def extract_noun_phrases(text: str, max_phrases: int | None = None, tagger: str = "auto") -> NounPhrases:
    """Noun phrases of a caption (the first `max_phrases` if given); results are cached.

    `tagger`: "auto" (NLTK's perceptron if its data is installed, else the built-in tagger),
    "builtin", or "nltk-perceptron" (an error if its data is missing).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
    _check_max_phrases(max_phrases)
    return _extract_cached(text, max_phrases, resolve_tagger(tagger))


def extract_noun_phrases_batch(texts: Iterable[str], max_phrases: int | None = None,
                               tagger: str = "auto") -> list[NounPhrases]:
    """`extract_noun_phrases` over many captions; repeated captions are parsed once (shared cache)."""
    texts = _caption_list(texts)
    _check_max_phrases(max_phrases)
    name = resolve_tagger(tagger)
    return [_extract_cached(text, max_phrases, name) for text in texts]


def _check_max_phrases(max_phrases: int | None) -> None:
    if max_phrases is not None and (not isinstance(max_phrases, int) or max_phrases < 1):
        raise ValueError(f"max_phrases must be a positive int or None, got {max_phrases!r}")


def clear_noun_phrase_cache() -> None:
    """Forget cached phrase extractions (e.g. after installing NLTK's tagger data)."""
    _extract_cached.cache_clear()
    _parse_spans.cache_clear()
    _nltk_tagger.cache_clear()


def resolve_tagger(tagger: str = "auto") -> str:
    """The tagger that `tagger` selects: "builtin" or "nltk-perceptron"."""
    if tagger not in TAGGERS:
        raise ValueError(f"unknown tagger {tagger!r}; choose one of {', '.join(TAGGERS)}")
    if tagger == "builtin":
        return "builtin"
    available = _nltk_tagger() is not None
    if tagger == "nltk-perceptron" and not available:
        raise LookupError("NLTK's averaged perceptron tagger data is not installed (looked for "
                          f"{' or '.join(_NLTK_TAGGER_RESOURCES)} in nltk.data.path); install it with "
                          "`python -m nltk.downloader averaged_perceptron_tagger_eng` or use tagger='builtin'")
    return "nltk-perceptron" if available else "builtin"


@functools.lru_cache(maxsize=1)
def _nltk_tagger() -> Any:
    """NLTK's PerceptronTagger if its data is installed, else None (never downloads)."""
    import nltk

    for resource in _NLTK_TAGGER_RESOURCES:
        try:
            nltk.data.find(resource)
        except LookupError:
            continue
        from nltk.tag.perceptron import PerceptronTagger

        try:
            return PerceptronTagger()
        except LookupError:
            return None
    return None


@functools.lru_cache(maxsize=1)
def _chunker():
    """The `NP_GRAMMAR` chunk parser, built once."""
    from nltk.chunk import RegexpParser  # pure regex code: needs no NLTK data

    return RegexpParser(NP_GRAMMAR)


@functools.lru_cache(maxsize=1 << 18)
def _extract_cached(text: str, max_phrases: int | None, tagger: str) -> NounPhrases:
    """Tokenise, tag and chunk one caption; `tagger` is already resolved."""
    words = _WORD_RE.findall(text)
    if tagger == "builtin":
        tags = builtin_pos_tags(words)
    else:
        tags = [tag for _, tag in _nltk_tagger().tag(words)]
    spans = _chunk_spans(tags)[:max_phrases]
    phrases = tuple(" ".join(words[start:end]) for start, end in spans)
    return NounPhrases(phrases, tuple(spans), tagger, tuple(words))


def _chunk_spans(tags: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) word ranges of the NP chunks of a tag sequence.

    No grammar rule can match a tag outside `_can_be_in_np`, so the sequence is cut at those tags
    and each piece is parsed on its own: the chunks are the same as parsing the whole sequence
    (a test checks this), and the short pieces repeat across captions, so their parses are cached.
    This makes extraction several times faster than one `RegexpParser.parse` per caption.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for i, tag in enumerate([*tags, ""]):
        if tag and _can_be_in_np(tag):
            continue
        if i > start:
            spans.extend((start + a, start + b) for a, b in _parse_spans(tuple(tags[start:i])))
        start = i + 1
    return spans


def _can_be_in_np(tag: str) -> bool:
    """Whether `NP_GRAMMAR` can put a word with this tag inside a chunk."""
    return tag in ("DT", "PRP$", "CD", "VBN", "CC") or tag.startswith(("JJ", "NN"))


@functools.lru_cache(maxsize=1 << 16)
def _parse_spans(tags: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """NP chunks of a tag sequence by one `RegexpParser.parse` (leaves carry word indices)."""
    if not tags:
        return ()
    tree = _chunker().parse([(i, tag) for i, tag in enumerate(tags)])
    spans = []
    for child in tree:
        if not isinstance(child, tuple):  # an NP subtree; plain leaves are (index, tag) tuples
            indices = [leaf[0] for leaf in child.leaves()]
            spans.append((indices[0], indices[-1] + 1))
    return tuple(spans)


# ----------------------------------------------------------------------------------------------
# Built-in tagger for person descriptions
# ----------------------------------------------------------------------------------------------
_PUNCT_TAGS = {",": ",", ".": ".", "!": ".", "?": ".", ";": ":", ":": ":", "-": ":", "(": "(",
               "[": "(", "{": "(", ")": ")", "]": ")", "}": ")", '"': "''", "'": "''", "`": "``",
               "$": "$", "#": "#", "&": "CC"}
_NUMBER_RE = re.compile(r"\d+(?:[.,/]\d+)*(?:st|nd|rd|th|s)?")
_ADJ_SUFFIXES = ("less", "ful", "ous", "ish", "ive", "able", "ible", "ical", "ic", "al", "ese", "ary")
_NP_MODIFIER_TAGS = {"JJ", "JJR", "JJS", "NN", "NNS", "VBN", "CD"}
LEXICON_PATH = Path(__file__).with_name("person_lexicon.txt")


@functools.lru_cache(maxsize=1)
def person_lexicon() -> dict[str, str]:
    """Word -> Penn Treebank tag, from `person_lexicon.txt` (package data)."""
    lexicon: dict[str, str] = {}
    for number, line in enumerate(LEXICON_PATH.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        tag, words = fields[0], fields[1:]
        for word in words:
            if word in lexicon:
                raise ValueError(f"person_lexicon.txt line {number}: {word!r} already has the tag {lexicon[word]}")
            lexicon[word] = tag
    return lexicon


def builtin_pos_tags(words: Sequence[str]) -> list[str]:
    """Penn Treebank tags from the built-in tagger.

    A word gets its lexicon tag, else the tag of the lexicon words one typo away, else a tag
    from its ending (unknown words default to nouns); then context rules fix "her" and
    participles after a determiner.
    """
    lowered = [w.lower() for w in words]
    tags = [_word_tag(w) for w in lowered]
    for i, word in enumerate(lowered):
        following = tags[i + 1] if i + 1 < len(tags) else None
        if word == "her":  # possessive before a noun phrase ("her long hair"), object otherwise
            tags[i] = "PRP$" if following in _NP_MODIFIER_TAGS else "PRP"
        elif tags[i] == "VBG" and i > 0 and tags[i - 1] in ("DT", "PRP$"):
            tags[i] = "JJ"  # "a matching jacket"
    return tags


@functools.lru_cache(maxsize=1 << 16)
def _word_tag(word: str) -> str:
    """Tag of one lower-case word out of context."""
    lexicon = person_lexicon()
    if word in lexicon:
        return lexicon[word]
    if len(word) == 1 and not word.isalnum():
        return _PUNCT_TAGS.get(word, "SYM")
    if _NUMBER_RE.fullmatch(word):
        return "CD"
    if "-" in word:  # compounds take the class of their last part; "-ed"/"-ing" ones are adjectives
        head = _word_tag(word.rsplit("-", 1)[1])
        return head if head[:2] in ("NN", "JJ", "CD") else "JJ"
    if word.endswith(("'s", "’s")):
        return "NN"  # possessive noun used as a modifier: "the woman's bag"
    return _typo_tag(word) or _suffix_tag(word)


def _typo_tag(word: str) -> str | None:
    """Tag of the lexicon word one typo away from `word` ("balck", "weairng"), or None.

    Candidates are lexicon words that share a string with `word` after deleting at most one
    character from each (symmetric deletion: this covers one insertion, deletion, substitution
    or transposition). The closest candidates win: same letters first (a transposition: "balck"
    is "black", not "back"), then same first letter ("yelow" is "yellow", not "below"), then one
    letter added or dropped ("wite" is "white", not "with"); if the winners' tags disagree the
    word is left to the suffix rules. Four-letter words only match five-letter lexicon words
    ("blck" is "black"), words under four letters never match.
    """
    if len(word) < 4 or not word.isalpha():
        return None
    index, variants = _deletion_index(), _deletions(word)
    candidates = set().union(*(index.get(v, ()) for v in variants))
    if len(word) == 4:  # too short for substitutions ("cell" is not "well"); allow a dropped letter
        candidates = {c for c in candidates if len(c) == 5}
    if not candidates:
        return None
    letters = sorted(word)

    def closeness(candidate: str) -> tuple[bool, bool, bool]:
        indel = candidate in variants or word in _deletions(candidate)
        return sorted(candidate) != letters, candidate[0] != word[0], not indel

    best = min(closeness(c) for c in candidates)
    tags = {person_lexicon()[c] for c in candidates if closeness(c) == best}
    return tags.pop() if len(tags) == 1 else None


@functools.lru_cache(maxsize=1)
def _deletion_index() -> dict[str, frozenset[str]]:
    """Each lexicon word and its one-character deletions -> the lexicon words they come from."""
    index: dict[str, set[str]] = {}
    for word in person_lexicon():
        if len(word) >= 3 and word.isalpha():
            for variant in _deletions(word):
                index.setdefault(variant, set()).add(word)
    return {variant: frozenset(words) for variant, words in index.items()}


def _deletions(word: str) -> set[str]:
    """`word` and every string obtained by deleting one of its characters."""
    return {word} | {word[:i] + word[i + 1:] for i in range(len(word))}


def _suffix_tag(word: str) -> str:
    """Guess the tag of an unknown word (rare words, typos far from the lexicon) from its ending."""
    if len(word) > 4 and word.endswith("ing"):
        return "VBG"
    if len(word) > 3 and word.endswith("ed"):
        return "VBN"
    if len(word) > 3 and word.endswith("ly"):
        return "RB"
    if len(word) > 4 and word.endswith(_ADJ_SUFFIXES):
        return "JJ"
    if len(word) > 3 and word.endswith("y") and not word.endswith(("ey", "ay", "oy", "uy")):
        return "JJ"  # "baggy", "wavy", "messy"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return "NNS"
    return "NN"


# ----------------------------------------------------------------------------------------------------------
# Caption lengths (Eq. (10) of the Sew paper reads them; data/explore.py plots them)

# T_min / T_max of the adaptive margin, Eq. (10) of the Sew paper, per real dataset (caption tokens).
PAPER_LENGTH_BOUNDS: dict[str, tuple[int, int]] = {
    "cuhk-pedes": (20, 60), "icfg-pedes": (25, 65), "rstpreid": (22, 60),
}


def caption_lengths(records: "Iterable[Record]") -> np.ndarray:
    """Word-token length of every caption (punctuation not counted), as the adaptive margin reads it."""
    return np.array([len(caption_words(c, punctuation=False)) for r in records for c in r.captions], dtype=int)


def length_bounds(ds: "TBPSDataset", lo: float = 5.0, hi: float = 95.0) -> tuple[int, int, str]:
    """(T_min, T_max, where they come from) for Eq. (10) of the Sew paper.

    A real dataset uses the paper's values; any other (the synthetic benchmark) uses the ``lo``-th and
    ``hi``-th percentiles of its training captions' token lengths, the same idea scaled to its captions.
    """
    if ds.name in PAPER_LENGTH_BOUNDS:
        t_min, t_max = PAPER_LENGTH_BOUNDS[ds.name]
        return t_min, t_max, f"Sew paper values for {ds.name}"
    lengths = caption_lengths(ds.split("train"))
    t_min, t_max = (int(round(v)) for v in np.percentile(lengths, [lo, hi]))
    return t_min, t_max, f"{lo:g}th/{hi:g}th percentiles of training caption lengths"
