"""CLIP's byte-level BPE tokenizer, on the ``tokenizers`` library (Rust), offline.

Two vocabulary formats are read:

* a diffusers / transformers ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt``, or the
  ``tokenizer.json`` transformers 5 writes instead (+ the special tokens and length from
  ``special_tokens_map.json`` / ``tokenizer_config.json`` where present);
* OpenAI's original ``bpe_simple_vocab_16e6.txt.gz`` (the file the ``open-clip-torch`` wheel ships;
  ``CLIPTokenizer.from_bpe_file()`` finds it there without importing open_clip).

Two text clean-ups, because the two anchors differ:

* ``clean="transformers"`` (folders): NFC, runs of whitespace to one space, Unicode lower case per
  character -- what ``transformers.CLIPTokenizer`` and so every diffusers pipeline does;
* ``clean="clip"`` (the ``.gz`` file): OpenAI CLIP / open_clip's ``ftfy.fix_text``, HTML entities
  unescaped twice, whitespace collapsed, Python ``str.lower()`` (needs ``ftfy``).

Then CLIP's split (``'s 't 're 've 'm 'll 'd``, runs of letters, single digits, runs of other
non-space characters; ``transformers`` also reads its special tokens (start, end, pad) written in a
prompt as those tokens, open_clip as text), bytes to GPT-2's printable characters, BPE with the ``</w>`` end-of-word
suffix. ``tokenizer(texts)`` gives ``(B, max_length)`` int32 ids: ``<|startoftext|>``, at most
``max_length - 2`` text tokens, ``<|endoftext|>``, then the pad token.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import json
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["CLIPTokenizer", "TokenizerFileError", "bytes_to_unicode", "default_bpe_file", "CLIP_SPLIT"]

PathLike = Union[str, os.PathLike]

#: CLIP's pre-tokenisation pattern (Unicode classes; applied after lower-casing)
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_BPE_MERGES = 49152 - 256 - 2   # merges CLIP uses from bpe_simple_vocab_16e6.txt.gz (vocabulary 49408)


class TokenizerFileError(ValueError):
    """A tokenizer folder or vocabulary file that is missing or malformed (the message says which and why)."""


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in vocabulary order (ids 0..255).

    Printable Latin-1 bytes map to themselves; the other 68 bytes to U+0100 onwards, in byte order.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def default_bpe_file() -> Optional[Path]:
    """``bpe_simple_vocab_16e6.txt.gz`` from an installed open_clip (not imported), or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerFileError(f"cannot read {path}: {e}") from None


