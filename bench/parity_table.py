#!/usr/bin/env python
"""Numerical parity of converted PyTorch models with their PyTorch originals (CPU, float32).

Each case builds a small reference network in PyTorch with random weights (norm scales and
shifts perturbed so that a gamma/beta mix-up would show), converts it through
``ms_diffusion.interop`` -- from a file, as a user would -- and runs both on the same inputs, in
PyNative and in graph mode (``ms.jit``). ``python bench/parity_table.py`` prints the table that
docs/interop.md quotes; tests/test_interop.py asserts on the same cases.

Errors: ``max abs`` = max |ours - torch|, ``mean abs`` = mean |ours - torch|, ``max rel`` = max abs /
max |torch|, ``mean rel`` = mean abs / mean |torch|.

Needs torch, diffusers, einops, ema-pytorch and denoising-diffusion-pytorch (--no-deps).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ms_diffusion  # noqa: E402,F401  (CPU workaround before MindSpore makes kernels)
import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

from ms_diffusion.interop.torch_io import write_weights  # noqa: E402

__all__ = ["Case", "errors", "both_modes", "lucidrains_unet", "lucidrains_trainer_ddim", "diffusers_vae",
           "ldm_vae", "ldm_unet_crossattn", "diffusers_unet2d", "convert_cli",
           "LUCIDRAINS_UNET_CONFIGS", "main"]

MODES = ("pynative", "graph")

# lucidrains Unet configurations: self-conditioning, learned variance, full and linear attention
LUCIDRAINS_UNET_CONFIGS: Dict[str, Dict[str, Any]] = {
    "self-cond, full attention": dict(dim=8, dim_mults=(1, 2), channels=2, self_condition=True,
                                      full_attn=(True, True)),
    "learned variance, linear + full attention": dict(dim=8, dim_mults=(1, 2, 2), channels=3, learned_variance=True,
                                                      attn_heads=2, attn_dim_head=8),
}


@dataclass
class Case:
    """One parity case: the reference outputs, ours per mode, and what the tests inspect further."""

    name: str
    want: Dict[str, np.ndarray]                        # output name -> torch output
    got: Dict[str, Dict[str, np.ndarray]]              # mode -> output name -> ours
    extra: Dict[str, Any] = field(default_factory=dict)

    def rows(self) -> List[Dict[str, Any]]:
        out = []
        for mode in MODES:
            for key, want in self.want.items():
                label = self.name if len(self.want) == 1 else f"{self.name}: {key}"
                out.append({"model": label, "mode": mode, **errors(self.got[mode][key], want)})
        return out


def errors(got: np.ndarray, want: np.ndarray) -> Dict[str, float]:
    """max / mean absolute error, and both relative to the reference's max / mean magnitude."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shape {got.shape} vs reference {want.shape}")
    diff = np.abs(got - want)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float(diff.max() / max(np.abs(want).max(), 1e-30)),
            "mean_rel": float(diff.mean() / max(np.abs(want).mean(), 1e-30))}


def both_modes(fn: Callable, *args) -> Dict[str, Dict[str, np.ndarray]]:
    """{mode: {output name: array}} of ``fn(*args)`` (a dict of Tensors) in PyNative and under ``ms.jit``.

    The compiled function returns a tuple: MindSpore 2.10 fails to compile a function that returns a dict
    when the graph holds a Custom operator (our CPU kernels).
    """
    eager = fn(*args)
    keys = tuple(eager)

    def as_tuple(*inputs):
        out = fn(*inputs)
        return tuple(out[k] for k in keys)

    return {"pynative": {k: v.asnumpy() for k, v in eager.items()},
            "graph": dict(zip(keys, (v.asnumpy() for v in ms.jit(as_tuple)(*args))))}


def _torch():
    import torch

    torch.set_num_threads(2)
    return torch


def _perturb_norms(module, scale: float = 0.2, seed: int = 0) -> None:
    """Make every norm scale / shift (all ones / zeros at init) differ per channel."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or leaf == "g":
                p.add_(scale * torch.randn(p.shape, generator=g))


def torch_state(module) -> Dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def convert_cli(argv: Sequence[str]) -> str:
    """Run ``scripts/convert_checkpoint.py`` with ``argv`` in this process; return its stdout (raise on failure)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main(list(argv))
    if rc != 0:
        raise RuntimeError(f"convert_checkpoint.py {' '.join(argv)} failed ({rc}): {err.getvalue().strip()}")
    return out.getvalue()


# ----------------------------------------------------------------------------- lucidrains

def _lucidrains():
    from tests.anchors import lucidrains

    return lucidrains()


