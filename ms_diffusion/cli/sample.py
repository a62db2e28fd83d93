"""``python sample.py --ckpt RUN_OR_CKPT [--sampler ddim --steps 50 --num 64 --out grid.png --gif denoise.gif]``.

With a Stable Diffusion model as ``--ckpt`` (a diffusers pipeline folder, or an original SD 1.x / 2.x
``.ckpt`` / ``.safetensors`` with ``--prompt``): text-to-image from ``--prompt`` (or ``--prompts-file``),
image-to-image with ``--init-image --strength``, inpainting with ``--init-image --mask``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from ms_diffusion.cli.common import (UsageError, add_prompt_args, add_runtime_args, generation_options, make_parser,
                                     parse_key_values, read_prompts, refuse_text_args, run_command)
from ms_diffusion.cli.outputs import check_distinct, check_output_file

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("sample.py", "Generate images from a trained ms_diffusion checkpoint.")
    p.add_argument("--ckpt", required=True,
                   help="a run folder (its newest checkpoint), a step_*.ckpt file, a model.safetensors export, or a "
                        "Stable Diffusion model: a pipeline folder (diffusers layout: model_index.json, unet/, vae/, "
                        "...) or, with --prompt, an original SD 1.x / 2.x .ckpt / .safetensors")
    p.add_argument("--weights", default="ema", choices=("ema", "online"), help="EMA weights (default) or raw ones")
    p.add_argument("--sampler", default=None,
                   help="ddpm, ddim, plms, dpmpp, dpmpp_sde, euler, euler_a, heun or unipc (default: the config's "
                        "sample.sampler, else the diffusion's)")
    p.add_argument("--steps", type=int, default=None, help="network evaluations (DDPM: all training steps)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise (0 deterministic, 1 DDPM-like)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler-specific option, e.g. --option order=2 --option karras=true --option spacing=trailing")
    p.add_argument("--num", type=int, default=None, help="number of images (default: config sample.num)")
    p.add_argument("--batch-size", type=int, default=None, help="images per network batch")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same images)")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class id for a class-conditional model (default: unconditional / all classes in turn)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance weight (1 = off)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale phi (Lin et al.), 0 = off")
    text = p.add_argument_group("text-to-image (a Stable Diffusion model, or one of our text-conditional runs)")
    add_prompt_args(text)
    text.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    text.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    text.add_argument("--init-image", default=None, help="image-to-image / inpainting: the starting image")
    text.add_argument("--strength", type=float, default=None,
                      help="image-to-image / inpainting: how much to change, in (0, 1] (default 0.8 for "
                           "image-to-image, 1 for inpainting: the masked region from pure noise)")
    text.add_argument("--mask", default=None, help="inpainting: white where the image is repainted")
    text.add_argument("--clip-skip", type=int, default=0, help="condition on a text-encoder layer this many before "
                                                                "the last")
    text.add_argument("--sd-config", default=None, help="an original checkpoint's ldm YAML (default: NAME.yaml "
                                                        "beside it, else read off the weights)")
    text.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                      help="an original SD 2.x checkpoint without YAML: noise (512 px models) or v (768 px)")
    text.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                      help="compute precision of the text encoder, UNet and VAE (auto: fp16 on Ascend and GPU, fp32 "
                           "on CPU; bf16 not on CPU)")
    p.add_argument("--attention-slicing", type=int, default=None, metavar="N",
                   help="compute attention for N queries at a time (less memory, same images; 0: off; default: "
                        "1024 for Stable Diffusion on CPU, where compiled graphs then need 1.2 GB less at 512x512, else off)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="Stable Diffusion: decode / encode images larger than the model's size tile by tile "
                        "(less memory, slight seams)")
    p.add_argument("--out", default="samples.png",
                   help="grid image to write: .png (default samples.png), .jpg, .webp, ... (checked before sampling)")
    p.add_argument("--gif", default=None, help="also write an animated GIF of the denoising of the first batch")
    p.add_argument("--npz", default=None, help="also write the raw images (N, C, H, W) in [0, 1] to this .npz")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_args(p)
    return p


def _is_pipeline_folder(path: str) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path is checked before a model is loaded, so a bad path never costs a whole run."""
    check_output_file(args.out, "--out", "image")
    if args.gif:
        check_output_file(args.gif, "--gif", "gif")
    if args.npz:
        check_output_file(args.npz, "--npz", "npz")
    check_distinct({"--out": args.out, "--gif": args.gif, "--npz": args.npz})


