"""Stable Diffusion files against diffusers' own readers, on tiny random models with SD's real layout
(GroupNorm 32, CLIP heads 64 wide; SD 2.x: OpenCLIP's text tower with all 24 layers):

* original single-file checkpoints: ours written -> diffusers' ``from_single_file`` reads the very weights the
  pipeline had; an SD 2.x file assembled from open_clip's own text tower + LitEma weights -> ours and
  diffusers' ``from_single_file`` give the same images; the architecture read off the tensors without a YAML;
* diffusers pipeline folders: ``save_diffusers`` -> ``from_pretrained`` -> the same weights and images.
"""
import numpy as np
import pytest
import yaml

import mindspore as ms

from ms_diffusion.interop.ldm import autoencoder_plan, unet_plan
from ms_diffusion.interop.sd_formats import infer_sd_config, read_sd_checkpoint
from ms_diffusion.interop.torch_io import read_weights, write_weights
from ms_diffusion.io.state import ConversionError, state_arrays
from ms_diffusion.stable_diffusion import StableDiffusion
from tests.anchors import open_clip
from tests.test_clip_text import clip_tokenizer_folder
from tests.test_stable_diffusion import (NEGATIVE, PROMPTS, SIZE, _close, _latents, _perturbed, save_pipeline,
                                         tiny_vae)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _pipeline(root, kind):
    """A tiny SD 1.x-like (8-head UNet attention, quick-GELU CLIP) or SD 2.x-like (64-wide heads, linear
    projections, GELU CLIP of 23 layers as diffusers stores SD 2.x's 24, v-prediction) pipeline, saved."""
    sd2 = kind == "sd2"
    torch.manual_seed(10 if sd2 else 20)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        str(clip_tokenizer_folder(root / f"{kind}_tokenizer", pad_token="!" if sd2 else None)))
    text_config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=23 if sd2 else 2, num_attention_heads=1,
                                              max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
                                              eos_token_id=49407, bos_token_id=49406, pad_token_id=1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128) if sd2 else (32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(1, 2) if sd2 else 8, use_linear_projection=sd2, norm_num_groups=32)
    vae = tiny_vae((32, 64), groups=32)
    return save_pipeline(root, kind, unet=unet, vae=vae, tokenizer=tokenizer, v_prediction=sd2,
                         text_encoder=_perturbed(transformers.CLIPTextModel(text_config), 3))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_formats")
    return {kind: _pipeline(root, kind) for kind in ("sd1", "sd2")}


