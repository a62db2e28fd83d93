"""PyTorch interop: name tables and shape transforms, safe loading, clear errors, numerical parity with
lucidrains / ldm / diffusers networks in PyNative and graph mode, and exact ms -> torch -> ms round trips.

The parity cases live in bench/parity_table.py (which prints the table docs/interop.md quotes); each
is run once per module here and asserted on: relative error <= 1e-4 (max |ours - torch| / max |torch|).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ms_diffusion import GaussianDiffusion, Unet
from ms_diffusion.interop import ConversionError, build_plan, state_arrays
from ms_diffusion.interop.torch_io import write_weights
from ms_diffusion.interop.transforms import CONV1D, FUSED_QKV, FUSED_QKV_BIAS, IDENTITY, LINEAR

ROOT = Path(__file__).resolve().parent.parent
REL_TOL = 1e-4


def _assert_parity(case, tol: float = REL_TOL) -> None:
    for row in case.rows():
        assert row["max_rel"] <= tol, row


def _same_arrays(a, b) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """bench.parity_table with a shared temp folder; each case is built once per module."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("einops")
    import bench.parity_table as bench

    tmp = tmp_path_factory.mktemp("interop")
    cache = {}

    def get(name, *args):
        key = (name, repr(args))
        if key not in cache:
            cache[key] = bench.lucidrains_unet(*args) if name == "lucidrains_unet" else getattr(bench, name)(tmp)
        return cache[key]

    get.bench = bench
    get.tmp = tmp
    return get


