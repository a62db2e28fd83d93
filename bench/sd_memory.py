"""Peak memory (RSS) and time of one Stable Diffusion 1.5-shaped text-to-image generation on CPU, ours and
diffusers', with and without the memory options (attention in slices, VAE tiling).

    python bench/sd_memory.py                       # 512 x 512, 2 DDIM steps, guidance 7.5 (UNet batch 2)
    python bench/sd_memory.py --size 768 --steps 1 --cases ours,ours-sliced-tiled

No model hub here: the pipeline is SD 1.5's architecture (UNet 860 M, VAE 84 M, CLIP ViT-L/14 text 123 M
weights, fp32) with random weights, built once by diffusers and saved as a pipeline folder (4.3 GB, under
--workdir); memory does not depend on the weights' values. Each case is its own process (ours: loads the
folder with ``StableDiffusion.from_diffusers``; diffusers: ``StableDiffusionPipeline.from_pretrained``),
and its peak resident set is the kernel's high-water mark of that process (``VmHWM``, as
bench/eval_memory.py). Cases: ``ours`` / ``diffusers`` (plain), ``-sliced`` (ours: 1024 queries per
softmax, what ``sample.py`` does on CPU by default; diffusers: ``enable_attention_slicing()``), ``-sliced-tiled``
(+ VAE tiles of ``--tile`` px), ``ours-sliced-pynative`` (sliced, without compiled graphs: ``--mode pynative``).
``--workdir DIR --keep`` keeps the pipeline folder for the next run (built only when missing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from eval_memory import measure  # noqa: E402

CASES = ("ours", "ours-sliced", "ours-sliced-tiled", "ours-sliced-pynative", "diffusers", "diffusers-sliced",
         "diffusers-sliced-tiled")
PROMPT = "a photograph of an astronaut riding a horse"


def build_pipeline(folder: Path) -> None:
    """SD 1.5's architecture, random weights, saved as a diffusers pipeline folder."""
    import diffusers
    import torch
    import transformers

    from ms_diffusion.text import CLIPTokenizer
    from ms_diffusion.text.tokenizer import EOS

    torch.manual_seed(0)
    CLIPTokenizer.from_bpe_file(pad_token=EOS, clean="transformers").save(folder / "tok")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tok"))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                  latent_channels=4, layers_per_block=2, sample_size=512)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "sd15-random"))


def run_case(case: str, folder: Path, size: int, steps: int, tile: int) -> None:
    """One generation (the child process of a case); prints its seconds."""
    sliced, tiled = "sliced" in case, case.endswith("tiled")
    if case.startswith("ours"):
        import mindspore as ms

        from ms_diffusion import runtime
        from ms_diffusion.stable_diffusion import StableDiffusion

        runtime.setup("auto", "pynative" if case.endswith("pynative") else "graph")
        start = time.perf_counter()
        sd = StableDiffusion.from_diffusers(folder)
        if sliced:
            sd.enable_attention_slicing(1024)
        if tiled:
            sd.enable_vae_tiling(tile)
        loaded = time.perf_counter()
        images = sd(PROMPT, height=size, width=size, steps=steps, guidance_scale=7.5, seed=0)
        assert isinstance(images, ms.Tensor) and images.shape == (1, 3, size, size)
    else:
        import diffusers
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        start = time.perf_counter()
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        if sliced:
            pipe.enable_attention_slicing()
        if tiled:
            pipe.vae.enable_tiling()
            pipe.vae.tile_sample_min_size = tile
            pipe.vae.tile_latent_min_size = tile // 8
        loaded = time.perf_counter()
        with torch.no_grad():
            images = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                          generator=torch.Generator().manual_seed(0), output_type="np").images
        assert images.shape == (1, size, size, 3)
    print(f"case-seconds {loaded - start:.1f} {time.perf_counter() - loaded:.1f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="image height and width (default 512)")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps (default 2: memory is that of one step)")
    p.add_argument("--tile", type=int, default=256, help="VAE tile size of the -tiled cases (default 256)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--workdir", default=None, help="where the random pipeline folder is written (default: a "
                                                   "temporary folder, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the pipeline folder under --workdir (and reuse it)")
    p.add_argument("--json", default=None, help="also write the table's numbers here")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)      # internal: run one case in this process
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        run_case(args.case, Path(args.folder), args.size, args.steps, args.tile)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    if args.keep and not args.workdir:
        p.error("--keep needs --workdir (where the pipeline folder is kept)")
    kept = Path(args.workdir) / "sd_memory_pipeline" if args.keep else None
    with contextlib.nullcontext(kept) if kept else tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if not (Path(tmp) / "sd15-random" / "model_index.json").is_file():
            Path(tmp).mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            build_pipeline(Path(tmp))
            print(f"built the random SD 1.5-shaped pipeline in {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for case in cases:
            code, peak, seconds, out = measure([Path(__file__), "--case", case, "--folder", Path(tmp) / "sd15-random",
                                                "--size", args.size, "--steps", args.steps, "--tile", args.tile],
                                               dict(os.environ))
            if code != 0:
                print(out[-3000:])
                print(f"{case}: failed (exit {code})")
                return 1
            load_s, gen_s = (float(v) for v in
                             next(line for line in out.splitlines() if line.startswith("case-seconds")).split()[1:])
            rows.append({"case": case, "peak_rss_gb": peak / 2 ** 30, "load_s": load_s, "generate_s": gen_s})
            print(f"{case:24s} peak RSS {peak / 2 ** 30:5.2f} GB   load {load_s:5.1f} s   generate {gen_s:6.1f} s",
                  flush=True)
    print(f"\n{args.size} x {args.size}, {args.steps} DDIM steps, guidance 7.5, fp32, {os.cpu_count()} CPU cores")
    print("| case | peak RSS (GB) | load (s) | generate (s) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['peak_rss_gb']:.2f} | {r['load_s']:.1f} | {r['generate_s']:.1f} |")
    by = {r["case"]: r for r in rows}
    for ours, theirs in (("ours", "diffusers"), ("ours-sliced", "diffusers-sliced"),
                         ("ours-sliced-tiled", "diffusers-sliced-tiled"), ("ours-sliced-pynative", "diffusers-sliced")):
        if ours in by and theirs in by:
            print(f"{ours} / {theirs}: peak RSS x{by[ours]['peak_rss_gb'] / by[theirs]['peak_rss_gb']:.2f}, "
                  f"time x{by[ours]['generate_s'] / by[theirs]['generate_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "steps": args.steps, "tile": args.tile,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