def _token_text(value) -> Optional[str]:
    """A special token as written in special_tokens_map.json / tokenizer_config.json (a string or {content})."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _parse_merges(lines: Sequence[str], where: str) -> List[Tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(f"{where}, line {n}: a merge is two symbols separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> Tuple[dict, List[Tuple[str, str]]]:
    """(vocab, merges) of a ``tokenizers`` BPE file (merges as "a b" strings or [a, b] pairs)."""
    model = _read_json(path).get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise TokenizerFileError(f"{path} is not a CLIP tokenizer (a BPE model with the '</w>' end-of-word "
                                 f"suffix), got model type {model.get('type')!r}")
    raw = model.get("merges") or []
    lines = [m if isinstance(m, str) else " ".join(m) for m in raw]
    return model.get("vocab") or {}, _parse_merges(lines, str(path))


#: tokenizer_config.json key recording a clean-up other than transformers' (``save`` / ``from_folder``)
_CLEAN_KEY = "ms_diffusion_clean"


class CLIPTokenizer:
    """Text -> CLIP token ids (see the module docstring).

    ``vocab``: token -> id (must hold ``bos_token``, ``eos_token``, ``pad_token``); ``merges``: BPE merges
    in priority order; ``max_length``: the context length (77 for every CLIP text encoder).
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[Tuple[str, str]], *, bos_token: str = BOS,
                 eos_token: str = EOS, pad_token: Optional[str] = None, max_length: int = 77,
                 clean: str = "transformers"):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        if clean not in ("transformers", "clip"):
            raise ValueError(f"clean must be 'transformers' or 'clip', got {clean!r}")
        if clean == "clip" and importlib.util.find_spec("ftfy") is None:
            raise ImportError("clean='clip' (OpenAI CLIP's text clean-up) needs ftfy: pip install ftfy")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens (>= 2), got {max_length}")
        pad_token = eos_token if pad_token is None else pad_token
        missing = [t for t in (bos_token, eos_token, pad_token) if t not in vocab]
        if missing:
            raise TokenizerFileError(f"the vocabulary has no {', '.join(map(repr, missing))} token")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id, self.eos_id, self.pad_id = (self.vocab[t] for t in (bos_token, eos_token, pad_token))
        self.max_length = int(max_length)
        self.clean = clean

        model = BPE(vocab=self.vocab, merges=self.merges, end_of_word_suffix="</w>", unk_token=eos_token,
                    fuse_unk=False)
        tok = Tokenizer(model)
        if clean == "transformers":
            tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                   normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        if clean == "transformers":
            # transformers reads its special tokens written in a prompt as those tokens (SD 2.x's pad token
            # "!" too: "!!!" is three of them there); open_clip (whose own names for the start / end tokens are
            # <start_of_text> / <end_of_text>) reads all of them as text
            tok.add_special_tokens(list(dict.fromkeys([bos_token, eos_token, pad_token])))
        self._tok = tok

    # ------------------------------------------------------------------ construction from files

    @classmethod
    def from_folder(cls, folder: PathLike, *, max_length: Optional[int] = None) -> "CLIPTokenizer":
        """A diffusers / transformers ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``, else ``tokenizer.json``;
        special tokens and ``model_max_length`` from ``special_tokens_map.json`` / ``tokenizer_config.json``)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerFileError(f"tokenizer folder {folder} does not exist")
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        if (folder / "tokenizer.json").is_file() and not (vocab_path.is_file() and merges_path.is_file()):
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            for path in (vocab_path, merges_path):
                if not path.is_file():
                    raise TokenizerFileError(f"{folder} is not a CLIP tokenizer folder: {path.name} is missing (a "
                                             f"diffusers pipeline's tokenizer/ holds vocab.json and merges.txt, or "
                                             f"tokenizer.json)")
            vocab = _read_json(vocab_path)
            merges = _parse_merges(merges_path.read_text(encoding="utf-8").splitlines(), str(merges_path))
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise TokenizerFileError(f"{folder}: the vocabulary is not a JSON object of token -> integer id")
        special: Dict[str, Optional[str]] = {"bos_token": BOS, "eos_token": EOS, "pad_token": None}
        length, clean = 77, "transformers"
        for name in ("tokenizer_config.json", "special_tokens_map.json"):   # the second wins, as transformers
            path = folder / name
            if not path.is_file():
                continue
            config = _read_json(path)
            for key in special:
                value = _token_text(config.get(key))
                if value is not None:
                    special[key] = value
            if isinstance(config.get("model_max_length"), int) and config["model_max_length"] <= 4096:
                length = config["model_max_length"]
            clean = config.get(_CLEAN_KEY, clean)      # written by save() for open_clip's clean-up
        return cls(vocab, merges, max_length=max_length or length, clean=clean, **special)

    @classmethod
    def from_bpe_file(cls, path: Optional[PathLike] = None, *, max_length: int = 77, pad_token: str = "!",
                      clean: str = "clip") -> "CLIPTokenizer":
        """OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (default: the one open-clip-torch ships).

        Ids as OpenAI CLIP / open_clip: the 256 byte characters, the same with ``</w>``, the first 48894
        merges, ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407; padding with id 0 (``"!"``), as they do.
        """
        if path is None:
            path = default_bpe_file()
            if path is None:
                raise TokenizerFileError("no bpe_simple_vocab_16e6.txt.gz given and open-clip-torch is not installed; "
                                         "pass its path, or pip install --no-deps open-clip-torch")
        path = Path(path)
        try:
            lines = gzip.open(path).read().decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise TokenizerFileError(f"cannot read the CLIP BPE file {path}: {e}") from None
        merges = _parse_merges(lines[1:_BPE_MERGES + 1], str(path))
        if len(merges) != _BPE_MERGES:
            raise TokenizerFileError(f"{path}: {len(merges)} merges, CLIP's vocabulary needs {_BPE_MERGES}")
        chars = list(bytes_to_unicode().values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad_token=pad_token, max_length=max_length,
                   clean=clean)

    def save(self, folder: PathLike) -> Path:
        """Write a diffusers / transformers ``tokenizer/`` folder (vocab.json, merges.txt, special tokens)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
                                           encoding="utf-8")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                   "unk_token": self.eos_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        config = dict(special, model_max_length=self.max_length, tokenizer_class="CLIPTokenizer")
        if self.clean != "transformers":
            config[_CLEAN_KEY] = self.clean
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return folder

    def fingerprint(self) -> str:
        """sha256 (hex) of everything that decides the ids: vocabulary, merges, special tokens, length, clean-up.
        Equal fingerprints tokenize every prompt alike."""
        state = [sorted(self.vocab.items(), key=lambda kv: (kv[1], kv[0])), [list(m) for m in self.merges],
                 self.bos_token, self.eos_token, self.pad_token, self.max_length, self.clean]
        return hashlib.sha256(json.dumps(state, ensure_ascii=False).encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _cleaned(self, text: str) -> str:
        if self.clean == "transformers":
            return text
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> List[int]:
        """The text's token ids, without start / end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt is a str, got {type(text).__name__}")
        return self._tok.encode(self._cleaned(text), add_special_tokens=False).ids

    def __call__(self, texts: Union[str, Sequence[str]], max_length: Optional[int] = None) -> np.ndarray:
        """``(B, max_length)`` int32: start token, the first ``max_length - 2`` text tokens, end token, padding."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.max_length if max_length is None else int(max_length)
        if length < 2:
            raise ValueError(f"max_length must be >= 2, got {length}")
        cleaned = [self._cleaned(t) if isinstance(t, str) else t for t in texts]
        bad = [type(t).__name__ for t in cleaned if not isinstance(t, str)]
        if bad:
            raise TypeError(f"prompts are str, got {bad[0]}")
        out = np.full((len(cleaned), length), self.pad_id, np.int32)
        for row, enc in zip(out, self._tok.encode_batch(cleaned, add_special_tokens=False)):
            ids = [self.bos_id] + enc.ids[:length - 2] + [self.eos_id]
            row[:len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (start, end and pad tokens dropped; ``</w>`` read as a word end)."""
        drop = {self.bos_id, self.eos_id, self.pad_id} if self.pad_token in (self.bos_token, self.eos_token) \
            else {self.bos_id, self.eos_id}
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]   # padding may be a real token ("!"): stop at the end token
        text = self._tok.decode([i for i in ids if i not in drop], skip_special_tokens=False)
        return " ".join(text.replace("</w>", " ").split())