def _save_npz(path: str, **arrays) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(p, **arrays)
    print(f"raw images -> {p}")


def _attention_slicing(args: argparse.Namespace, cpu_default: int) -> int:
    """--attention-slicing, or its default on this device (after runtime.setup): ``cpu_default`` on CPU, else 0."""
    if args.attention_slicing is not None:
        if args.attention_slicing < 0:
            raise UsageError(f"--attention-slicing must be >= 0 (0: off), got {args.attention_slicing}")
        return args.attention_slicing
    import mindspore as ms

    return cpu_default if ms.get_context("device_target") == "CPU" else 0


def _run_text_to_image(args: argparse.Namespace) -> int:
    """--ckpt is a Stable Diffusion model (pipeline folder or original checkpoint): prompts -> a grid (and --npz)."""
    from ms_diffusion import runtime
    from ms_diffusion.imageio import load_image, save_grid
    from ms_diffusion.stable_diffusion import StableDiffusion

    prompts = read_prompts(args)
    if not prompts:
        raise UsageError("a Stable Diffusion pipeline needs --prompt (or --prompts-file)")
    if args.mask and not args.init_image:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    if args.gif:
        raise UsageError("--gif is for our own checkpoints; a Stable Diffusion run writes --out (and --npz)")
    _check_outputs(args)
    size = (args.height, args.width) if args.height and args.width else None
    image = load_image(args.init_image, "RGB", size) if args.init_image else None
    mask = load_image(args.mask, "L", image.shape[2:]) if args.mask else None
    runtime.setup(args.device or "auto", args.mode or "graph")
    if _is_pipeline_folder(args.ckpt):
        if args.sd_config or args.prediction_type:
            raise UsageError("--sd-config / --prediction-type are for original checkpoints; a pipeline folder's "
                             "scheduler/ says both")
        sd = StableDiffusion.from_diffusers(args.ckpt, clip_skip=args.clip_skip)
    else:
        if not Path(args.ckpt).is_file():
            raise UsageError(f"--ckpt {args.ckpt} does not exist")
        sd = StableDiffusion.from_single_file(args.ckpt, config=args.sd_config, prediction_type=args.prediction_type,
                                              use_ema=args.weights == "ema", clip_skip=args.clip_skip)
    try:
        sd.set_precision(args.precision)
    except ValueError as err:
        raise UsageError(f"--precision {args.precision}: {err}") from None
    slicing = _attention_slicing(args, cpu_default=1024)
    if slicing:
        sd.enable_attention_slicing(slicing)
    if args.vae_tiling:
        sd.enable_vae_tiling()
    per_prompt = args.num or 1
    common = dict(negative_prompt=None if args.negative_prompt is None else [args.negative_prompt] * len(prompts),
                  num_images_per_prompt=per_prompt, sampler=args.sampler, steps=args.steps,
                  eta=args.eta or 0.0, seed=0 if args.seed is None else args.seed, progress=not args.no_progress,
                  guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale,
                  **parse_key_values(args.options))
    start = time.perf_counter()
    if mask is not None:
        images = sd.inpaint(prompts, image, mask, strength=1.0 if args.strength is None else args.strength, **common)
    elif image is not None:
        images = sd.img2img(prompts, image, strength=0.8 if args.strength is None else args.strength, **common)
    else:
        images = sd(prompts, height=args.height, width=args.width, **common)
    images = images.asnumpy()
    elapsed = time.perf_counter() - start
    grid = save_grid(images, args.out, nrow=args.nrow or per_prompt)
    print(f"{len(images)} images from {args.ckpt} ({len(prompts)} prompts) in {elapsed:.1f} s -> {grid}")
    if args.npz:
        _save_npz(args.npz, images=images, prompts=np.asarray([p for p in prompts for _ in range(per_prompt)]))
    return 0


