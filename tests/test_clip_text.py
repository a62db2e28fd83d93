"""CLIP text side against its anchors: the tokenizer against transformers' CLIPTokenizer and open_clip's
SimpleTokenizer (the real 49408-token vocabulary the open-clip-torch wheel ships), the text encoder against
transformers' CLIPTextModel[WithProjection] and open_clip's text tower (tiny random configurations, fp32)."""
import json

import mindspore as ms
import numpy as np
import pytest

from ms_diffusion.interop.clip import (text_encoder_from_transformers, text_encoder_kwargs_from_open_clip,
                                       text_encoder_kwargs_from_transformers, text_encoder_plan,
                                       transformers_text_config)
from ms_diffusion.interop.torch_io import write_weights
from ms_diffusion.io.state import load_arrays_into
from ms_diffusion.text import CLIPTokenizer, TokenizerFileError
from ms_diffusion.text.clip import CLIPTextModel
from tests.anchors import open_clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_FIXED = [
    '', ' ', 'a photo of a cat', 'A PHOTO OF A CAT', '  leading and   trailing\t\nspace  ',
    'an astronaut riding a horse on mars, highly detailed, 8k, artstation', "Tom's & Jerry's café — naïve!!!",
    "don't you'll we've they're I'm she'd it's", '1234567890 3.14159 1e-5 -42 #1 @user 100%', '日本語のテキストと中文文本',
    'emoji 🐱🐶🚀👩\u200d🚀 and flags 🇫🇷', 'ΟΔΟΣ Σίσυφος', 'İstanbul straße ÉCOLE', "e\u0301cole vs \u00e9cole",
    '\xa0non\u2009breaking\u3000spaces', 'tabs\tand\r\nnewlines', '((masterpiece)), [bad]',
    'C++ / C# / F# <html> {json: 1}', 'a<|endoftext|>b <|startoftext|>', '...,,,;;;:::!!!???', "'''quoted'''",
    "x" * 200, "word " * 120, "ab" * 90, "🙂" * 40, 'мир труд май', 'العربية نص', 'हिन्दी पाठ', '한국어 텍스트',
    'mixed123abc456', 'UPPER lower MiXeD', '\u200bzero\u200bwidth', 'ﬁligree ligatures', 'ｆｕｌｌｗｉｄｔｈ',
    'Tom &amp; Jerry &lt;3 &amp;amp;', 'cafÃ© mojibake', 'x_x snake_case ~tilde~',
]
_POOL = (list("abcdefghijklmnopqrstuvwxyz") * 4 + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("0123456789")
         + list(" " * 30) + list(".,;:!?'\"()[]{}-_/\\&*#%+=<>|~`^$@") + list("éèêëàâäîïôöùûüçñßøåæœ")
         + list("αβγδσςΩЖЯж中文字日本語한국") + ["\t", "\n", "\u00a0", "🙂", "🚀", "’", "“", "”", "–", "…"])


def _prompts():
    """A few hundred varied prompts: the fixed ones and seeded random strings of letters, digits, punctuation,
    accents, other scripts, emoji and unusual whitespace, of every length up to several hundred characters."""
    rng = np.random.default_rng(0)
    out = list(_FIXED)
    for n in range(270):
        length = int(rng.choice([3, 10, 30, 80, 300])) + int(rng.integers(0, 20))
        out.append("".join(rng.choice(_POOL, length)))
    return out


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def simple_tokenizer():
    return open_clip("tokenizer").SimpleTokenizer()


def clip_tokenizer_folder(folder, pad_token=None):
    """A transformers tokenizer folder (vocab.json + merges.txt, model_max_length 77) written from open_clip's
    vocabulary tables -- the real CLIP vocabulary, not ours; ``pad_token="!"``: SD 2.x's special tokens."""
    simple = open_clip("tokenizer").SimpleTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if pad_token is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": {"content": "<|startoftext|>"}, "eos_token": "<|endoftext|>", "pad_token": pad_token,
             "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return folder


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """SD 2.x's tokenizer folder (padding with "!")."""
    return clip_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"), pad_token="!")