def lucidrains_unet(kwargs: Dict[str, Any], name: str = "lucidrains Unet", size: int = 8, seed: int = 0) -> Case:
    """lucidrains Unet -> our Unet, config inferred from the weight shapes."""
    from ms_diffusion import Unet
    from ms_diffusion.interop.lucidrains import infer_unet_config, unet_plan
    from ms_diffusion.io.state import load_arrays_into

    torch = _torch()
    L = _lucidrains()
    torch.manual_seed(seed)
    ref = L.Unet(**kwargs).eval()
    _perturb_norms(ref, seed=seed)
    state = torch_state(ref)
    cfg, inferred = infer_unet_config(state)
    net = Unet(**cfg)
    net.set_train(False)
    plan = unet_plan(net)
    load_arrays_into(net, plan.to_ms(state))
    rng = np.random.default_rng(seed)
    c = kwargs["channels"]
    x = rng.standard_normal((2, c, size, size)).astype(np.float32)
    t = np.array([3, 870], np.int32)
    sc = (0.5 * rng.standard_normal(x.shape)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t).long(),
                   torch.from_numpy(sc) if kwargs.get("self_condition") else None).numpy()
    if kwargs.get("self_condition"):
        def fwd(x, t, sc):
            return {"out": net(x, t, sc)}
        got = both_modes(fwd, ms.Tensor(x), ms.Tensor(t), ms.Tensor(sc))
    else:
        def fwd(x, t):
            return {"out": net(x, t)}
        got = both_modes(fwd, ms.Tensor(x), ms.Tensor(t))
    return Case(name, {"out": want}, got, {"ref": ref, "ours": net, "plan": plan, "state": state, "config": cfg,
                                           "inferred": inferred, "module": L})


@contextlib.contextmanager
def _replayed_torch_noise(torch, x_T: np.ndarray):
    """lucidrains draws x_T with torch.randn and per-step noise with torch.randn_like: make them x_T and zeros
    (DDIM with eta = 0 multiplies its per-step noise by zero)."""
    randn, randn_like = torch.randn, torch.randn_like
    torch.randn = lambda *a, **k: torch.from_numpy(x_T.copy())
    torch.randn_like = lambda x, **k: torch.zeros_like(x)
    try:
        yield
    finally:
        torch.randn, torch.randn_like = randn, randn_like


def lucidrains_trainer_ddim(tmp: Path, steps: int = 5, timesteps: int = 20) -> Case:
    """A Trainer checkpoint model-N.pt (model + ema-pytorch EMA), converted with the CLI, loaded the way sample.py
    loads it, sampled with DDIM from the same x_T as lucidrains' EMA model."""
    import ema_pytorch

    from ms_diffusion import runtime
    from ms_diffusion.pipeline import load_diffusion

    torch = _torch()
    L = _lucidrains()
    torch.manual_seed(1)
    diffusion = L.GaussianDiffusion(L.Unet(dim=8, dim_mults=(1, 2), channels=1), image_size=8, timesteps=timesteps,
                                    sampling_timesteps=steps)   # lucidrains defaults: pred_v, sigmoid schedule
    ema = ema_pytorch.EMA(diffusion, beta=0.5, update_every=1, update_after_step=0)
    with torch.no_grad():
        for p in diffusion.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.update()
    ema.update()
    src = tmp / "model-3.pt"
    torch.save({"step": 3, "model": diffusion.state_dict(), "opt": torch.optim.Adam(diffusion.parameters()).state_dict(),
                "ema": ema.state_dict(), "scaler": None, "version": "2.3.4"}, src)
    out = tmp / "lucidrains_ms.ckpt"
    log = convert_cli(["from-lucidrains", str(src), str(out), "--set", "diffusion.image_size=8",
                       "--set", f"diffusion.sampling_timesteps={steps}"])
    x_T = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with torch.no_grad(), _replayed_torch_noise(torch, x_T):
        want = ema.ema_model.sample(batch_size=2).numpy()
    got = {}
    for mode in MODES:
        runtime.set_jit_enabled(mode == "graph")
        try:
            _, ours, meta = load_diffusion(out, "ema")
            got[mode] = {"sample": ours.sample(batch_size=2, x_T=ms.Tensor(x_T)).asnumpy()}
        finally:
            runtime.set_jit_enabled(True)
    return Case(f"GaussianDiffusion DDIM {steps} steps (Trainer checkpoint, EMA)", {"sample": want}, got,
                {"log": log, "out": out, "src": src, "ref": diffusion, "ema": ema, "module": L, "meta": meta})


# ----------------------------------------------------------------------------- autoencoder

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(16, 32), sample_size=16)


def _vae_outputs(vae, x: np.ndarray, z: np.ndarray) -> Dict[str, Dict[str, np.ndarray]]:
    def fwd(x, z):
        return {"encode": vae.encode_moments(x), "decode": vae.decode(z)}

    vae.set_train(False)
    return both_modes(fwd, ms.Tensor(x), ms.Tensor(z))


def _vae_inputs(seed: int = 3):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32),
            rng.standard_normal((2, 4, 8, 8)).astype(np.float32))


