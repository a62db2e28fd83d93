"""Training with text: captioned data (image folders, captioned Fashion-MNIST), prompt dropout, a
text-conditional latent diffusion through train.py (exact resume) and sample.py (--prompt), and the
prompt / negative-prompt plumbing of sampling."""
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from ms_diffusion.data import BadDataError, DataError, build_source
from ms_diffusion.data.fashion_mnist_captions import (ATTRIBUTES, CLASS_NOUNS, all_prompts, caption, parse_caption,
                                                      undo_attributes)
from tests.test_data import write_fashion_mnist


def _gray_folder(root, n=12, size=16):
    """Images whose gray level encodes their number i (level 10 * i), flat in ``root``; returns their names."""
    root.mkdir(parents=True)
    names = []
    for i in range(n):
        name = f"img_{i:02d}.png"
        Image.fromarray(np.full((size, size), 10 * i, np.uint8)).save(root / name)
        names.append(name)
    return names


def _number(image) -> int:
    return int(round(float(image.mean()) * 255 / 10))


def test_image_folder_captions_from_metadata_jsonl_follow_every_batch(tmp_path):
    root = tmp_path / "images"
    names = _gray_folder(root)
    lines = [json.dumps({"file_name": name, "text": f"picture {i}"}) for i, name in enumerate(names) if i != 5]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n\n")
    src = build_source("image_folder", data_dir=root, image_size=16, channels=1, seed=3, num_workers=1)
    assert src.has_captions and "captions for 11 images (1 without one" in src.describe()
    assert "non-image" not in src.describe()          # the jsonl is not an ignored file
    seen = 0
    for images, labels, captions in src.epoch(1, 4, captions=True):
        for image, text in zip(images, captions):
            i = _number(image)
            assert text == ("" if i == 5 else f"picture {i}")
            seen += 1
    assert seen == 12
    # resuming mid-epoch gives the same (image, caption) pairs
    full = list(src.epoch(1, 4, captions=True))
    tail = list(src.epoch(1, 4, start_batch=2, captions=True))
    assert [c for _, _, c in full[2:]] == [c for _, _, c in tail]
    # grids and evaluations of a run on it: the distinct non-empty captions of the first images
    first = next(iter(src.epoch(0, 6, captions=True)))[2]
    assert src.example_prompts(6) == list(dict.fromkeys(c for c in first if c)) and "" not in src.example_prompts(12)
    # the two-element form is unchanged
    images, labels = next(iter(src.epoch(0, 4)))
    assert images.shape == (4, 1, 16, 16) and labels.shape == (4,)


def test_image_folder_captions_from_txt_files_and_a_folder_without_captions(tmp_path):
    root = tmp_path / "images"
    names = _gray_folder(root, n=6)
    for i, name in enumerate(names):
        (root / name).with_suffix(".txt").write_text(f"  sidecar {i}\n", encoding="utf-8")
    src = build_source("image_folder", data_dir=root, image_size=16, channels=1, num_workers=1)
    for images, _, captions in src.epoch(0, 3, captions=True):
        assert captions == [f"sidecar {_number(im)}" for im in images]
    plain = tmp_path / "plain"
    _gray_folder(plain, n=4)
    src = build_source("image_folder", data_dir=plain, image_size=16, channels=1, num_workers=1)
    assert not src.has_captions
    with pytest.raises(DataError, match="has no captions.*metadata.jsonl"):
        src.epoch(0, 2, captions=True)