def _cli(*argv):
    """convert_checkpoint.py in a subprocess-free way: (exit code, stdout, stderr)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- tables and transforms (no torch)

def test_transforms_are_exact_both_ways():
    rng = np.random.default_rng(0)
    for transform, ms_shape in ((IDENTITY, (3, 4)), (CONV1D, (6, 4, 1, 1)), (LINEAR, (6, 4, 1, 1)),
                                (FUSED_QKV, (12, 4, 1, 1)), (FUSED_QKV_BIAS, (12,))):
        x = rng.standard_normal(ms_shape).astype(np.float32)
        parts = transform.to_torch(x)
        assert [p.shape for p in parts] == transform.torch_shapes(ms_shape)
        np.testing.assert_array_equal(transform.to_ms(parts), x)
    q, k, v = FUSED_QKV.to_torch(np.arange(12 * 4, dtype=np.float32).reshape(12, 4, 1, 1))
    assert q.shape == (4, 4) and k[0, 0] == 16 and v[0, 0] == 32           # rows [q; k; v]
    with pytest.raises(ValueError, match="unit axes"):
        LINEAR.torch_shapes((6, 4, 3, 3))


def test_name_tables_derive_both_directions_and_refuse_ambiguity():
    from ms_diffusion.interop import LUCIDRAINS_UNET_TO_MS, MS_TO_LUCIDRAINS_UNET, rename
    from ms_diffusion.interop.names import LUCIDRAINS_UNET, LUCIDRAINS_UNET_NAMES, template_rules

    assert LUCIDRAINS_UNET.rules == (tuple(MS_TO_LUCIDRAINS_UNET),)                 # the plan's table is the same
    # the table's order does not matter: more specific templates are tried first
    reordered = template_rules(LUCIDRAINS_UNET_NAMES[::-1])
    for to_torch, to_ms in ((MS_TO_LUCIDRAINS_UNET, LUCIDRAINS_UNET_TO_MS), reordered):
        for ours, theirs in (("downs.3.downsample.conv.weight", "downs.3.3.1.weight"),
                             ("downs.3.downsample.weight", "downs.3.3.weight"),
                             ("ups.0.upsample.conv.bias", "ups.0.3.1.bias"),
                             ("ups.10.block2.block1.proj.bias", "ups.10.1.block1.proj.bias"),
                             ("downs.1.attn.to_out.1.g", "downs.1.2.to_out.1.g"),
                             ("mid_attn.to_qkv.weight", "mid_attn.to_qkv.weight")):
            assert rename(ours, to_torch) == theirs and rename(theirs, to_ms) == ours
    with pytest.raises(ValueError, match="appear twice"):
        template_rules([("a.{i}.", "b.{i}."), ("c.{i}.", "b.{i}.")])                # not injective
    with pytest.raises(ValueError, match="different placeholders"):
        template_rules([("a.{i}.", "b.")])
    with pytest.raises(ValueError, match="unknown placeholder"):
        template_rules([("a.{k}.", "b.{k}.")])
    with pytest.raises(ValueError, match="ambiguous"):                             # x.downs. is claimed twice
        template_rules([("x.{stage}.", "y.{stage}."), ("x.downs.", "z.")])


def test_plan_lists_missing_unexpected_and_mismatched_names():
    from ms_diffusion.interop.lucidrains import unet_plan

    net = Unet(dim=8, dim_mults=(1, 2), channels=1)
    plan = unet_plan(net)
    state = plan.to_torch(state_arrays(net))
    assert "downs.0.0.block1.proj.weight" in state and "downs.1.3.weight" in state   # lucidrains' ModuleList indices
    broken = dict(state)
    del broken["final_conv.bias"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["init_conv.weight"] = np.zeros((8, 1, 3, 3), np.float32)
    with pytest.raises(ConversionError) as err:
        plan.to_ms(broken)
    message = str(err.value)
    assert "missing (1): final_conv.bias" in message and "unexpected (1): extra.weight" in message
    assert "init_conv.weight (8, 1, 3, 3) (model expects (8, 1, 7, 7))" in message
    _same_arrays(plan.to_ms(state), state_arrays(net))                      # and exact both ways


def test_batchnorm_running_stats_map_and_num_batches_tracked_is_dropped_on_purpose():
    from ms_diffusion.interop.names import LDM
    from ms_diffusion.models.discriminator import NLayerDiscriminator

    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2)
    plan = build_plan(disc, LDM)
    state = plan.to_torch(state_arrays(disc))
    assert {"main.3.running_mean", "main.3.running_var", "main.3.weight", "main.3.bias"} <= set(state)
    state["main.3.num_batches_tracked"] = np.array(12, np.int64)           # what torch's BatchNorm2d saves
    arrays = plan.to_ms(state)
    assert "main.3.moving_variance" in arrays and not any("num_batches" in k for k in arrays)
    assert "main.3.num_batches_tracked" in plan.dropped


def test_gaussian_diffusion_export_refuses_what_lucidrains_cannot_hold():
    from ms_diffusion.interop.lucidrains import diffusion_plan, unet_plan

    with pytest.raises(ConversionError, match="tutorial"):
        unet_plan(Unet(dim=12, dim_mults=(1, 2), channels=1, block_type="convnext"))
    with pytest.raises(ConversionError, match="class"):
        unet_plan(Unet(dim=8, dim_mults=(1, 2), channels=1, num_classes=3))
    d = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), channels=1), image_size=8, timesteps=10, learn_logvar=True)
    plan = diffusion_plan(d)
    arrays = state_arrays(d)
    assert set(plan.to_torch(arrays)) >= {"betas", "loss_weight", "model.init_conv.weight"}
    arrays["logvar"] = arrays["logvar"] + 0.5                              # a learned log-variance
    with pytest.raises(ConversionError, match="logvar .* refusing to drop it"):
        plan.to_torch(arrays)


def test_unsupported_diffusers_configs_are_named():
    from ms_diffusion.interop.diffusers import autoencoder_config_from_diffusers, unet_kwargs_from_diffusers

    ddpm_cifar10 = {"_class_name": "UNet2DModel", "block_out_channels": [128, 256, 256, 256],
                    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                    "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "layers_per_block": 2}
    _, problems = unet_kwargs_from_diffusers(ddpm_cifar10)
    assert any("flip_sin_to_cos=False" in p for p in problems) and any("freq_shift=1" in p for p in problems)
    assert any("downsample_padding=0" in p for p in problems)
    sdxl = {"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
            "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048}
    _, problems = unet_kwargs_from_diffusers(sdxl)
    assert any("addition_embed_type" in p for p in problems) and any("transformer_layers_per_block" in p
                                                                     for p in problems)
    sd15 = {"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8,
            "cross_attention_dim": 768, "layers_per_block": 2, "sample_size": 64}
    kwargs, problems = unet_kwargs_from_diffusers(sd15)
    assert problems == [] and kwargs["attention_resolutions"] == [1, 2, 4] and kwargs["num_heads"] == 8
    sd21 = dict(sd15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
    kwargs, problems = unet_kwargs_from_diffusers(sd21)
    assert problems == [] and kwargs["num_head_channels"] == 64 and kwargs["use_linear_in_transformer"]
    _, problems = autoencoder_config_from_diffusers({"block_out_channels": [64, 128], "use_quant_conv": False})
    assert any("use_quant_conv" in p for p in problems)


def test_ldm_yaml_is_read_without_imports_and_maps_the_schedule():
    from ms_diffusion.interop.ldm import parse_ldm_config

    cfg = parse_ldm_config({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "image_size": 32, "loss_type": "l1",
        "scale_by_std": True, "cond_stage_config": "__is_unconditional__",
        "unet_config": {"target": "x", "params": {"image_size": 32, "in_channels": 4, "out_channels": 4,
                                                  "model_channels": 192, "attention_resolutions": [1, 2, 4, 8],
                                                  "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4],
                                                  "num_heads": 8, "use_scale_shift_norm": True,
                                                  "resblock_updown": True, "use_checkpoint": True}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                         "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                         "attn_resolutions": [], "dropout": 0.0}}}}}})
    assert cfg.problems == [] and cfg.unet_problems == []
    assert cfg.diffusion["beta_schedule"] == "ldm_linear" and cfg.diffusion["conditioning_key"] is None
    assert cfg.diffusion["schedule_fn_kwargs"] == {"beta_start": 0.0015, "beta_end": 0.0155}
    assert cfg.diffusion["image_size"] == 256 and cfg.diffusion["loss_type"] == "l1"   # latent 32 x f 8
    assert "use_checkpoint" not in cfg.unet
    text = parse_ldm_config({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "unet_config": {"params": {"num_classes": "sequential", "adm_in_channels": 2816}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface"},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}})
    assert any("sequential" in p for p in text.unet_problems)
    assert any("VQ" in p for p in text.problems)
    assert text.text_stage == {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "source": "transformers",
                               "layer": "last", "max_length": 77}
    sd2 = parse_ldm_config({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"layer": "penultimate", "freeze": True}}}}})
    assert sd2.text_stage["source"] == "open_clip" and sd2.text_stage["layer"] == "penultimate"
    pooled = parse_ldm_config({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                              "params": {"layer": "hidden", "layer_idx": -2}}}}})
    assert any("'hidden'" in p for p in pooled.problems)


def test_importing_the_package_does_not_import_torch():
    code = ("import sys, ms_diffusion, ms_diffusion.interop, ms_diffusion.interop.lucidrains, "
            "ms_diffusion.interop.ldm, ms_diffusion.interop.diffusers; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_cli_help_and_usage_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "from-lucidrains" in proc.stdout and "to-diffusers" in proc.stdout
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("hello")
    rc, _, err = _cli("from-lucidrains", not_weights, tmp_path / "o.ckpt", "--set", "diffusion.image_size=8")
    assert rc == 2 and "neither a PyTorch checkpoint" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli("from-ldm", not_weights, tmp_path / "o.ckpt")
    assert rc == 2 and "--ldm-config" in err


# ----------------------------------------------------------------------------- lucidrains

@pytest.mark.torch
@pytest.mark.parametrize("name", ["self-cond, full attention", "learned variance, linear + full attention"])
def test_lucidrains_unet_parity_and_exact_round_trip(parity, name):
    import torch

    kwargs = parity.bench.LUCIDRAINS_UNET_CONFIGS[name]
    case = parity("lucidrains_unet", kwargs)
    _assert_parity(case)
    cfg = case.extra["config"]
    assert all(cfg[k] == v for k, v in kwargs.items() if k != "full_attn")   # inferred from the shapes alone
    assert {"dim", "dim_mults", "channels"} <= set(case.extra["inferred"])
    plan, ours = case.extra["plan"], case.extra["ours"]
    exported = plan.to_torch(state_arrays(ours))
    _same_arrays(exported, case.extra["state"])                                    # ms -> torch is exact
    fresh = case.extra["module"].Unet(**kwargs)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    _same_arrays(plan.to_ms({k: v.numpy() for k, v in fresh.state_dict().items()}), state_arrays(ours))


@pytest.mark.torch
def test_infer_unet_config_refuses_to_guess_channels():
    import torch

    from ms_diffusion.interop.lucidrains import infer_unet_config
    from tests.anchors import lucidrains

    L = lucidrains()
    ref = L.Unet(dim=8, dim_mults=(1, 2), channels=1, self_condition=True, learned_variance=True)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    with pytest.raises(ConversionError) as err:
        infer_unet_config(state)
    assert ("channels=2, self_condition=False, learned_variance=False or channels=1, self_condition=True, "
            "learned_variance=True; pass model.channels") in str(err.value)
    cfg, inferred = infer_unet_config(state, {"channels": 1})
    assert cfg["self_condition"] and cfg["learned_variance"] and "channels" not in inferred
    # GaussianDiffusion never pairs them, so for a diffusion checkpoint the shapes decide
    assert infer_unet_config(state, for_diffusion=True)[0]["channels"] == 2
    full = L.Unet(dim=8, dim_mults=(1, 2, 2), channels=3, attn_heads=(1, 2, 4), attn_dim_head=(8, 8, 16),
                  full_attn=(True, False, True))
    cfg, _ = infer_unet_config({k: v.numpy() for k, v in full.state_dict().items()})
    assert cfg["full_attn"] == (True, False, True) and cfg["attn_heads"] == (1, 2, 4)
    assert cfg["attn_dim_head"] == (8, 8, 16) and torch is not None


@pytest.mark.torch
def test_lucidrains_trainer_checkpoint_ddim_sample_through_the_cli(parity):
    case = parity("lucidrains_trainer_ddim")
    _assert_parity(case)
    log = case.extra["log"]
    assert "model.dim = 8: inferred from the weight shapes" in log
    assert "diffusion.beta_schedule = sigmoid: inferred from the schedule buffers" in log
    assert "not converted: opt -- optimizer state" in log and "sample with: python sample.py --ckpt" in log
    assert case.extra["meta"]["step"] == 3


@pytest.mark.torch
def test_lucidrains_round_trip_and_sample_cli(parity, tmp_path):
    import ema_pytorch
    import torch

    from ms_diffusion.cli.sample import main as sample_main
    from ms_diffusion.interop.checkpoints import read_ms_checkpoint

    case = parity("lucidrains_trainer_ddim")
    L, src, converted = case.extra["module"], case.extra["src"], case.extra["out"]
    back = tmp_path / "model-back.pt"
    rc, out, err = _cli("to-lucidrains", converted, back)
    assert rc == 0, err
    data = torch.load(back, weights_only=True)
    original = torch.load(src, weights_only=True)
    assert set(data) == {"step", "model", "ema", "version"} and data["step"] == 3
    fresh = L.GaussianDiffusion(L.Unet(dim=8, dim_mults=(1, 2), channels=1), image_size=8, timesteps=20)
    fresh.load_state_dict(data["model"], strict=True)
    ema_pytorch.EMA(fresh).load_state_dict(data["ema"], strict=True)
    for key in ("initted", "step"):                  # scalar buffers stay scalars
        assert data["ema"][key].shape == original["ema"][key].shape, key
    for key, value in original["model"].items():     # weights bitwise; buffers recomputed by our schedule
        if key.startswith("model."):
            assert torch.equal(value, data["model"][key]), key
        else:
            torch.testing.assert_close(data["model"][key], value, rtol=3e-5, atol=1e-30)
    again = tmp_path / "again.ckpt"
    rc, _, err = _cli("from-lucidrains", back, again, "--set", "diffusion.image_size=8",
                      "--set", "diffusion.sampling_timesteps=5")
    assert rc == 0, err
    _, first, _ = read_ms_checkpoint(converted)
    _, second, _ = read_ms_checkpoint(again)
    for group in ("online", "ema"):                                               # ms -> torch -> ms: bitwise
        _same_arrays(first[group], second[group])
    png = tmp_path / "s.png"
    assert sample_main(["--ckpt", str(converted), "--num", "2", "--steps", "2", "--out", str(png),
                        "--no-progress", "--mode", "pynative"]) == 0
    assert png.is_file()


@pytest.mark.torch
def test_lucidrains_conversion_errors(parity, tmp_path):
    import torch

    case = parity("lucidrains_trainer_ddim")
    src = case.extra["src"]
    rc, _, err = _cli("from-lucidrains", src, tmp_path / "x.ckpt", "--set", "diffusion.image_size=8",
                      "--set", "diffusion.beta_schedule=cosine")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "buffer 'betas' does not match" in err and "in the checkpoint but" in err
    assert "the buffers fit diffusion.timesteps=20, diffusion.beta_schedule=sigmoid" in err
    rc, _, err = _cli("from-lucidrains", src, tmp_path / "x.ckpt")
    assert rc == 2 and "diffusion.image_size is required" in err
    data = torch.load(src, weights_only=True)
    data["model"].pop("model.final_conv.bias")
    data["model"]["model.surprise"] = torch.zeros(2)
    data.pop("ema")
    broken = tmp_path / "broken.pt"
    torch.save(data, broken)
    rc, _, err = _cli("from-lucidrains", broken, tmp_path / "x.ckpt", "--set", "diffusion.image_size=8")
    assert rc == 2 and "missing (1): model.final_conv.bias" in err and "unexpected (1): model.surprise" in err

    class Payload:   # a pickle that would run code on load
        def __reduce__(self):
            return (print, ("unpickled!",))

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": Payload()}, unsafe)
    rc, out, err = _cli("from-lucidrains", unsafe, tmp_path / "x.ckpt", "--set", "diffusion.image_size=8")
    assert rc == 2 and "cannot be loaded safely" in err and "unpickled!" not in out


# ----------------------------------------------------------------------------- autoencoder

@pytest.mark.torch
def test_autoencoder_from_diffusers_folder_parity_and_round_trip(parity, tmp_path):
    import diffusers

    case = parity("diffusers_vae")
    _assert_parity(case)
    assert "an autoencoder run" in case.extra["log"]
    assert case.extra["config"]["model"]["type"] == "autoencoder_kl"
    folder = tmp_path / "back"
    rc, _, err = _cli("to-diffusers", case.extra["out"], folder)
    assert rc == 0, err
    reloaded = diffusers.AutoencoderKL.from_pretrained(folder)
    ref = case.extra["ref"]
    assert dict(reloaded.config)["block_out_channels"] == list(ref.config.block_out_channels)
    _same_arrays({k: v.numpy() for k, v in reloaded.state_dict().items()},
                 {k: v.numpy() for k, v in ref.state_dict().items()})


@pytest.mark.torch
def test_autoencoder_from_ldm_state_dict(parity):
    case = parity("ldm_vae")
    _assert_parity(case)
    # diffusers' own ldm -> diffusers converter reads our ldm names back to the original weights
    converted = {k: np.asarray(v) for k, v in case.extra["diffusers_from_ldm"].items()}
    _same_arrays(converted, {k: v.numpy() for k, v in case.extra["ref"].state_dict().items()})
    assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in case.extra["ldm_state"]
    # diffusers -> ms -> ldm -> ms gives back the same weights, bitwise
    _same_arrays(state_arrays(case.extra["ours"]), state_arrays(parity("diffusers_vae").extra["ours"]))
    assert "not converted: (not first_stage_model.*) -- 2 tensors of the other components" in case.extra["log"]


# ----------------------------------------------------------------------------- ldm UNetModel

@pytest.mark.torch
def test_ldm_unet_cross_attention_and_class_labels(parity, tmp_path):
    import diffusers

    from ms_diffusion.interop.ldm import ldm_to_ms

    case = parity("ldm_unet_crossattn")
    _assert_parity(case)
    ref_state = {k: v.numpy() for k, v in case.extra["ref"].state_dict().items()}
    _same_arrays({k: np.asarray(v) for k, v in case.extra["diffusers_from_ldm"].items()}, ref_state)
    ldm_state = case.extra["ldm_state"]
    assert "model.diffusion_model.label_emb.weight" in ldm_state
    assert ldm_state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4
    # the ldm path and the diffusers path give the same weights; LitEma's copy is taken by default
    _same_arrays(state_arrays(case.extra["ours"]), state_arrays(case.extra["via_diffusers"]))
    with_ema = ldm_to_ms(case.extra["ckpt"], case.extra["yaml"], "unet")
    shifted = {k: v + np.float32(0.5) for k, v in state_arrays(case.extra["ours"]).items()}
    _same_arrays(with_ema.online, shifted)
    assert with_ema.meta["weights"] == "ema"
    folder = tmp_path / "unet_back"
    rc, _, err = _cli("to-diffusers", case.extra["first"], folder)
    assert rc == 0, err
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(folder)
    _same_arrays({k: v.numpy() for k, v in reloaded.state_dict().items()}, ref_state)


@pytest.mark.torch
def test_unet2d_self_attention_and_class_labels(parity, tmp_path):
    import diffusers

    case = parity("diffusers_unet2d")
    _assert_parity(case)
    assert case.extra["arrays"]["input_blocks.3.1.qkv.weight"].shape == (96, 32, 1, 1)   # to_q/k/v fused
    folder = tmp_path / "unet2d_back"
    rc, _, err = _cli("to-diffusers", case.extra["out"], folder)
    assert rc == 0, err
    reloaded = diffusers.UNet2DModel.from_pretrained(folder)
    _same_arrays({k: v.numpy() for k, v in reloaded.state_dict().items()},
                 {k: v.numpy() for k, v in case.extra["ref"].state_dict().items()})
    rc, _, err = _cli("to-lucidrains", case.extra["out"], tmp_path / "x.pt")
    assert rc == 2 and "no experiment config" in err


# ----------------------------------------------------------------------------- ldm LatentDiffusion, whole

def _ldm_register_schedule(T: int, linear_start: float, linear_end: float) -> dict:
    """ldm DDPM.register_schedule's persistent buffers (v_posterior 0), in numpy as ldm computes them."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, T, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev, "sqrt_alphas_cumprod": np.sqrt(ac),
           "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac), "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
           "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
           "posterior_variance": post_var, "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
           "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
           "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)}
    return {k: v.astype(np.float32) for k, v in out.items()}