def _reference_vae(tmp: Path):
    import diffusers

    torch = _torch()
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY_VAE).eval()
    _perturb_norms(ref)
    folder = tmp / "diffusers_vae"
    if not folder.exists():
        ref.save_pretrained(folder)
    x, z = _vae_inputs()
    with torch.no_grad():
        want = {"encode": ref.encode(torch.from_numpy(x)).latent_dist.parameters.numpy(),
                "decode": ref.decode(torch.from_numpy(z)).sample.numpy()}
    return ref, folder, want


def _load_converted_model(path: Path):
    from ms_diffusion.interop.checkpoints import build_from_config, read_ms_checkpoint
    from ms_diffusion.io.state import load_arrays_into

    config, groups, meta = read_ms_checkpoint(path)
    _, model = build_from_config(config, (meta.get("first_stage") or {}).get("model"))
    load_arrays_into(model, groups["online"])
    return model, config, groups, meta


def diffusers_vae(tmp: Path) -> Case:
    """diffusers AutoencoderKL folder -> our AutoencoderKL (an autoencoder run checkpoint) via the CLI."""
    ref, folder, want = _reference_vae(tmp)
    out = tmp / "vae_from_diffusers.ckpt"
    log = convert_cli(["from-diffusers", str(folder), str(out)])
    vae, config, groups, _ = _load_converted_model(out)
    x, z = _vae_inputs()
    return Case("AutoencoderKL (diffusers folder)", want, _vae_outputs(vae, x, z),
                {"ref": ref, "folder": folder, "ours": vae, "out": out, "log": log, "config": config})


def _ldm_yaml(tmp: Path, params: Dict[str, Any]) -> Path:
    import yaml

    path = tmp / "ldm.yaml"
    path.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                              "params": params}}))
    return path