def _same_weights(a, b):
    """Two torch modules hold bitwise the same parameters under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def _generate(pipe, latents, steps=4):
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
                    guidance_scale=5.0, latents=latents.clone(), output_type="np").images


def _ours(sd, latents, steps=4):
    return sd(PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, steps=steps, guidance_scale=5.0,
              latents=ms.Tensor(latents.numpy()))


def test_sd1_single_file_written_by_us_is_what_diffusers_reads(pipelines, tmp_path):
    folder, pipe = pipelines["sd1"]
    sd = StableDiffusion.from_diffusers(folder)
    path = sd.save_single_file(tmp_path / "tiny-sd1.safetensors")
    written = yaml.safe_load((tmp_path / "tiny-sd1.yaml").read_text())
    assert written["model"]["params"]["cond_stage_config"]["target"].endswith("FrozenCLIPEmbedder")
    state, _ = read_weights(path)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    assert "model.diffusion_model.input_blocks.0.0.weight" in state and "first_stage_model.quant_conv.weight" in state

    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        _same_weights(getattr(pipe, part), getattr(theirs, part))

    (tmp_path / "tiny-sd1.yaml").unlink()              # read back with the architecture from the tensors alone
    back = StableDiffusion.from_single_file(path)
    assert back.source["config"] == "inferred" and back.ldm.objective == "pred_noise"
    for ours, again in ((sd.unet, back.unet), (sd.vae, back.vae), (sd.text_encoder, back.text_encoder)):
        a, b = state_arrays(ours), state_arrays(again)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # the tokenizer SD 1.x's FrozenCLIPEmbedder uses, from CLIP's BPE file: the pipeline's ids
    assert np.array_equal(back.tokenizer(PROMPTS + NEGATIVE + [""]),
                          pipe.tokenizer(PROMPTS + NEGATIVE + [""], padding="max_length", max_length=77,
                                         return_tensors="np").input_ids)
    latents = _latents(3)
    _close(_ours(back, latents), _generate(pipe, latents))


def _sd2_checkpoint(pipelines, root):
    """An original SD 2.x checkpoint: the pipeline's UNet (and a LitEma copy) and VAE in ldm names, and a
    24-layer open_clip text tower from open_clip itself; plus its v-prediction YAML, written as SD 2.x's are."""
    folder, pipe = pipelines["sd2"]
    sd = StableDiffusion.from_diffusers(folder)
    oc = open_clip("transformer")
    torch.manual_seed(5)
    tower = _perturbed(oc.TextTransformer(context_length=77, vocab_size=49408, width=64, heads=1, layers=24,
                                          mlp_ratio=2.0, output_dim=64), 6)
    state = {f"cond_stage_model.model.{k}": v.numpy() for k, v in tower.state_dict().items() if k != "attn_mask"}
    unet = unet_plan(sd.unet, "model.diffusion_model.").to_torch(state_arrays(sd.unet))
    state.update(unet)
    rng = np.random.default_rng(7)
    ema = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in unet.items()}
    state.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ema.items()})
    state["model_ema.decay"] = np.array(0.9999, np.float32)
    state["model_ema.num_updates"] = np.array(10, np.int32)
    state.update(autoencoder_plan(sd.vae, "first_stage_model.").to_torch(state_arrays(sd.vae)))
    path = write_weights(root / "tiny-sd2-v.ckpt", {"state_dict": state, "global_step": 10})
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "parameterization": "v", "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1,
        "log_every_t": 200, "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
        "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "use_checkpoint": True, "use_fp16": True, "image_size": 8, "in_channels": 4, "out_channels": 4,
            "model_channels": 64, "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2],
            "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "transformer_depth": 1, "context_dim": 64, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}}}}}
    yaml_path = root / "v2-inference-v-tiny.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    return path, yaml_path, folder, ema


@pytest.fixture(scope="module")
def sd2_file(pipelines, tmp_path_factory):
    return _sd2_checkpoint(pipelines, tmp_path_factory.mktemp("sd2_file"))


def test_sd2_original_checkpoint_equals_diffusers_from_single_file(sd2_file):
    path, yaml_path, folder, ema = sd2_file
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    # diffusers takes the raw unet weights; ours too with use_ema=False
    raw = StableDiffusion.from_single_file(path, config=yaml_path, use_ema=False)
    assert raw.ldm.objective == "pred_v" and raw.text_encoder.config["skip_last_layers"] == 1
    assert raw.text_encoder.config["num_hidden_layers"] == 24 and raw.tokenizer.pad_token == "!"
    assert raw.source["step"] == 10
    latents = _latents(21)
    _close(_ours(raw, latents), _generate(theirs, latents))
    # the default takes LitEma's weights: exactly the EMA tensors
    with_ema = StableDiffusion.from_single_file(path, config=yaml_path)
    assert with_ema.source["weights"] == "ema"
    expected = unet_plan(with_ema.unet, "model.diffusion_model.").to_ms(ema)
    got = state_arrays(with_ema.unet)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    # the same without the YAML, given the prediction type
    inferred = StableDiffusion.from_single_file(path, prediction_type="v_prediction", use_ema=False)
    a, b = state_arrays(raw.ldm), state_arrays(inferred.ldm)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_inferred_config_matches_the_yaml(sd2_file):
    path, yaml_path, _, _ = sd2_file
    state, _ = read_weights(path)
    inferred = infer_sd_config(state["state_dict"], "v_prediction")["model"]["params"]
    given = yaml.safe_load(yaml_path.read_text())["model"]["params"]
    ignored = ("use_checkpoint", "use_fp16", "image_size")
    assert {k: v for k, v in inferred["unet_config"]["params"].items() if k not in ignored} == \
        {k: v for k, v in given["unet_config"]["params"].items() if k not in ignored}
    assert inferred["first_stage_config"]["params"]["ddconfig"] == given["first_stage_config"]["params"]["ddconfig"]
    for key in ("parameterization", "linear_start", "linear_end", "timesteps", "scale_factor", "conditioning_key"):
        assert inferred[key] == given[key], key