def test_bpe_file_ids_equal_open_clip(simple_tokenizer):
    ours = CLIPTokenizer.from_bpe_file()
    assert ours.vocab_size == 49408 and (ours.bos_id, ours.eos_id, ours.pad_id) == (49406, 49407, 0)
    ref = simple_tokenizer(PROMPTS).numpy()
    got = ours(PROMPTS)
    assert got.shape == (len(PROMPTS), 77) and got.dtype == np.int32
    bad = [p for p, a, b in zip(PROMPTS, got, ref) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]}"
    assert (ref[:, -1] != 0).sum() > 20     # the set does reach truncation
    for p in PROMPTS[:60]:
        assert ours.encode(p) == simple_tokenizer.encode(p)


def test_a_saved_bpe_tokenizer_keeps_its_clean_up_and_fingerprint(tmp_path):
    """A run folder's tokenizer/ copy of open_clip's tokenizer: same ids on every prompt (ftfy clean-up, special
    tokens read as text) and the same fingerprint; a change of what decides the ids changes the fingerprint."""
    ours = CLIPTokenizer.from_bpe_file(max_length=20)
    back = CLIPTokenizer.from_folder(ours.save(tmp_path / "tok"), max_length=20)
    assert back.clean == "clip" and back.fingerprint() == ours.fingerprint()
    np.testing.assert_array_equal(back(PROMPTS), ours(PROMPTS))
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    del config["ms_diffusion_clean"]                       # as a transformers folder: its clean-up
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    other = CLIPTokenizer.from_folder(tmp_path / "tok", max_length=20)
    assert other.clean == "transformers" and other.fingerprint() != ours.fingerprint()
    assert not np.array_equal(other(PROMPTS), ours(PROMPTS))
    assert CLIPTokenizer.from_bpe_file(max_length=21).fingerprint() != ours.fingerprint()


@pytest.mark.parametrize("pad", ["!", "<|endoftext|>"])
def test_folder_ids_equal_transformers(tokenizer_folder, tmp_path, pad):
    folder = tokenizer_folder
    if pad != "!":     # SD 1.x's tokenizer pads with the end token
        folder = tmp_path / "sd1"
        folder.mkdir()
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (folder / f).write_bytes((tokenizer_folder / f).read_bytes())
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ours = CLIPTokenizer.from_folder(folder)
    assert ours.pad_token == hf.pad_token == pad and ours.max_length == 77
    ref = np.array(hf(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"])
    got = ours(PROMPTS)
    bad = [p for p, a, b in zip(PROMPTS, got, ref) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]}"
    np.testing.assert_array_equal(ours(PROMPTS[:5], max_length=16),
                                  hf(PROMPTS[:5], padding="max_length", max_length=16, truncation=True)["input_ids"])
    assert ours.decode(ours(["A photo of a CAT."])[0]) == hf.decode(hf("A photo of a CAT.")["input_ids"],
                                                                     skip_special_tokens=True) == "a photo of a cat ."

    saved = ours.save(tmp_path / "saved")                      # our folder loads in transformers, same ids
    again = transformers.CLIPTokenizer.from_pretrained(str(saved))
    np.testing.assert_array_equal(np.array(again(PROMPTS[:40], padding="max_length", max_length=77,
                                                 truncation=True)["input_ids"]), got[:40])
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(saved)(PROMPTS), got)