def ldm_vae(tmp: Path) -> Case:
    """An SD-style ldm checkpoint (state_dict with first_stage_model.* among other components) -> --component vae.

    The ldm names are ours exported (``ms_to_ldm``); ``extra["diffusers_from_ldm"]`` is what diffusers'
    own ldm converter makes of them, an independent check of those names."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ms_diffusion.interop.ldm import ms_to_ldm

    ref, folder, want = _reference_vae(tmp)
    first = tmp / "vae_from_diffusers.ckpt"
    if not first.exists():
        convert_cli(["from-diffusers", str(folder), str(first)])
    ldm_state = ms_to_ldm(first)                                   # first_stage_model.* (ldm names)
    from_ldm = convert_ldm_vae_checkpoint(dict(ldm_state), dict(ref.config))
    rng = np.random.default_rng(7)
    other = {"cond_stage_model.transformer.weight": rng.standard_normal((3, 3)).astype(np.float32),
             "model.diffusion_model.out.2.bias": rng.standard_normal(4).astype(np.float32)}
    ckpt = tmp / "sd_like.ckpt"
    write_weights(ckpt, {"state_dict": {**ldm_state, **other}, "global_step": 11})
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 16,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                "norm_num_groups": 8}
    yaml_path = _ldm_yaml(tmp, {"first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                                       "params": {"embed_dim": 4, "ddconfig": ddconfig}},
                                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                                "params": {}},
                                "cond_stage_config": "__is_unconditional__"})
    out = tmp / "vae_from_ldm.ckpt"
    log = convert_cli(["from-ldm", str(ckpt), str(out), "--ldm-config", str(yaml_path), "--component", "vae"])
    vae, _, groups, _ = _load_converted_model(out)
    x, z = _vae_inputs()
    return Case("AutoencoderKL (ldm state dict)", want, _vae_outputs(vae, x, z),
                {"ref": ref, "ldm_state": ldm_state, "diffusers_from_ldm": from_ldm, "log": log, "ours": vae,
                 "ckpt": ckpt, "yaml": yaml_path})


# ----------------------------------------------------------------------------- ldm UNetModel

TINY_COND_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                      attention_head_dim=2, norm_num_groups=8, num_class_embeds=5)

TINY_UNET2D = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=8, norm_num_groups=8, num_class_embeds=5)


def _unet_inputs(channels: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, channels, 8, 8)).astype(np.float32), np.array([7, 912], np.int32),
            rng.standard_normal((2, 3, 12)).astype(np.float32), np.array([4, 1], np.int32))


def _diffusers_unet_network(tmp: Path, cls_name: str, config: Dict[str, Any], seed: int, stem: str):
    """A diffusers ``cls_name`` with random weights, saved as a folder and converted with the CLI into a network
    file: (reference, folder, network file, (our UNetModel, its arrays, metadata), CLI log)."""
    import diffusers

    from ms_diffusion.interop.checkpoints import load_network

    torch = _torch()
    torch.manual_seed(seed)
    ref = getattr(diffusers, cls_name)(**config).eval()
    _perturb_norms(ref, seed=seed)
    folder = tmp / f"diffusers_{stem}"
    ref.save_pretrained(folder)
    out = tmp / f"{stem}_from_diffusers.safetensors"
    log = convert_cli(["from-diffusers", str(folder), str(out)])
    return ref, folder, out, load_network(out), log


def ldm_unet_crossattn(tmp: Path) -> Case:
    """ldm UNetModel with cross-attention context and class labels, against diffusers' UNet2DConditionModel.

    The diffusers folder converts to a network file (CLI); our ldm export of it is fed to diffusers' own
    ldm converter (``extra["diffusers_from_ldm"]``) and, inside an SD-style checkpoint with a LitEma copy,
    back through ``from-ldm --component unet`` -- the model measured here."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ms_diffusion.interop.checkpoints import load_network
    from ms_diffusion.interop.ldm import ms_to_ldm

    torch = _torch()
    ref, _, first, (via_diffusers, _, meta), log = _diffusers_unet_network(tmp, "UNet2DConditionModel",
                                                                           TINY_COND_UNET, 2, "unet")
    ldm_state = ms_to_ldm(first)                                   # model.diffusion_model.* (ldm names)
    from_ldm = convert_ldm_unet_checkpoint(dict(ldm_state), dict(ref.config))
    shadow = {f"model_ema.{k[len('model.'):].replace('.', '')}": v + np.float32(0.5)
              for k, v in ldm_state.items()}
    shadow.update({"model_ema.decay": np.array(0.9999, np.float32), "model_ema.num_updates": np.array(3, np.int32)})
    ckpt = tmp / "ldm_unet.ckpt"
    write_weights(ckpt, {"state_dict": {**ldm_state, **shadow}, "global_step": 3})
    yaml_path = _ldm_yaml(tmp, {"unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                                "params": {k: v for k, v in meta["network"].items() if k != "type"}},
                                "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface"},
                                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}})
    out = tmp / "unet_from_ldm.safetensors"
    log += convert_cli(["from-ldm", str(ckpt), str(out), "--ldm-config", str(yaml_path), "--component", "unet",
                        "--no-ema"])
    ours, arrays, _ = load_network(out)
    x, t, ctx, y = _unet_inputs(4)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t).long(), encoder_hidden_states=torch.from_numpy(ctx),
                   class_labels=torch.from_numpy(y).long()).sample.numpy()

    def fwd(x, t, ctx, y):
        return {"out": ours(x, t, ctx, y)}

    got = both_modes(fwd, ms.Tensor(x), ms.Tensor(t), ms.Tensor(ctx), ms.Tensor(y))
    return Case("ldm UNetModel, cross-attention + class labels (ldm state dict)", {"out": want}, got,
                {"ref": ref, "ours": ours, "via_diffusers": via_diffusers, "ldm_state": ldm_state,
                 "diffusers_from_ldm": from_ldm, "ckpt": ckpt, "yaml": yaml_path, "log": log, "first": first})


def diffusers_unet2d(tmp: Path) -> Case:
    """diffusers UNet2DModel (self-attention blocks, class labels) -> our UNetModel with fused-qkv AttentionBlocks."""
    torch = _torch()
    ref, folder, out, (ours, arrays, _), log = _diffusers_unet_network(tmp, "UNet2DModel", TINY_UNET2D, 4, "unet2d")
    x, t, _, y = _unet_inputs(3)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t).long(), class_labels=torch.from_numpy(y).long()).sample.numpy()

    def fwd(x, t, y):
        return {"out": ours(x, t, None, y)}

    got = both_modes(fwd, ms.Tensor(x), ms.Tensor(t), ms.Tensor(y))
    return Case("ldm UNetModel, self-attention + class labels (diffusers UNet2DModel folder)", {"out": want}, got,
                {"ref": ref, "ours": ours, "arrays": arrays, "folder": folder, "out": out, "log": log})


# ----------------------------------------------------------------------------- table

def all_cases(tmp: Path) -> List[Case]:
    cases = [lucidrains_unet(kw, f"lucidrains Unet ({name})") for name, kw in LUCIDRAINS_UNET_CONFIGS.items()]
    cases.append(lucidrains_trainer_ddim(tmp))
    cases.append(diffusers_vae(tmp))
    cases.append(ldm_vae(tmp))
    cases.append(ldm_unet_crossattn(tmp))
    cases.append(diffusers_unet2d(tmp))
    return cases


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| model | mode | max abs | mean abs | max rel | mean rel |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['max_rel']:.2e} "
                     f"| {r['mean_rel']:.2e} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    ms.set_device("CPU")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for case in all_cases(Path(tmp)) for row in case.rows()]
    print(format_table(rows))
    print(f"\nMindSpore {ms.__version__}, CPU, float32; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