def _ldm_layout_from_anchor(convert, candidates, reference) -> dict:
    """An ldm state dict holding ``reference``'s weights (a diffusers state dict), each element placed where the
    anchor's ldm -> diffusers converter ``convert`` reads it.

    ``candidates`` ({ldm name: shape}) name the ldm tensors; each is filled with unique tags, the converter runs on
    them, and every diffusers tensor it returns says which ldm tensor -- and which elements of it, through the
    converter's own reshapes -- it was read from. Fails unless the converter reads every candidate element exactly
    once and returns exactly ``reference``'s names and shapes: the candidate names (ours) are then the ones the
    anchor reads, while the values and their layout come from the anchor's mapping, not from our exporter."""
    names, starts, tags, start = [], [], {}, 0
    for name, shape in candidates.items():
        size = int(np.prod(shape))
        tags[name] = np.arange(start, start + size, dtype=np.float64).reshape(shape)
        names.append(name)
        starts.append(start)
        start += size
    converted = convert(dict(tags))
    assert set(converted) == set(reference), sorted(set(converted) ^ set(reference))[:6]
    out = {name: np.full(shape, np.nan, np.float32) for name, shape in candidates.items()}
    reads = np.zeros(start, np.int64)
    for key, tag in converted.items():
        tag, want = np.asarray(tag), reference[key]
        assert tag.shape == want.shape, (key, tag.shape, want.shape)
        flat = tag.reshape(-1).astype(np.int64)
        owner = names[int(np.searchsorted(starts, flat[0], side="right")) - 1]
        local = flat - starts[names.index(owner)]
        assert local.min() >= 0 and local.max() < out[owner].size, f"{key} is read from several ldm tensors"
        out[owner].reshape(-1)[local] = want.reshape(-1)
        np.add.at(reads, flat, 1)
    unread = sorted({names[int(np.searchsorted(starts, i, side="right")) - 1] for i in np.flatnonzero(reads != 1)})
    assert not unread, f"the anchor does not read these ldm tensors exactly once: {unread[:6]}"
    return out