def test_save_diffusers_is_what_diffusers_loads(pipelines, sd2_file, tmp_path):
    folder, pipe = pipelines["sd1"]
    out = StableDiffusion.from_diffusers(folder).save_diffusers(tmp_path / "sd1")
    again = diffusers.StableDiffusionPipeline.from_pretrained(str(out))
    for part in ("unet", "vae", "text_encoder"):
        _same_weights(getattr(pipe, part), getattr(again, part))
    assert again.scheduler.config.prediction_type == "epsilon" and again.scheduler.config.steps_offset == 1

    # an original SD 2.x model -> a diffusers folder: 23 of the 24 text layers, v-prediction, same images
    path, yaml_path, _, _ = sd2_file
    sd2 = StableDiffusion.from_single_file(path, config=yaml_path)
    out2 = sd2.save_diffusers(tmp_path / "sd2")
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(str(out2))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder.config.num_hidden_layers == 23
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    latents = _latents(23)
    _close(_ours(sd2, latents), _generate(loaded, latents))

    with pytest.raises(ConversionError, match="not an empty folder"):
        sd2.save_diffusers(out2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd1", "sd2"]          # no partial folder left
    with pytest.raises(ConversionError, match="hold every layer"):
        StableDiffusion.from_diffusers(pipelines["sd2"][0]).save_single_file(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_single_file_errors_name_the_problem(sd2_file, tmp_path):
    path, yaml_path, _, _ = sd2_file
    with pytest.raises(ConversionError, match="prediction_type"):
        StableDiffusion.from_single_file(path)
    state, _ = read_weights(path)
    unet_only = {k: v for k, v in state["state_dict"].items() if k.startswith("model.diffusion_model.")}
    write_weights(tmp_path / "unet.safetensors", unet_only)
    with pytest.raises(ConversionError, match="neither of the text encoders"):
        read_sd_checkpoint(tmp_path / "unet.safetensors")
    extra = dict(state["state_dict"], **{"conditioner.embedders.0.foo": np.zeros(2, np.float32)})
    write_weights(tmp_path / "extra.safetensors", extra)
    with pytest.raises(ConversionError, match="belong to no Stable Diffusion component"):
        read_sd_checkpoint(tmp_path / "extra.safetensors", yaml_path)


def test_sample_cli_reads_an_original_checkpoint(sd2_file, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path, yaml_path, _, _ = sd2_file
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "sample.py"), "--ckpt", str(path), "--sd-config", str(yaml_path),
                           "--prompt", "a cat", "--steps", "2", "--no-progress", "--out", str(tmp_path / "cat.png")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cat.png").is_file() and "1 images from" in proc.stdout
    proc = subprocess.run([sys.executable, str(root / "sample.py"), "--ckpt", str(path), "--prompt", "a cat",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "prediction_type" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()
    proc = subprocess.run([sys.executable, str(root / "scripts" / "convert_checkpoint.py"), "sd-to-diffusers",
                           str(path), str(tmp_path / "pipe"), "--ldm-config", str(yaml_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "StableDiffusionPipeline (ema unet weights" in proc.stdout
    assert StableDiffusion.from_diffusers(tmp_path / "pipe").ldm.objective == "pred_v"
