"""The CLIP tokenizer of Stable Diffusion, built offline from the BPE file that open-clip-torch ships.

Every SD text encoder (CLIP ViT-L/14 in SD1.x, OpenCLIP ViT-H in SD2.x, both in SDXL) uses the same
49,408-token BPE vocabulary; only the padding token differs. Building it here means wb never has to
fetch ``openai/clip-vit-large-patch14`` from the Hugging Face hub.

The tokenizer is built in memory (``CLIPTokenizer(vocab=..., merges=...)``), so there is no cache folder
to write and nothing for concurrent processes to race on. In transformers 5 ``CLIPTokenizer`` *is* the
fast, tokenizers-backed class (``CLIPTokenizerFast`` is an alias of it; the slow Python one is gone).

Known difference from open_clip's ``SimpleTokenizer``: open_clip first runs ``ftfy.fix_text`` and
``html.unescape`` on the text, the HF tokenizer only NFC-normalises, collapses whitespace and lower-cases.
Plain text gives identical ids; curly quotes, HTML entities (``&amp;``), full-width letters and mojibake do
not. The diffusers pipelines use the HF behaviour, so that is what wb uses too.
"""

import functools
import gzip
import importlib.util
import json
import os
from pathlib import Path

from transformers import CLIPTokenizer

from workbench.errors import WorkbenchError

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merge rules of the file: 256 byte tokens + 256 "</w>" byte tokens
# + merges + 2 specials = 49,408.
NUM_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77

# Pad token per (architecture, diffusers tokenizer folder). SD1.x and SDXL's first tokenizer come from
# OpenAI CLIP (pad = <|endoftext|>, id 49407); SD2.x and SDXL's tokenizer_2 come from OpenCLIP, whose
# tokenize() pads with zeros, i.e. "!" (id 0).
SD_PAD_TOKENS: dict[tuple[str, str], str] = {
    ("sd15", "tokenizer"): EOS_TOKEN,
    ("sd21", "tokenizer"): "!",
    ("sdxl", "tokenizer"): EOS_TOKEN,
    ("sdxl", "tokenizer_2"): "!",
}


def pad_token_for(arch: str, folder: str = "tokenizer") -> str:
    """The pad token of the tokenizer in `folder` ("tokenizer" or "tokenizer_2") of `arch`."""
    try:
        return SD_PAD_TOKENS[(arch, folder)]
    except KeyError:
        known = ", ".join(f"{a}/{f}" for a, f in SD_PAD_TOKENS)
        raise WorkbenchError(f"no tokenizer {arch}/{folder}; known: {known}") from None


def bpe_path() -> Path:
    """Path of open_clip's BPE merges file.

    Found with find_spec rather than by importing open_clip: the import pulls in torch and timm (~3 s)
    and we only need a data file next to its __init__.py.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"open-clip-torch is not installed; the CLIP tokenizer is built from its {BPE_FILENAME}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILENAME


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    The order of this dict is the order of the first 256 vocabulary entries, so it must stay exactly
    as in CLIP: the printable latin-1 ranges first, then the remaining bytes mapped to 256 + n.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, code_points), strict=True))


@functools.lru_cache(maxsize=4)
def _bpe_tables(path: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of CLIP from the gzipped BPE file; parsed once per process (~60 ms)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise RuntimeError(f"cannot read the CLIP BPE file {path}: {err}") from err
    # Line 0 is a header ("#version: 0.2" behind the gzip member name); CLIP uses the next NUM_MERGES.
    merge_lines = lines[1 : NUM_MERGES + 1]
    merges = tuple(tuple(line.split()) for line in merge_lines)
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(
            f"the CLIP BPE file {path} is truncated or malformed: "
            f"expected {NUM_MERGES} merge rules of two symbols after the header"
        )
    byte_chars = list(_bytes_to_unicode().values())
    tokens = (
        byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    )
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # duplicates would silently shift every later id
        raise RuntimeError(
            f"the CLIP BPE file {path} gives {len(vocab)} distinct tokens, expected {VOCAB_SIZE}"
        )
    return vocab, merges


@functools.lru_cache(maxsize=8)
def _clip_tokenizer_cached(pad_token: str, model_max_length: int) -> CLIPTokenizer:
    return _build_clip_tokenizer(pad_token, model_max_length)


def clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """The CLIP tokenizer of Stable Diffusion, padding with `pad_token` (see SD_PAD_TOKENS).

    Cached per arguments. The returned object is shared: copy.deepcopy it before add_tokens()
    (textual inversion, pivotal tuning) so the new tokens do not leak into every other caller.
    """
    return _clip_tokenizer_cached(pad_token, model_max_length)


def _build_clip_tokenizer(pad_token: str, model_max_length: int) -> CLIPTokenizer:
    path = bpe_path()
    vocab, merges = _bpe_tables(str(path))
    if pad_token not in vocab:
        raise WorkbenchError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    tok = CLIPTokenizer(
        vocab=dict(vocab),  # a copy: the cached tables must stay untouched
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    # Set a non-default pad token after construction: passing pad_token="!" to the constructor makes "!"
    # an added special token, which the tokenizer then splits out of the text ("!!!" becomes three id-0
    # tokens instead of the single token 995 OpenCLIP was trained with; diffusers issue #4153).
    # Assigning it afterwards only sets pad_token_id = 0.
    if pad_token != EOS_TOKEN:
        tok.pad_token = pad_token
    _check_clip_tokenizer(tok, path, pad_token)
    return tok


def _check_clip_tokenizer(tok: CLIPTokenizer, path: Path, pad_token: str) -> None:
    """Refuse a broken tokenizer: transformers 5 will quietly build an empty one from bad inputs."""
    problems = []
    if len(tok) != VOCAB_SIZE:
        problems.append(f"{len(tok)} tokens instead of {VOCAB_SIZE}")
    if (tok.bos_token_id, tok.eos_token_id) != (VOCAB_SIZE - 2, VOCAB_SIZE - 1):
        problems.append(f"bos/eos ids {tok.bos_token_id}/{tok.eos_token_id} instead of 49406/49407")
    if tok.pad_token != pad_token:
        problems.append(f"pad token {tok.pad_token!r} instead of {pad_token!r}")
    if problems:
        raise RuntimeError(f"CLIP tokenizer built from {path} is wrong: {'; '.join(problems)}")


def save_clip_tokenizer(
    folder: str | os.PathLike,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Path:
    """Write a diffusers-style tokenizer folder and return its path.

    Holds what save_pretrained writes (tokenizer.json, tokenizer_config.json) plus the classic
    vocab.json / merges.txt, so older transformers (slow CLIPTokenizer) and other tools can read it too.

    Caveat for pad_token="!": transformers registers the pad token as a special token when it loads a
    folder, so a tokenizer reloaded with from_pretrained splits "!" out of prompts exactly like the
    official SD2 / SDXL tokenizer_2 folders do (diffusers #4153). clip_tokenizer("!") does not.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # A freshly built tokenizer, not the cached one: transformers stores the backend's last padding and
    # truncation settings in tokenizer.json, and the cached object may have been used (or extended).
    tok = _build_clip_tokenizer(pad_token, model_max_length)
    tok.save_pretrained(folder)
    vocab, merges = _bpe_tables(str(bpe_path()))
    _write_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False, indent=2) + "\n")
    _write_atomic(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename so a concurrent reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
