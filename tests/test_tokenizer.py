"""The offline CLIP tokenizer must give the ids open_clip (and so the SD text encoders) were trained on."""

import copy
import gzip
import os
import subprocess
import sys

import pytest

from workbench import tokenizer as wb_tokenizer
from workbench.errors import WorkbenchError
from workbench.tokenizer import (
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    SD_PAD_TOKENS,
    VOCAB_SIZE,
    clip_tokenizer,
    pad_token_for,
    save_clip_tokenizer,
)

BOS_ID, EOS_ID, BANG_ID = 49406, 49407, 0

LONG_PROMPT = ", ".join(
    ["a highly detailed matte painting of a lighthouse on a cliff at dusk", "volumetric light"] * 8
)

# Text that open_clip's ftfy/html clean-up leaves alone (see the module docstring of workbench.tokenizer
# for the strings that differ): capitals, punctuation runs, contractions, numbers, accents, CJK, emoji.
PROMPTS = [
    "A Red  Circle",
    "a photo of an astronaut riding a horse on mars",
    "masterpiece, best quality, (red hair:1.2), [blue eyes], {{ornate}}",
    "It's 3:45pm -- 100% sure!!! Isn't it? We'll see; they'd know, I'm sure you've heard.",
    "café crème brûlée, naïve Zoë, ÉCOLE ÜBER straße",
    "東京タワーの夜景, 서울, Москва",
    "emoji party 🐱🚀✨ and a snowman ☃",
    "  leading spaces\ttabs\nand\n\nnewlines   ",
    "1234567890 v2.1 SDXL_1.0 user@example.com #hashtag $5 a/b\\c",
    "! !! !!! wow!",
    LONG_PROMPT,
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    open_clip_tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    return open_clip_tokenizer_module.SimpleTokenizer()


def test_vocabulary_size_and_special_ids():
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok.bos_token_id == BOS_ID
    assert tok.eos_token_id == EOS_ID
    assert tok.pad_token_id == EOS_ID
    assert tok.model_max_length == MODEL_MAX_LENGTH == 77
    # 0..255 bytes, 256..511 bytes + "</w>", then merges: the last merge CLIP keeps is "jeky ll</w>".
    assert tok.convert_ids_to_tokens([0, 256, 512, 49405]) == ["!", "!</w>", "in", "jekyll</w>"]
    assert tok.convert_tokens_to_ids(["!", "<|startoftext|>", "<|endoftext|>"]) == [0, BOS_ID, EOS_ID]


@pytest.mark.parametrize("pad_token", [EOS_TOKEN, "!"])
@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_match_open_clip(open_clip_tokenizer, text, pad_token):
    expected = [BOS_ID, *open_clip_tokenizer.encode(text), EOS_ID]
    assert clip_tokenizer(pad_token)(text).input_ids == expected


def test_long_prompt_is_longer_than_the_context():
    assert len(clip_tokenizer()(LONG_PROMPT).input_ids) > MODEL_MAX_LENGTH


@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_sd2_padding_and_truncation_equal_open_clip_tokenize(open_clip_tokenizer, text):
    # open_clip's __call__ is what the SD2 / SDXL-OpenCLIP training code ran: truncate to 77 keeping
    # <|endoftext|> last, then pad with zeros. With pad "!" the HF call must give the very same row.
    expected = open_clip_tokenizer(text)[0].tolist()
    got = clip_tokenizer("!")(text, padding="max_length", truncation=True, max_length=77).input_ids
    assert got == expected


@pytest.mark.parametrize("pad_token, pad_id", [(EOS_TOKEN, EOS_ID), ("!", BANG_ID)])
def test_padding_to_77_uses_the_pad_id(pad_token, pad_id):
    tok = clip_tokenizer(pad_token)
    assert tok.pad_token == pad_token
    assert tok.pad_token_id == pad_id
    enc = tok("a cat", padding="max_length", truncation=True, max_length=tok.model_max_length)
    head = [BOS_ID, 320, 2368, EOS_ID]
    assert enc.input_ids == head + [pad_id] * (77 - len(head))
    assert enc.attention_mask == [1] * len(head) + [0] * (77 - len(head))


def test_truncation_keeps_eos_last():
    ids = clip_tokenizer()(LONG_PROMPT, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID


def test_bang_pad_does_not_split_exclamation_marks():
    # Passing pad_token="!" to the CLIPTokenizer constructor would register "!" as a special token and
    # turn "!!!" (id 995) into three id-0 tokens; open_clip keeps 995.
    tok = clip_tokenizer("!")
    assert tok("!!!").input_ids == [BOS_ID, 995, EOS_ID]
    assert BANG_ID not in tok.added_tokens_decoder


def test_cached_per_arguments():
    assert clip_tokenizer() is clip_tokenizer(EOS_TOKEN, 77)
    assert clip_tokenizer("!") is not clip_tokenizer()
    assert clip_tokenizer(model_max_length=150).model_max_length == 150


def test_deep_copy_leaves_the_cached_tokenizer_alone():
    extended = copy.deepcopy(clip_tokenizer())
    extended.add_tokens(["<my-concept>"])
    assert len(extended) == VOCAB_SIZE + 1
    assert len(clip_tokenizer()) == VOCAB_SIZE


def test_unknown_pad_token_is_refused():
    with pytest.raises(WorkbenchError, match="not in the CLIP vocabulary"):
        clip_tokenizer("<pad>")


def test_pad_tokens_per_architecture():
    assert pad_token_for("sd15") == EOS_TOKEN
    assert pad_token_for("sd21") == "!"
    assert pad_token_for("sdxl", "tokenizer") == EOS_TOKEN
    assert pad_token_for("sdxl", "tokenizer_2") == "!"
    assert set(SD_PAD_TOKENS.values()) == {EOS_TOKEN, "!"}
    with pytest.raises(WorkbenchError, match="no tokenizer sd15/tokenizer_2"):
        pad_token_for("sd15", "tokenizer_2")


@pytest.mark.parametrize("pad_token", [EOS_TOKEN, "!"])
def test_saved_folder_reloads_with_transformers(tmp_path, pad_token):
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = save_clip_tokenizer(tmp_path / "tokenizer", pad_token=pad_token)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894

    ours = clip_tokenizer(pad_token)
    # No "!" here: a reloaded "!"-padded folder splits "!" out, like the official SD2 folders do.
    texts = [p for p in PROMPTS if "!" not in p]
    for reloaded in (CLIPTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)):
        assert len(reloaded) == VOCAB_SIZE
        assert reloaded.pad_token_id == ours.pad_token_id
        for text in texts:
            kwargs = {"padding": "max_length", "truncation": True, "max_length": 77}
            assert reloaded(text, **kwargs).input_ids == ours(text, **kwargs).input_ids


def test_classic_vocab_and_merges_files_alone_load(tmp_path):
    from transformers import CLIPTokenizer

    folder = save_clip_tokenizer(tmp_path / "tokenizer")
    (folder / "tokenizer.json").unlink()  # as in the original SD repos: vocab.json + merges.txt only
    reloaded = CLIPTokenizer.from_pretrained(folder)
    assert len(reloaded) == VOCAB_SIZE
    assert reloaded(PROMPTS[2]).input_ids == clip_tokenizer()(PROMPTS[2]).input_ids


def test_missing_bpe_file_is_an_error_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    monkeypatch.setattr(wb_tokenizer, "bpe_path", lambda: missing)
    with pytest.raises(RuntimeError, match="bpe_simple_vocab_16e6.txt.gz"):
        wb_tokenizer._build_clip_tokenizer(EOS_TOKEN, 77)


def test_truncated_bpe_file_is_an_error_naming_it(tmp_path, monkeypatch):
    truncated = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(wb_tokenizer.bpe_path(), "rt", encoding="utf-8") as f:
        head = f.read().split("\n")[:1000]
    with gzip.open(truncated, "wt", encoding="utf-8") as f:
        f.write("\n".join(head))
    monkeypatch.setattr(wb_tokenizer, "bpe_path", lambda: truncated)
    with pytest.raises(RuntimeError, match=r"bpe_simple_vocab_16e6\.txt\.gz is truncated"):
        wb_tokenizer._build_clip_tokenizer(EOS_TOKEN, 77)


def test_builds_offline_with_an_empty_hub_cache(tmp_path):
    # A fresh interpreter, so HF_HUB_OFFLINE is read at import time, and an empty HF_HOME, so nothing
    # could come from a previously downloaded hub snapshot either.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from workbench.tokenizer import clip_tokenizer, save_clip_tokenizer\n"
        "from transformers import CLIPTokenizer\n"
        "tok = clip_tokenizer('!')\n"
        f"folder = save_clip_tokenizer({str(tmp_path / 'tok')!r}, pad_token='!')\n"
        "again = CLIPTokenizer.from_pretrained(folder)\n"
        "assert len(tok) == len(again) == 49408\n"
        "print(tok('A Red  Circle').input_ids)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[49406, 320, 736, 7117, 49407]"