def test_tokenizer_errors_name_the_problem(tmp_path, tokenizer_folder):
    with pytest.raises(TokenizerFileError, match="does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerFileError, match="merges.txt is missing"):
        CLIPTokenizer.from_folder(tmp_path / "half")
    (tmp_path / "half" / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerFileError, match="line 2: a merge is two symbols"):
        CLIPTokenizer.from_folder(tmp_path / "half")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(TokenizerFileError, match="cannot read the CLIP BPE file"):
        CLIPTokenizer.from_bpe_file(tmp_path / "bad.gz")
    with pytest.raises(TypeError, match="prompts are str"):
        CLIPTokenizer.from_folder(tokenizer_folder)(["ok", 3])


# ---------------------------------------------------------------------------------------------- text encoder

def _ids(vocab, eos, lengths, n=77, seed=0):
    """Token rows: a start token, random text, the end token at ``lengths[i]``, then end tokens (SD 1.x padding)."""
    ids = np.random.default_rng(seed).integers(3, vocab - 3, (len(lengths), n))
    ids[:, 0] = vocab - 2
    for row, length in zip(ids, lengths):
        row[length:] = eos
    return ids


def _transformers_model(act, with_projection):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                                         eos_token_id=999, bos_token_id=998, pad_token_id=1, projection_dim=16)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config).eval()