def _random_torch_module(module, seed: int):
    """Every weight moved off its init (norm scales off 1, zero-initialised convs off 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _max_rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.torch
def test_whole_ldm_latent_diffusion_checkpoint(tmp_path):
    """A class-conditional KL LatentDiffusion checkpoint (ClassEmbedder, LitEma, scale_by_std) built from random
    diffusers models through diffusers' own ldm converters converts whole, computes what those models compute,
    and goes back to the same ldm state dict."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import mindspore as ms
    import yaml
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    from ms_diffusion.interop.ldm import autoencoder_plan, unet_plan
    from ms_diffusion.models import AutoencoderKL, UNetModel
    from ms_diffusion.pipeline import generate, load_diffusion

    torch.set_num_threads(2)
    unet_cfg = dict(image_size=4, in_channels=3, out_channels=3, model_channels=16, attention_resolutions=[2],
                    num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                    transformer_depth=1, context_dim=8, norm_num_groups=8)
    ddconfig = dict(double_z=True, z_channels=3, resolution=8, in_channels=1, out_ch=1, ch=8, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0, norm_num_groups=4)
    params = {"linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 20, "image_size": 4, "channels": 3,
              "cond_stage_key": "class_label", "conditioning_key": "crossattn", "scale_by_std": True,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_cfg},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                     "params": {"embed_dim": 3, "ddconfig": ddconfig,
                                                "lossconfig": {"target": "torch.nn.Identity"}}},
              "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                    "params": {"n_classes": 5, "embed_dim": 8, "key": "class_label"}}}
    # diffusers reads the ldm YAML into its own configs; norm_num_groups is ours (ldm's GroupNorm has 32 groups)
    original = {"model": {"params": params}}
    with pytest.warns(FutureWarning):   # image_size is deprecated there; without it diffusers guesses from keys
        unet_config = create_unet_diffusers_config_from_ldm(original, {}, image_size=8)
        vae_config = create_vae_diffusers_config_from_ldm(original, {}, image_size=8)
    unet_config["norm_num_groups"], vae_config["norm_num_groups"] = 8, 4
    ref_unet = _random_torch_module(diffusers.UNet2DConditionModel(**unet_config), 0)
    ref_ema = _random_torch_module(diffusers.UNet2DConditionModel(**unet_config), 1)
    ref_vae = _random_torch_module(diffusers.AutoencoderKL(**vae_config), 2)
    sd = {name: {k: v.numpy() for k, v in m.state_dict().items()}
          for name, m in (("unet", ref_unet), ("ema", ref_ema), ("vae", ref_vae))}

    # the ldm names to try are ours; which diffusers weight each one holds is the anchor's answer
    unet, vae = UNetModel(**unet_cfg), AutoencoderKL(ddconfig, 3)
    unet_names = {k: v.shape for k, v in unet_plan(unet).to_torch(state_arrays(unet)).items()}
    vae_names = {k: v.shape for k, v in autoencoder_plan(vae).to_torch(state_arrays(vae)).items()}
    # ldm's AttnBlock holds q, k, v, proj_out as 1x1 Conv2d (diffusers' converter accepts 2-, 3- or 4-d there)
    assert all(len(vae_names[f"first_stage_model.{part}.mid.attn_1.{w}.weight"]) == 4
               for part in ("encoder", "decoder") for w in ("q", "k", "v", "proj_out"))
    read_unet = lambda state: convert_ldm_unet_checkpoint(state, unet_config)  # noqa: E731
    state = _ldm_layout_from_anchor(read_unet, unet_names, sd["unet"])
    ema_unet = _ldm_layout_from_anchor(read_unet, unet_names, sd["ema"])
    state.update(_ldm_layout_from_anchor(lambda st: convert_ldm_vae_checkpoint(st, vae_config), vae_names, sd["vae"]))
    rng = np.random.default_rng(0)
    table = rng.standard_normal((5, 8)).astype(np.float32)   # ClassEmbedder: nn.Embedding(n_classes, embed_dim)
    state["cond_stage_model.embedding.weight"] = table       # 4 classes + the null class
    state.update(_ldm_register_schedule(20, 0.0015, 0.0155))
    state["scale_factor"] = np.array(0.75, np.float32)
    # LitEma: one buffer per DiffusionWrapper parameter, named with its dots removed
    shadow = {"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ema_unet.items()}
    counters = {"model_ema.decay": np.array(0.9999, np.float32), "model_ema.num_updates": np.array(9, np.int32)}
    whole = {**state, **shadow, **counters}
    # diffusers' single-file loader finds the same two unets in the whole checkpoint (extract_ema reads LitEma)
    for extract_ema, ref in ((False, sd["unet"]), (True, sd["ema"])):
        _same_arrays({k: np.asarray(v) for k, v in convert_ldm_unet_checkpoint(dict(whole), unet_config,
                                                                               extract_ema=extract_ema).items()}, ref)
    _same_arrays({k: np.asarray(v) for k, v in convert_ldm_vae_checkpoint(dict(whole), vae_config).items()},
                 sd["vae"])
    ckpt = tmp_path / "ldm.ckpt"
    write_weights(ckpt, {"state_dict": whole, "global_step": 9, "epoch": 1})
    config = tmp_path / "cin.yaml"
    config.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                                "params": params}}))
    out = tmp_path / "ldm_ms.ckpt"
    rc, log, err = _cli("from-ldm", ckpt, out, "--ldm-config", config, "--set", "sample.steps=2")
    assert rc == 0, err
    assert "with EMA weights" in log and "not converted: epoch -- Lightning training state" in log
    _, ema_model, meta = load_diffusion(out, "ema")
    _, online_model, _ = load_diffusion(out, "online")
    assert online_model.model.num_classes == 4 and float(online_model.scale_factor.asnumpy()) == 0.75
    # the converted models compute what the diffusers models compute
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    t, y = np.array([3, 17], np.int32), np.array([1, 3], np.int32)
    errors = {}
    for name, model, ref in (("online", online_model, ref_unet), ("ema", ema_model, ref_ema)):
        got = model.model(ms.Tensor(x), ms.Tensor(t), None, ms.Tensor(y)).asnumpy()
        with torch.no_grad():
            want = ref(torch.from_numpy(x), torch.from_numpy(t).long(),
                       encoder_hidden_states=torch.from_numpy(table[y][:, None, :])).sample.numpy()
        errors[f"{name} eps"] = _max_rel(got, want)
    pixels = rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want_moments = ref_vae.encode(torch.from_numpy(pixels)).latent_dist.parameters.numpy()
        want_images = ref_vae.decode(torch.from_numpy(x / np.float32(0.75))).sample.numpy()
    errors["encode"] = _max_rel(ema_model.first_stage_model.encode_moments(ms.Tensor(pixels)).asnumpy(), want_moments)
    errors["decode"] = _max_rel(ema_model.decode_first_stage(ms.Tensor(x)).asnumpy(), want_images)
    assert max(errors.values()) <= 1e-5, errors
    images = generate(ema_model, 2, batch_size=2, seed=0, sampler="ddim", steps=2, classes=[1, 3]).images
    assert images.shape == (2, 1, 8, 8) and np.isfinite(images).all()
    # ms -> ldm -> ms is exact, and the buffers come back as ldm computes them
    back = tmp_path / "back.ckpt"
    rc, _, err = _cli("to-ldm", out, back)
    assert rc == 0, err
    again = torch.load(back, weights_only=True)["state_dict"]
    original = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(again) == set(original) == set(whole)
    for key, value in original.items():
        if key in _ldm_register_schedule(2, 0.1, 0.2) or key == "model_ema.decay" or key == "model_ema.num_updates":
            continue
        assert torch.equal(again[key], value), key
    for key in _ldm_register_schedule(2, 0.1, 0.2):
        torch.testing.assert_close(again[key], original[key], rtol=1e-6, atol=0)
    # a config whose schedule differs from the checkpoint's buffers is refused, naming both values
    params["linear_end"] = 0.012
    config.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                                "params": params}}))
    rc, _, err = _cli("from-ldm", ckpt, tmp_path / "x.ckpt", "--ldm-config", config)
    assert rc == 2 and "buffer 'betas' does not match" in err and "betas[1] =" in err