def _run(args: argparse.Namespace) -> int:
    from ms_diffusion.io.weights import is_own_file

    if args.strength is not None and not args.init_image:
        raise UsageError("--strength needs --init-image (image-to-image, or inpainting with --mask)")
    ckpt = Path(args.ckpt)
    own = (ckpt.is_dir() and not _is_pipeline_folder(args.ckpt)) or (ckpt.is_file() and is_own_file(ckpt))
    if not own and (_is_pipeline_folder(args.ckpt) or (ckpt.is_file() and (args.prompt or args.prompts_file))):
        return _run_text_to_image(args)
    if args.init_image or args.mask:
        raise UsageError("--init-image / --mask need a Stable Diffusion model as --ckpt (a diffusers pipeline folder "
                         "or an original .ckpt / .safetensors); this is one of our runs")
    if args.sd_config or args.prediction_type:
        raise UsageError("--sd-config / --prediction-type are for original Stable Diffusion checkpoints (with "
                         "--prompt)")
    if args.vae_tiling:
        raise UsageError("--vae-tiling is for Stable Diffusion models, whose --height / --width can exceed the size "
                         "they were trained at")
    if args.precision not in ("auto", "fp32"):
        raise UsageError("--precision fp16 / bf16 is for Stable Diffusion models; our own runs sample in float32 "
                         "(train.amp sets the precision they train in)")
    from ms_diffusion import runtime
    from ms_diffusion.imageio import save_gif, save_grid
    from ms_diffusion.pipeline import cycled_classes, describe_degenerate, generate, load_diffusion

    for name in ("num", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _check_outputs(args)
    runtime.setup(args.device or "auto", args.mode or "graph")
    cfg, diffusion, meta = load_diffusion(args.ckpt, args.weights,
                                          log=lambda line: print(f"sample.py: {line}", file=sys.stderr))
    slicing = _attention_slicing(args, cpu_default=0)
    if slicing:
        from ms_diffusion.nn.attention import set_attention_slicing

        set_attention_slicing(diffusion, slicing)
    s = cfg.sample
    num = args.num or s.num
    batch = args.batch_size or min(s.batch_size, num)
    seed = s.seed if args.seed is None else args.seed
    label = s.class_label if args.class_label is None else args.class_label
    num_classes = getattr(diffusion, "num_classes", None)
    classes = None
    prompts = read_prompts(args) or list(s.prompts or [])
    text = getattr(diffusion, "text_conditional", False)
    refuse_text_args(prompts, args.negative_prompt, text, " or a Stable Diffusion model")
    if text:
        if not prompts:
            raise UsageError("this model is text-conditional: give --prompt (repeat for several) or --prompts-file")
        if label is not None:
            raise UsageError("--class is for class-conditional models; this one takes --prompt")
        per_prompt = args.num or 1            # as for Stable Diffusion: --num images per prompt
        prompts = [p for p in prompts for _ in range(per_prompt)]
        num = len(prompts)
        batch = args.batch_size or min(s.batch_size, num)
    if not text and label is not None:
        if num_classes is None:
            raise UsageError("--class needs a class-conditional model (this checkpoint's model has no num_classes)")
        if not 0 <= label < num_classes:
            raise UsageError(f"--class must lie in [0, {num_classes - 1}], got {label}")
        classes = [label] * num
    else:
        classes = cycled_classes(num, num_classes)  # one of each class in turn
    sampling = generation_options(args, s, classes, text, prompts)
    options = parse_key_values(args.options)
    frames = max(s.gif_frames, 2) if args.gif else 0
    start = time.perf_counter()
    out = generate(diffusion, num, batch_size=batch, seed=seed, classes=classes, gif_frames=frames,
                   progress=not args.no_progress, **sampling, **options)
    elapsed = time.perf_counter() - start
    scale = max(1, 64 // out.images.shape[-1])
    grid = save_grid(out.images, args.out, nrow=args.nrow or (per_prompt if text else None), scale=scale)
    print(f"{num} images from {meta['path']} (step {meta.get('step')}, {args.weights} weights) in {elapsed:.1f} s "
          f"({elapsed / num * 1000:.0f} ms/image) -> {grid}")
    degenerate = describe_degenerate(out.images)
    if degenerate:
        print(f"sample.py: warning: {degenerate} ({meta['path']}, step {meta.get('step')})", file=sys.stderr)
    if args.gif:
        gif = save_gif(out.frames, args.gif, nrow=args.nrow, scale=scale)
        print(f"denoising animation ({len(out.frames)} frames) -> {gif}")
    if args.npz:
        _save_npz(args.npz, images=out.images, classes=np.asarray(classes if classes is not None else []),
                  prompts=np.asarray(prompts if text else []), seed=seed)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