def test_bad_metadata_jsonl_names_the_line(tmp_path):
    root = tmp_path / "images"
    names = _gray_folder(root, n=3)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": names[0], "text": "ok"}) + "\n{not json\n")
    with pytest.raises(BadDataError, match=r"metadata.jsonl line 2: expected a JSON object"):
        build_source("image_folder", data_dir=root, image_size=16, channels=1, num_workers=1)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(BadDataError, match=r"(?s)names 1 image\(s\) that do not exist.*line 1: missing.png"):
        build_source("image_folder", data_dir=root, image_size=16, channels=1, num_workers=1)


def test_captions_name_the_class_and_the_attributes_drawn_for_each_image(tmp_path):
    data = write_fashion_mnist(tmp_path / "fm")
    images, labels = data["train"]
    src = build_source("fashion_mnist_captions", data_dir=tmp_path / "fm", seed=4, num_workers=1)
    assert src.has_captions and src.sample_flags.shape == (len(images), 2)
    flags_before = src.sample_flags.copy()
    for epoch in (0, 1):
        for batch, batch_labels, captions in src.epoch(epoch, 10, captions=True):
            for image, label, text in zip(batch, batch_labels, captions):
                cls, flags = parse_caption(text)
                assert cls == label and CLASS_NOUNS[cls] in text
                restored = undo_attributes(image[None].copy(), np.array([flags]))[0, 0]
                matches = [j for j in range(len(images)) if labels[j] == label
                           and np.allclose(restored, images[j] / 255.0, atol=1e-6)]
                assert matches and all(tuple(src.sample_flags[j]) == flags for j in matches)
    np.testing.assert_array_equal(src.sample_flags, flags_before)      # fixed across epochs
    assert 0.3 < src.sample_flags.mean() < 0.7
    assert src.example_prompts(4) == all_prompts()
    assert caption(7, (True, True)) == "a sneaker, black on white, upside down"
    assert len(set(all_prompts())) == 10 * 2 * 2 and parse_caption(all_prompts()[-1]) == (9, (True, True))
    with pytest.raises(ValueError, match="not a Fashion-MNIST caption"):
        parse_caption("a cat")
    only = build_source("fashion_mnist_captions", data_dir=tmp_path / "fm", attributes=["invert"], num_workers=1)
    assert set(all_prompts(only.attributes)) >= {"a bag, black on white", "a bag, white on black"}
    assert list(ATTRIBUTES) == ["invert", "upside_down"]


# --- a text-conditional latent diffusion through the CLIs ---------------------------------------------

AE_CONFIG = {
    "name": "tiny_ae", "seed": 1,
    "model": {"type": "autoencoder_kl", "embed_dim": 4,
              "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 1, "out_ch": 1,
                           "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                           "dropout": 0.0}},
    "loss": {"type": "lpips_discriminator", "disc_start": 100, "kl_weight": 1.0e-6, "disc_in_channels": 1,
             "disc_num_layers": 1, "disc_ndf": 8, "perceptual_weight": 0.0},
    "train": {"num_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 2, "sample_every": 0,
              "num_samples": 0, "progress": False},
}

# one U-Net stage (attention at full latent size): nothing here depends on the depth, and each train step
# and sampling graph compiles ~20% faster than with two stages
TEXT_CONFIG = {
    "name": "tiny_text", "seed": 2,
    "model": {"type": "unet_ldm", "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
              "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [1], "num_head_channels": 16,
              "use_spatial_transformer": True, "context_dim": 16},
    "diffusion": {"type": "latent", "conditioning_key": "crossattn", "cond_drop_prob": 0.25, "scale_by_std": True,
                  "timesteps": 50, "sampling_timesteps": 3, "text": {"max_length": 8, "layers": 1, "heads": 2}},
    "train": {"num_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 2, "sample_every": 4,
              "num_samples": 2, "ema_update_after_step": 1, "ema_update_every": 1, "ema_decay": 0.9,
              "progress": False},
    "sample": {"num": 2, "steps": 3, "sampler": "ddim", "guidance_scale": 2.0},
}


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """A captioned folder, a tiny autoencoder run on it, and a 4-step text-conditional run on that."""
    from ms_diffusion.cli.train import main as train_main

    root = tmp_path_factory.mktemp("text")
    names = _gray_folder(root / "images", n=8)
    (root / "images" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": n, "text": f"{'dark' if i < 4 else 'light'} square"}) + "\n"
        for i, n in enumerate(names)))
    data = {"name": "image_folder", "data_dir": str(root / "images"), "num_workers": 1}
    from ms_diffusion.text import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_bpe_file().save(root / "clip_tokenizer")    # open_clip's, as a folder
    assert train_main(["--config", str(_write(root / "ae.yaml", dict(AE_CONFIG, data=data))),
                       "--out-dir", str(root / "ae")]) == 0
    cfg = dict(TEXT_CONFIG, data=data)
    cfg["diffusion"] = dict(cfg["diffusion"], first_stage=str(root / "ae"),
                            text=dict(cfg["diffusion"]["text"], tokenizer=str(tokenizer)))
    config = _write(root / "text.yaml", cfg)
    assert train_main(["--config", str(config), "--out-dir", str(root / "run")]) == 0
    return root, config


@pytest.mark.slow
def test_text_run_trains_on_captions_and_resumes_exactly(text_runs, capsys):
    from ms_diffusion.cli.train import main as train_main

    root, config = text_runs
    log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert (root / "run" / "samples").is_dir() and any((root / "run" / "samples").iterdir())   # prompt grids
    shutil.copytree(root / "run", root / "resumed")
    for f in (root / "resumed" / "checkpoints").glob("step_*4*"):
        f.unlink()
    capsys.readouterr()
    assert train_main(["--config", str(config), "--out-dir", str(root / "resumed"), "--resume"]) == 0
    again = [json.loads(line) for line in (root / "resumed" / "log.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in again if "loss" in r} == losses     # steps 3 and 4 to the last digit


@pytest.mark.slow
def test_sample_py_and_evaluate_py_take_prompts_for_a_text_run(text_runs, capsys):
    from ms_diffusion.cli.evaluate import _run_prompts
    from ms_diffusion.cli.evaluate import main as evaluate_main
    from ms_diffusion.cli.sample import main as sample_main
    from ms_diffusion.pipeline import generate, load_diffusion

    root, _ = text_runs
    npz = root / "out.npz"
    prompts = ["dark square"] * 2 + ["light square"] * 2
    capsys.readouterr()
    assert sample_main(["--ckpt", str(root / "run"), "--prompt", "dark square", "--prompt", "light square",
                        "--num", "2", "--negative-prompt", "blurry", "--out", str(root / "grid.png"),
                        "--npz", str(npz), "--no-progress"]) == 0
    saved = np.load(npz)
    assert saved["images"].shape == (4, 1, 16, 16)
    assert list(saved["prompts"]) == prompts
    # evaluate.py cycles its prompts over --num (here the same four) and scores against the run's own data
    assert evaluate_main(["--ckpt", str(root / "run"), "--num", "4", "--batch-size", "4", "--metric", "pr",
                          "--no-cache", "--negative-prompt", "blurry", "--save-npz", str(root / "eval.npz")]
                         + [a for p in prompts for a in ("--prompt", p)]) == 0
    out = capsys.readouterr().out
    assert "4 prompt(s) in turn" in out and "image_folder train (8 images)" in out
    evaluated = np.load(root / "eval.npz")
    assert list(evaluated["prompts"]) == prompts
    # both CLIs' images are the pipeline's: prompts, guidance away from the negative prompt, one seeded generator
    cfg, ldm, _ = load_diffusion(root / "run")
    direct = generate(ldm, 4, batch_size=4, seed=0, sampler="ddim", steps=3, guidance_scale=2.0, prompts=prompts,
                      negative_prompt="blurry").images
    np.testing.assert_allclose(saved["images"], direct, atol=1e-6)
    np.testing.assert_allclose(evaluated["images"], direct, atol=1e-6)
    # without --prompt: the run's sample.prompts, else its training data's (here its first images' captions)
    assert set(_run_prompts(cfg, ldm)) <= {"dark square", "light square"}
    cfg.sample.prompts = ["a given prompt"]
    assert _run_prompts(cfg, ldm) == ["a given prompt"]
    # errors: no prompt for a text model; --prompt without --ckpt (a prompt for a class model: test_train_cli)
    capsys.readouterr()
    assert sample_main(["--ckpt", str(root / "run"), "--out", str(root / "x.png"), "--no-progress"]) != 0
    assert "text-conditional: give --prompt" in capsys.readouterr().err
    np.savez(root / "s.npz", images=direct)
    assert evaluate_main(["--samples", str(root / "s.npz"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "evaluate.py: error: --prompt / --prompts-file / --negative-prompt are for generating with --ckpt")


@pytest.mark.slow
def test_a_text_run_keeps_its_tokenizer(text_runs, tmp_path):
    """The run folder holds the tokenizer the model was trained with, and the checkpoints its fingerprint: a
    run loads with its copy even when the tokenizer its config names is gone; another tokenizer is refused."""
    from ms_diffusion.io.checkpoint import CheckpointError
    from ms_diffusion.io.weights import read_weights
    from ms_diffusion.pipeline import load_diffusion
    from ms_diffusion.registry import ConfigError
    from ms_diffusion.text import CLIPTokenizer

    root, _ = text_runs
    _, ldm, meta = load_diffusion(root / "run")
    copy = CLIPTokenizer.from_folder(root / "run" / "tokenizer", max_length=8)
    assert copy.clean == "clip"          # the config's tokenizer: open_clip's vocabulary and clean-up
    assert meta["tokenizer_sha256"] == copy.fingerprint() == ldm.tokenizer.fingerprint()
    assert read_weights(root / "run" / "model.safetensors", "ema")[2]["tokenizer_sha256"] == copy.fingerprint()
    moved = tmp_path / "moved"
    shutil.copytree(root / "run", moved)
    named, hidden = root / "clip_tokenizer", root / "clip_tokenizer.hidden"
    named.rename(hidden)                 # the tokenizer the config names is gone
    try:
        for f in [moved, moved / "model.safetensors", sorted((moved / "checkpoints").glob("step_*.ckpt"))[-1]]:
            _, text_ldm, _ = load_diffusion(f)
            np.testing.assert_array_equal(text_ldm.tokenize(["dark square"]), ldm.tokenize(["dark square"]))
        # a copy that tokenizes otherwise (transformers' clean-up instead of open_clip's) is refused
        tok_config = json.loads((moved / "tokenizer" / "tokenizer_config.json").read_text())
        del tok_config["ms_diffusion_clean"]
        (moved / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tok_config))
        with pytest.raises(CheckpointError, match="trained with another tokenizer"):
            load_diffusion(moved)
        shutil.rmtree(moved / "tokenizer")   # no copy and no named tokenizer: the config's error
        with pytest.raises(ConfigError, match="clip_tokenizer does not exist"):
            load_diffusion(moved)
    finally:
        hidden.rename(named)


@pytest.mark.slow
def test_a_config_trains_with_a_frozen_pretrained_clip_text_encoder(text_runs, tmp_path):
    """``diffusion.text.encoder``: a transformers CLIPTextModel, converted by convert_checkpoint.py, conditions a
    config-trained latent diffusion frozen (ldm's FrozenCLIPEmbedder): its weights are unchanged in every
    checkpoint, the run loads without the file, and its context equals transformers' last hidden state."""
    import mindspore as ms
    import torch
    import transformers

    from ms_diffusion.cli.train import main as train_main
    from ms_diffusion.config import config_from_dict
    from ms_diffusion.experiment import build_diffusion
    from ms_diffusion.io.checkpoint import load_safetensors
    from ms_diffusion.io.hashing import file_sha256
    from ms_diffusion.io.weights import read_weights
    from ms_diffusion.pipeline import load_diffusion
    from ms_diffusion.registry import ConfigError
    from tests.test_interop import _cli

    root, config = text_runs
    torch.manual_seed(0)
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1)).eval()
    hf.save_pretrained(str(tmp_path / "pipe" / "text_encoder"))
    encoder_file = tmp_path / "clip_text.safetensors"
    rc, _, err = _cli("from-diffusers", tmp_path / "pipe", encoder_file, "--subfolder", "text_encoder")
    assert rc == 0, err
    pretrained, file_meta = load_safetensors(encoder_file)
    assert file_meta["network"] == {"type": "clip_text", "vocab_size": 49408, "hidden_size": 16,
                                    "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                    "max_position_embeddings": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                                    "eos_token_id": 49407}

    cfg = yaml.safe_load(config.read_text())
    text = {"tokenizer": cfg["diffusion"]["text"]["tokenizer"], "max_length": 8, "encoder": str(encoder_file)}
    cfg["diffusion"]["text"] = text
    shutil.copytree(root / "ae", tmp_path / "ae")                # a first stage this test may delete
    cfg["diffusion"]["first_stage"] = str(tmp_path / "ae")
    cfg["train"].update(num_steps=2, save_every=1, sample_every=0)
    built = build_diffusion(config_from_dict(cfg))
    assert built.model.cond_stage_model.frozen and built.text_encoder_info["sha256"] == file_sha256(encoder_file)
    assert not [p.name for p in built.trainable_params() if "cond_stage_model" in p.name]
    assert [p.name for p in built.trainable_params() if "model.diffusion_model" in p.name]
    tuned = build_diffusion(config_from_dict(dict(cfg, diffusion=dict(cfg["diffusion"], text=dict(text, frozen=False)))))
    assert not tuned.model.cond_stage_model.frozen       # frozen: false fine-tunes the pretrained encoder
    assert len([p for p in tuned.trainable_params() if "cond_stage_model" in p.name]) == len(pretrained)

    def refused(text_section, match, **model):
        bad = dict(cfg, diffusion=dict(cfg["diffusion"], text=text_section), model=dict(cfg["model"], **model))
        with pytest.raises(ConfigError, match=match):
            build_diffusion(config_from_dict(bad))

    refused(dict(text, layers=1), r"\['layers'\] describe a new text transformer.*remove them")
    refused(text, "model.context_dim is 32 but the text encoder .* is 16 wide; set model.context_dim: 16",
            context_dim=32)
    refused(dict(text, max_length=16), "max_length 16 exceeds the text encoder's 8 positions")
    refused(dict(text, encoder=str(root / "ae" / "model.safetensors")), "holds no network section.*--subfolder "
            "text_encoder")
    refused({"max_length": 8, "frozen": True}, "set diffusion.text.encoder to its network file")

    assert train_main(["--config", str(_write(tmp_path / "frozen.yaml", cfg)), "--out-dir", str(tmp_path / "run")]) == 0
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*.ckpt"))
    assert len(checkpoints) == 2
    prefix = "model.cond_stage_model.transformer."
    for ckpt in checkpoints:
        for group in ("online", "ema"):
            _, arrays, meta = read_weights(ckpt, group)
            assert meta["text_encoder"]["sha256"] == file_sha256(encoder_file)
            assert {k[len(prefix):] for k in arrays if k.startswith(prefix)} == set(pretrained)
            for name, value in pretrained.items():
                np.testing.assert_array_equal(arrays[prefix + name], value)

    _, before, records = read_weights(checkpoints[-1], "ema")
    encoder_file.unlink()                        # the run rebuilds the encoder from its own checkpoint
    shutil.rmtree(tmp_path / "ae")               # and its first stage
    cfg["train"]["num_steps"] = 3                # ... when it resumes, too
    assert train_main(["--config", str(_write(tmp_path / "frozen.yaml", cfg)), "--out-dir", str(tmp_path / "run"),
                       "--resume"]) == 0
    _, after, meta = read_weights(tmp_path / "run" / "checkpoints" / "step_00000003.ckpt", "ema")
    assert meta["step"] == 3
    assert meta["first_stage"] == records["first_stage"] and meta["text_encoder"] == records["text_encoder"]
    frozen = [k for k in before if k.startswith(("first_stage_model.", prefix)) or k == "scale_factor"]
    assert len(frozen) > len(pretrained)
    for name in frozen:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    _, ldm, _ = load_diffusion(tmp_path / "run")
    ids = ldm.tokenize(["dark square", "a light square, upside down", ""])
    with torch.no_grad():
        ref = hf(torch.tensor(ids.astype(np.int64))).last_hidden_state.numpy()
    context = ldm.model.cond_stage_model(ms.Tensor(ids)).asnumpy()
    np.testing.assert_allclose(context, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_prompt_dropout_tokens_and_guidance_use_the_empty_prompt(text_runs):
    from ms_diffusion.diffusion import GaussianDiffusion
    from ms_diffusion.pipeline import load_diffusion

    root, _ = text_runs
    _, ldm, _ = load_diffusion(root / "run")
    assert ldm.text_conditional and ldm.prompt_drop_prob == 0.25
    captions = [f"caption {i}" for i in range(64)]
    images = np.zeros((64, 1, 16, 16), np.float32)
    out = ldm.training_inputs(images, np.random.default_rng(7), captions)
    rng = np.random.default_rng(7)                       # the same draws in the same order
    ref = GaussianDiffusion.training_inputs(ldm, np.zeros(ldm.latent_shape(64), np.float32), rng, None)
    rng.standard_normal(ldm.latent_shape(64))            # posterior noise
    dropped = rng.random(64) < 0.25
    np.testing.assert_array_equal(out["times"], ref["times"])
    expected = ldm.tokenize(["" if d else c for d, c in zip(dropped, captions)])
    np.testing.assert_array_equal(out["classes"], expected)
    assert 5 < dropped.sum() < 30 and out["classes"].dtype == np.int32 and out["classes"].shape == (64, 8)
    empty = ldm.tokenize([""])[0]
    assert empty[0] == ldm.tokenizer.bos_id and empty[1] == ldm.tokenizer.eos_id
    # guided sampling from prompts == from their token ids with the empty prompt as the unconditional branch
    a = ldm.sample(2, prompts="light square", guidance_scale=3.0, seed=5, steps=3, sampler="ddim")
    ids = ldm.tokenize(["light square"] * 2)
    b = ldm.sample(2, cond=ids, uncond=ldm.tokenize(["", ""]), guidance_scale=3.0, seed=5, steps=3, sampler="ddim")
    np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    c = ldm.sample(2, prompts="light square", negative_prompt="dark square", guidance_scale=3.0, seed=5, steps=3,
                   sampler="ddim")
    assert np.abs(c.asnumpy() - a.asnumpy()).max() > 0      # the negative prompt is what guidance steers from
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        ldm.sample(2, prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="captions"):
        ldm.training_inputs(images[:2], np.random.default_rng(0), np.array([1, 2]))
    assert isinstance(ldm.tokenize(["x"]), np.ndarray)


# --- prompt adherence checks -------------------------------------------------------------------------

def test_adherence_checks_read_colours_and_orientation_and_need_matching_prompts():
    from ms_diffusion.metrics.captions import adherence, adherence_table

    rng = np.random.default_rng(0)
    garment = np.zeros((1, 28, 28), np.float32)
    garment[:, 6:22, 9:19] = rng.uniform(0.6, 1.0, (16, 10))      # light object, black background
    inverted = 1.0 - garment
    images = np.stack([garment, inverted, garment, inverted])
    prompts = ["a bag, white on black, upright", "a bag, black on white, upright",
               "a bag, black on white, upright", "a bag, white on black, upright"]
    result = adherence(images, prompts)
    assert result.colour_ok.tolist() == [True, True, False, False]
    table = adherence_table(result)
    assert table["all prompts"]["n"] == 4 and table["all prompts"]["colour"] == 0.5
    assert set(table) == set(prompts) | {"all prompts"}
    with pytest.raises(ValueError, match="2 prompts for 4 images"):
        adherence(images, prompts[:2])


def test_adherence_checks_on_real_captioned_images_are_near_their_ceiling():
    """The checks read real captioned test images (whose captions are right by construction) almost always
    right: what README's adherence figures are measured against."""
    from ms_diffusion.data.fashion_mnist import locate_fashion_mnist
    from ms_diffusion.metrics.captions import adherence, adherence_table

    folder, _ = locate_fashion_mnist(None, "test", download=False)
    src = build_source("fashion_mnist_captions", data_dir=folder, split="test", seed=0, num_workers=2)
    indices = np.arange(1000)
    (images, labels), = list(src.images_at(indices, batch_size=1000))
    total = adherence_table(adherence(images, src.batch_captions(indices, labels)))["all prompts"]
    assert total["colour"] == 1.0
    assert total["class"] >= 0.88 and total["orientation"] >= 0.86, total     # measured on 2,000: 91.0 % and 89.1 %