def test_safetensors_reader_matches_safetensors_and_names_damage(tmp_path):
    """Our plain-read safetensors reader (no mapping held twice) against the safetensors package itself: every
    dtype, bfloat16 as float32 (as torch's .float()), empty and 0-d tensors, the metadata; then a file cut short,
    a header that is not JSON and a float8 tensor, each named, through read_weights as ConversionError. The
    header-only metadata reader agrees with safe_open and with no metadata at all."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ms_diffusion.interop.torch_io import read_weights
    from ms_diffusion.io.safetensors_io import read_safetensors, read_safetensors_metadata

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f64": torch.randn(5, generator=g).double(),
               "f16": torch.randn(2, 2, generator=g).half(), "bf16": torch.randn(7, 3, generator=g).bfloat16(),
               "i64": torch.arange(6).reshape(2, 3), "i32": torch.arange(4, dtype=torch.int32),
               "i8": torch.arange(-2, 3, dtype=torch.int8), "u8": torch.arange(5, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.5)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    arrays, meta = read_safetensors(path)
    assert meta == {"format": "pt", "note": "x"} and sorted(arrays) == sorted(tensors)
    for name, t in tensors.items():
        expected = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert arrays[name].dtype == expected.dtype and arrays[name].shape == expected.shape, name
        np.testing.assert_array_equal(arrays[name], expected, err_msg=name)
    assert read_weights(path)[1] == meta
    with safe_open(str(path), framework="numpy") as f:
        assert read_safetensors_metadata(path) == f.metadata() == meta
    save_file({"x": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    assert read_safetensors_metadata(tmp_path / "bare.safetensors") == {}

    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(ConversionError, match=r"cannot read safetensors file .*cut.safetensors: tensor '\w+' lies "
                                              r"past the end of the file .*cut short"):
        read_weights(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json" + b" " * 40)
    with pytest.raises(ConversionError, match="the header is not JSON"):
        read_weights(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short for a safetensors header"):
        read_safetensors(tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="the header is not JSON"):
        read_safetensors_metadata(tmp_path / "junk.safetensors")
    if hasattr(torch, "float8_e4m3fn"):
        save_file({"f8": torch.zeros(4).to(torch.float8_e4m3fn)}, str(tmp_path / "f8.safetensors"))
        with pytest.raises(ConversionError, match="F8_E4M3, which numpy cannot hold"):
            read_weights(tmp_path / "f8.safetensors")