@pytest.mark.parametrize("act,with_projection", [("quick_gelu", False), ("gelu", True)])
def test_text_encoder_equals_transformers(tmp_path, act, with_projection):
    hf = _transformers_model(act, with_projection)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = text_encoder_from_transformers(tmp_path / "hf")
    assert ours.config["hidden_act"] == act and ours.config["projection_dim"] == (16 if with_projection else None)
    ids = _ids(1000, 999, [6, 21, 77])
    with torch.no_grad():
        ref = hf(torch.tensor(ids), output_hidden_states=True)
    hidden, pooled = ours(ms.Tensor(ids.astype(np.int32)))
    ref_pooled = ref.text_embeds if with_projection else ref.pooler_output
    scale = np.abs(ref.last_hidden_state.numpy()).max()
    np.testing.assert_allclose(hidden.asnumpy(), ref.last_hidden_state.numpy(), rtol=0, atol=1e-5 * scale)
    pooled_scale = np.abs(ref_pooled.numpy()).max()
    np.testing.assert_allclose(pooled.asnumpy(), ref_pooled.numpy(), rtol=0, atol=1e-5 * pooled_scale)

    graph_hidden, graph_pooled = ms.jit(ours.construct)(ms.Tensor(ids.astype(np.int32)))
    np.testing.assert_allclose(graph_hidden.asnumpy(), hidden.asnumpy(), rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(graph_pooled.asnumpy(), pooled.asnumpy(), rtol=0, atol=1e-5)

    # padding keys hidden by an attention mask, as transformers does when one is passed
    mask = (np.arange(77)[None] <= np.array([6, 21, 76])[:, None]).astype(np.int64)
    with torch.no_grad():
        ref_masked = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    masked, _ = ours(ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask.astype(np.int32)))
    assert np.abs(ref_masked - ref.last_hidden_state.numpy()).max() > 1e-3    # the mask matters here
    np.testing.assert_allclose(masked.asnumpy(), ref_masked, rtol=0, atol=1e-5 * scale)

    # clip skip / SD 2.x: the penultimate layer through the final LayerNorm; pooled still from the last
    skip = text_encoder_from_transformers(tmp_path / "hf", skip_last_layers=1)
    final_norm = (hf.text_model if with_projection else hf).final_layer_norm
    with torch.no_grad():
        ref_penultimate = final_norm(ref.hidden_states[-2]).numpy()
    penultimate, pooled_skip = skip(ms.Tensor(ids.astype(np.int32)))
    np.testing.assert_allclose(penultimate.asnumpy(), ref_penultimate, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(pooled_skip.asnumpy(), pooled.asnumpy(), rtol=0, atol=1e-6)
    lean = CLIPTextModel(**{**ours.config, "skip_last_layers": 1}, with_pooled=False)
    load_arrays_into(lean, {k: v.asnumpy() for k, v in skip.parameters_dict().items()})
    lean_hidden, nothing = lean(ms.Tensor(ids.astype(np.int32)))
    assert nothing is None
    np.testing.assert_array_equal(lean_hidden.asnumpy(), penultimate.asnumpy())


def test_text_encoder_exports_to_transformers_exactly(tmp_path):
    hf = _transformers_model("quick_gelu", True)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    config = hf.config.to_dict() | {"architectures": [type(hf).__name__]}
    kwargs, problems = text_encoder_kwargs_from_transformers(config)
    assert not problems
    ours = CLIPTextModel(**kwargs)
    plan = text_encoder_plan(ours)
    arrays = plan.to_ms(state)
    back = plan.to_torch(arrays)
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    # a transformers 5 CLIPTextModel file (no text_model. prefix) reads the same
    plain = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.")}
    plain_arrays = text_encoder_plan(CLIPTextModel(**{**kwargs, "projection_dim": None})).to_ms(plain)
    assert all(np.array_equal(plain_arrays[k], arrays[k]) for k in plain_arrays)

    out = tmp_path / "exported"                     # written by us, loaded by transformers
    out.mkdir()
    load_arrays_into(ours, arrays)
    (out / "config.json").write_text(json.dumps(transformers_text_config(ours)))
    write_weights(out / "model.safetensors", plan.to_torch({k: v.asnumpy() for k, v in ours.parameters_dict().items()}))
    loaded = transformers.CLIPTextModelWithProjection.from_pretrained(str(out)).eval()
    for p, q in zip(loaded.state_dict().values(), hf.state_dict().values()):
        assert torch.equal(p, q)


def test_text_encoder_errors():
    with pytest.raises(ValueError, match="skip_last_layers must be in"):
        CLIPTextModel(num_hidden_layers=2, skip_last_layers=2)
    with pytest.raises(ValueError, match="hidden_act must be"):
        CLIPTextModel(hidden_act="relu")
    _, problems = text_encoder_kwargs_from_transformers({"architectures": ["T5EncoderModel"], "hidden_act": "gelu_new"})
    assert len(problems) == 2 and "T5EncoderModel" in problems[0]


def test_text_encoder_equals_open_clip_sd2_layout():
    """open_clip's text tower as Stable Diffusion 2.x runs it (FrozenOpenCLIPEmbedder, layer="penultimate":
    every residual block but the last, then ln_final) and its projected features (``encode_text``)."""
    oc = open_clip("transformer")
    torch.manual_seed(1)
    tower = oc.TextTransformer(context_length=77, vocab_size=1000, width=32, heads=4, layers=3, output_dim=24).eval()
    state = {k: v.numpy() for k, v in tower.state_dict().items()}
    kwargs = text_encoder_kwargs_from_open_clip(state, heads=4)
    assert kwargs == dict(vocab_size=1000, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", eos_token_id=999,
                          projection_dim=24)
    ours = CLIPTextModel(**kwargs, skip_last_layers=1)
    ours.set_train(False)
    plan = text_encoder_plan(ours, "open_clip")
    load_arrays_into(ours, plan.to_ms(state))
    back = plan.to_torch(plan.to_ms(state))
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)

    ids = _ids(1000, 999, [5, 30, 77], seed=2)
    ids[ids == 999] = 0                              # open_clip pads with 0 after its end token
    for row, length in zip(ids, [5, 30, 77]):
        row[min(length, 76)] = 999
    text = torch.tensor(ids)
    with torch.no_grad():
        x, mask = tower._embeds(text)
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=mask)
        ref_hidden = tower.ln_final(x).numpy()
        ref_features = tower(text).numpy()
    hidden, features = ours(ms.Tensor(ids.astype(np.int32)))
    np.testing.assert_allclose(hidden.asnumpy(), ref_hidden, rtol=0, atol=1e-5 * np.abs(ref_hidden).max())
    np.testing.assert_allclose(features.asnumpy(), ref_features, rtol=0, atol=1e-5 * np.abs(ref_features).max())
