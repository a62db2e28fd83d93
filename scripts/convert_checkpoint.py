#!/usr/bin/env python
"""Convert PyTorch diffusion checkpoints to ms_diffusion and back.

From PyTorch (the output .ckpt / .safetensors is an ms_diffusion checkpoint: ``python sample.py --ckpt OUT``):

  # denoising-diffusion-pytorch: a Trainer model-N.pt (model + EMA), or a GaussianDiffusion / Unet state dict.
  # The Unet config and the schedule are read from the weights and buffers; give what they cannot tell:
  python scripts/convert_checkpoint.py from-lucidrains results/model-10.pt fmnist.ckpt --set diffusion.image_size=28
  python scripts/convert_checkpoint.py from-lucidrains model-10.pt out.ckpt --config configs/cifar10.yaml

  # ldm / Stable Diffusion, with the model's ldm YAML (whole KL-LatentDiffusion, or one component):
  python scripts/convert_checkpoint.py from-ldm churches.ckpt churches_ms.ckpt --ldm-config lsun_churches-ldm-kl-8.yaml
  python scripts/convert_checkpoint.py from-ldm sd-v1-5.safetensors sd_vae.ckpt --ldm-config v1-inference.yaml --component vae
  python scripts/convert_checkpoint.py from-ldm sd-v1-5.safetensors sd_unet.safetensors --ldm-config v1-inference.yaml --component unet

  # diffusers model folders (AutoencoderKL, UNet2DConditionModel, UNet2DModel):
  python scripts/convert_checkpoint.py from-diffusers stable-diffusion-v1-5 vae.ckpt --subfolder vae
  # a pipeline's CLIP text encoder (a transformers folder), for diffusion.text.encoder of a text config:
  python scripts/convert_checkpoint.py from-diffusers stable-diffusion-v1-5 clip_text.safetensors --subfolder text_encoder

Stable Diffusion 1.x / 2.x whole (UNet + VAE + text encoder + tokenizer + scheduler), between an original
single-file checkpoint (+ its ldm YAML beside it) and a diffusers pipeline folder (``sample.py --ckpt`` reads
both directly):

  python scripts/convert_checkpoint.py sd-to-diffusers v2-1_768.safetensors sd21/ --prediction-type v_prediction
  python scripts/convert_checkpoint.py sd-to-diffusers sd-v1-5.ckpt sd15/ --ldm-config v1-inference.yaml
  python scripts/convert_checkpoint.py diffusers-to-sd sd15/ sd15.safetensors          # + sd15.yaml

To PyTorch:

  python scripts/convert_checkpoint.py to-lucidrains runs/fmnist model-1.pt             # Trainer-style (model + ema)
  python scripts/convert_checkpoint.py to-lucidrains runs/fmnist unet.safetensors --weights ema --unet-only
  python scripts/convert_checkpoint.py to-ldm runs/ldm ldm_state.pt --weights both     # LatentDiffusion + model_ema
  python scripts/convert_checkpoint.py to-diffusers runs/vae diffusers_vae/             # config.json + safetensors

Reading is safe: .safetensors, or torch.load(weights_only=True); nothing else is unpickled. A
conversion that would drop or invent weights stops with the list of missing / unexpected /
mismatched names; what is left out on purpose (optimizer state, other components) is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

try:
    import ms_diffusion  # noqa: F401  (applies the CPU workaround before MindSpore makes kernels)
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ms_diffusion  # noqa: F401

from ms_diffusion.cli.common import UsageError, make_parser, run_command

DIRECTIONS = ("from-lucidrains", "from-ldm", "from-diffusers", "to-lucidrains", "to-ldm", "to-diffusers",
              "sd-to-diffusers", "diffusers-to-sd")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("convert_checkpoint.py", "Convert PyTorch diffusion checkpoints to ms_diffusion and back.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 2)[2]
    p.add_argument("direction", choices=DIRECTIONS, help="what to convert from / to")
    p.add_argument("src", help="source file (or folder: diffusers model folder, ms_diffusion run folder)")
    p.add_argument("out", help="output file (.ckpt / .safetensors / .pt) or folder (to-diffusers)")
    p.add_argument("--config", default=None,
                   help="from-*: an ms_diffusion YAML whose model / diffusion / sample sections describe the model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="from-*: config value, e.g. --set diffusion.image_size=32 --set model.channels=3")
    p.add_argument("--ldm-config", default=None, help="from-ldm / sd-to-diffusers: the model's ldm YAML (ldm "
                                                      "checkpoints carry none)")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="sd-to-diffusers without a YAML, SD 2.x: noise (512 px models) or v (768 px)")
    p.add_argument("--component", default="all", choices=("all", "unet", "vae"),
                   help="from-ldm: the whole LatentDiffusion (default) or one network of it")
    p.add_argument("--no-ema", action="store_true", help="from-ldm --component unet: take the raw, not the EMA, "
                                                          "unet weights")
    p.add_argument("--subfolder", default=None, help="from-diffusers: the model inside a pipeline folder (unet, vae, "
                   "text_encoder)")
    p.add_argument("--weights", default=None, choices=("both", "ema", "online"),
                   help="which weights to write: to-*: both (default for to-lucidrains .pt / to-ldm), ema or "
                        "online; from-*: the set a .safetensors output holds (default ema)")
    p.add_argument("--unet-only", action="store_true", help="to-lucidrains: the Unet state dict alone")
    p.add_argument("--prefix", default=None,
                   help="to-ldm: key prefix of a component (default: its place in an ldm LatentDiffusion; '' bare)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def _experiment(args: argparse.Namespace) -> Dict[str, Any]:
    import yaml

    from ms_diffusion.config import apply_overrides

    raw: Dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {args.config!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise UsageError(f"--config {args.config}: not a mapping of sections")
    return apply_overrides(raw, args.overrides)


def _summary(converted, out: Path) -> List[str]:
    meta = converted.meta
    lines = [f"wrote {out} ({len(converted.online)} tensors from {meta.get('source')} {meta.get('path')}"
             + (f", step {meta['step']}" if meta.get("step") is not None else "")
             + (", with EMA weights" if converted.ema is not None else "") + ")"]
    for key, why in (meta.get("config_notes") or {}).items():
        value = _lookup(converted.config, key)
        lines.append(f"  {key}{'' if value is None else f' = {value}'}: {why}")
    for key, why in (meta.get("not_converted") or {}).items():
        lines.append(f"  not converted: {key} -- {why}")
    if converted.config is not None and converted.config.get("diffusion"):
        lines.append(f"  sample with: python sample.py --ckpt {out}")
    elif converted.config is not None:
        lines.append(f"  an autoencoder run: use it as diffusion.first_stage: {out} of a latent diffusion config")
    else:
        lines.append("  a network file: ms_diffusion.interop.load_network(path) rebuilds it")
    return lines


def _lookup(config: Optional[Dict[str, Any]], dotted: str):
    node: Any = config or {}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _run_stable_diffusion(args: argparse.Namespace, out: Path) -> int:
    from ms_diffusion.stable_diffusion import StableDiffusion

    if args.config or args.overrides or args.component != "all" or args.subfolder or args.weights or args.prefix \
            or args.unet_only:
        raise UsageError(f"{args.direction} takes --ldm-config, --prediction-type and --no-ema only")
    if args.direction == "sd-to-diffusers":
        sd = StableDiffusion.from_single_file(args.src, config=args.ldm_config, prediction_type=args.prediction_type,
                                              use_ema=not args.no_ema)
        folder = sd.save_diffusers(out)
        kind = "StableDiffusionInpaintPipeline" if sd.is_inpainting else "StableDiffusionPipeline"
        print(f"wrote {folder}: a diffusers {kind} ({sd.source.get('weights')} unet weights; config "
              f"{sd.source.get('config')})")
        return 0
    if args.ldm_config or args.prediction_type or args.no_ema:
        raise UsageError("diffusers-to-sd reads everything from the pipeline folder: no --ldm-config / "
                         "--prediction-type / --no-ema")
    sd = StableDiffusion.from_diffusers(args.src)
    path = sd.save_single_file(out)
    print(f"wrote {path} and {path.with_suffix('.yaml')} (an original-format Stable Diffusion checkpoint)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ms_diffusion.interop.checkpoints import save_converted
    from ms_diffusion.interop.torch_io import write_weights

    out = Path(args.out)
    if args.direction.startswith("sd-") or args.direction.endswith("-to-sd"):
        return _run_stable_diffusion(args, out)
    if args.prediction_type:
        raise UsageError("--prediction-type applies to sd-to-diffusers")
    if args.direction.startswith("from-"):
        if args.unet_only or args.prefix is not None:
            raise UsageError("--unet-only / --prefix apply to to-lucidrains / to-ldm")
        if args.weights == "both":
            raise UsageError("--weights both applies to to-* directions (a .ckpt output always holds both sets)")
        experiment = _experiment(args)
        if args.direction == "from-lucidrains":
            from ms_diffusion.interop.lucidrains import lucidrains_to_ms

            model = experiment.pop("model", None)
            diffusion = experiment.pop("diffusion", None)
            converted = lucidrains_to_ms(args.src, model, diffusion, experiment)
        elif args.direction == "from-ldm":
            from ms_diffusion.interop.ldm import ldm_to_ms

            if not args.ldm_config:
                raise UsageError("from-ldm needs --ldm-config: the model's ldm YAML (ldm checkpoints carry no config)")
            converted = ldm_to_ms(args.src, args.ldm_config, args.component, not args.no_ema, experiment)
        else:
            from ms_diffusion.interop.diffusers import diffusers_to_ms

            converted = diffusers_to_ms(args.src, args.subfolder, experiment)
        path = save_converted(converted, out, args.weights or "ema")
        print("\n".join(_summary(converted, path)))
        return 0
    if args.config or args.overrides or args.ldm_config:
        raise UsageError("--config / --set / --ldm-config apply to from-* directions")
    if args.direction == "to-lucidrains":
        from ms_diffusion.interop.lucidrains import ms_to_lucidrains

        weights = args.weights or ("ema" if args.unet_only or out.suffix == ".safetensors" else "both")
        if weights == "both" and out.suffix == ".safetensors":
            raise UsageError("a Trainer-style file (--weights both) nests model and ema: write .pt, or choose "
                             "--weights ema / online for .safetensors")
        content = ms_to_lucidrains(args.src, weights, args.unet_only)
        write_weights(out, content)
        what = "Trainer-style dict (step, model, ema)" if weights == "both" else \
            f"{'Unet' if args.unet_only else 'GaussianDiffusion'} state dict ({weights} weights)"
        print(f"wrote {out}: a denoising-diffusion-pytorch {what}")
    elif args.direction == "to-ldm":
        from ms_diffusion.interop.ldm import ms_to_ldm

        state = ms_to_ldm(args.src, args.weights or "both", args.prefix)
        if out.suffix in (".ckpt",):
            write_weights(out, {"state_dict": state})
        else:
            write_weights(out, state)
        print(f"wrote {out}: an ldm state dict of {len(state)} tensors"
              + (" (inside 'state_dict', as ldm's Lightning checkpoints)" if out.suffix == ".ckpt" else ""))
    else:
        from ms_diffusion.interop.diffusers import ms_to_diffusers

        folder = ms_to_diffusers(args.src, out, args.weights or "ema")
        config = json.loads((folder / "config.json").read_text())
        print(f"wrote {folder}: diffusers {config['_class_name']} (config.json + diffusion_pytorch_model.safetensors)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
