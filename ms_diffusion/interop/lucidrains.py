"""denoising-diffusion-pytorch (lucidrains) <-> ms_diffusion ``Unet`` / ``GaussianDiffusion``.

Sources understood by ``lucidrains_to_ms``:

* a Trainer checkpoint ``model-N.pt``: ``{"step", "model", "opt", "ema", "scaler", "version"}``
  where ``model`` is the GaussianDiffusion state dict and ``ema`` ema-pytorch's ``EMA`` state dict
  (``ema_model.*`` the averaged GaussianDiffusion, ``online_model.*`` the same module as
  ``model``, ``initted``, ``step``); the optimizer (``opt``) and AMP scaler states are training
  state and are not converted (the result says so);
* a bare GaussianDiffusion state dict (``model.*`` + schedule buffers), or a bare Unet state dict;
* the same as ``.safetensors``.

GaussianDiffusion's registered buffers (``betas`` ... ``loss_weight``) are compared with the
schedule our config builds and never copied: a mismatch names the first differing buffer and
both values (and, when another schedule / objective fits the buffers, which one).

The Unet config may be given; what is not given is inferred from the weight shapes where the
shapes decide it (``infer_unet_config``), and an ambiguity is an error naming the choices.
``dropout`` and ``sinusoidal_pos_emb_theta`` leave no trace in the weights (defaults are used
unless given), nor does ``random_fourier_features`` vs ``learned_sinusoidal_cond`` (identical at
inference; the learned form is assumed unless given).

The way back, ``ms_to_lucidrains``, writes the GaussianDiffusion state dict (with our schedule's
buffers), a bare Unet state dict, or a Trainer-style dict whose ``ema`` entry loads into
``ema_pytorch.EMA``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ms_diffusion.interop.checkpoints import Converted, build_from_config, read_ms_checkpoint
from ms_diffusion.interop.names import LUCIDRAINS_SCHEDULE_BUFFERS, LUCIDRAINS_UNET
from ms_diffusion.interop.plan import Plan, build_plan
from ms_diffusion.io.state import ConversionError, load_arrays_into
from ms_diffusion.interop.torch_io import PathLike, flat_arrays, read_weights

__all__ = ["infer_unet_config", "infer_schedule", "unet_plan", "diffusion_plan", "read_lucidrains",
           "lucidrains_to_ms", "ms_to_lucidrains", "LUCIDRAINS_DIFFUSION_DEFAULTS"]

# lucidrains GaussianDiffusion's defaults where they could differ from ours
LUCIDRAINS_DIFFUSION_DEFAULTS: Dict[str, Any] = {"timesteps": 1000, "objective": "pred_v", "beta_schedule": "sigmoid",
                                                 "ddim_sampling_eta": 0.0, "auto_normalize": True}
_TRAINER_KEYS = {"step", "model", "opt", "ema", "scaler", "version"}
_EMA_COUNTERS = ("initted", "step")
# ema-pytorch's EMA holds the averaged copy and the online module under these prefixes
_EMA_AVERAGED, _EMA_ONLINE = "ema_model.", "online_model."


# ----------------------------------------------------------------------------- Unet config from shapes

def _shape(state: Mapping[str, np.ndarray], key: str) -> Tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"not a denoising-diffusion-pytorch Unet state dict: {key!r} is missing")
    return tuple(np.shape(state[key]))


def _channel_options(in_ch: int, out_ch: int, given: Mapping[str, Any], allow_sc_with_lv: bool) -> List[Dict]:
    options = []
    for sc in (False, True):
        if in_ch % (2 if sc else 1):
            continue
        c = in_ch // (2 if sc else 1)
        for lv in (False, True):
            if out_ch == c * (2 if lv else 1) and (allow_sc_with_lv or not (sc and lv)):
                options.append({"channels": c, "self_condition": sc, "learned_variance": lv})
    options = [o for o in options if all(given.get(k, o[k]) == o[k] for k in o)]
    if not options and "channels" in given and given.get("out_dim", out_ch) == out_ch:
        c = int(given["channels"])
        if in_ch in (c, 2 * c):   # a custom out_dim
            options.append({"channels": c, "self_condition": in_ch == 2 * c, "learned_variance": False,
                            "out_dim": out_ch})
    return options


def infer_unet_config(state: Mapping[str, np.ndarray], given: Optional[Mapping[str, Any]] = None,
                      for_diffusion: bool = False) -> Tuple[Dict[str, Any], List[str]]:
    """Unet constructor arguments from a lucidrains Unet state dict (names without ``model.``).

    ``given`` values are kept as they are (and checked later against the shapes); the rest is read
    from the shapes. Returns (kwargs, the names that were inferred). ``for_diffusion``: rule out
    self-conditioning together with learned variance (GaussianDiffusion refuses that pair).
    """
    given = dict(given or {})
    cfg: Dict[str, Any] = {}
    init_dim, in_ch = _shape(state, "init_conv.weight")[:2]
    time_dim, fourier_dim = _shape(state, "time_mlp.1.weight")
    dim = time_dim // 4
    cfg["dim"] = dim
    if "time_mlp.0.weights" in state:
        cfg["learned_sinusoidal_cond"] = not given.get("random_fourier_features", False)
        cfg["learned_sinusoidal_dim"] = 2 * int(np.shape(state["time_mlp.0.weights"])[0])
    elif fourier_dim != dim:
        raise ConversionError(f"time_mlp.1.weight has {fourier_dim} inputs but dim={dim} (from its {time_dim} "
                              f"outputs = 4 * dim): not a denoising-diffusion-pytorch Unet")
    if init_dim != dim:
        cfg["init_dim"] = init_dim
    stages = 0
    while f"downs.{stages}.0.block1.proj.weight" in state:
        stages += 1
    if stages == 0:
        raise ConversionError("not a denoising-diffusion-pytorch Unet state dict: no downs.0.0.block1.proj.weight")
    mults, full, heads, dim_heads = [], [], [], []
    for i in range(stages):
        last = i == stages - 1
        d_out = _shape(state, f"downs.{i}.3.weight" if last else f"downs.{i}.3.1.weight")[0]
        if d_out % dim:
            raise ConversionError(f"stage {i} has width {d_out}, not a multiple of dim={dim}")
        mults.append(d_out // dim)
        is_full = f"downs.{i}.2.to_out.weight" in state
        full.append(is_full)
        mem = _shape(state, f"downs.{i}.2.mem_kv")     # full (2, heads, m, d); linear (2, heads, d, m)
        heads.append(mem[1])
        dim_heads.append(mem[3] if is_full else mem[2])
    cfg["dim_mults"] = tuple(mults)
    if tuple(full) != (False,) * (stages - 1) + (True,):
        cfg["full_attn"] = tuple(full)
    cfg["attn_heads"] = heads[0] if len(set(heads)) == 1 else tuple(heads)
    cfg["attn_dim_head"] = dim_heads[0] if len(set(dim_heads)) == 1 else tuple(dim_heads)
    out_ch = _shape(state, "final_conv.weight")[0]
    options = _channel_options(in_ch, out_ch, given, allow_sc_with_lv=not for_diffusion)
    if len(options) != 1:
        described = " or ".join(", ".join(f"{k}={v}" for k, v in o.items()) for o in options) or "none fits"
        raise ConversionError(f"cannot tell the image channels from the weights (init_conv takes {in_ch}, final_conv "
                              f"gives {out_ch}): {described}; pass model.channels (and model.self_condition / "
                              f"model.learned_variance)")
    cfg.update({k: v for k, v in options[0].items() if v or k == "channels"})
    inferred = sorted(k for k in cfg if k not in given)
    cfg.update(given)
    return cfg, inferred


# ----------------------------------------------------------------------------- schedule from buffers

def infer_schedule(buffers: Mapping[str, np.ndarray], given: Optional[Mapping[str, Any]] = None,
                   rtol: float = 1e-4) -> List[Dict[str, Any]]:
    """The lucidrains schedules (sigmoid / cosine / linear, default parameters) and objectives (with or
    without min-SNR weighting) whose float32 buffers equal ``buffers``, restricted to ``given`` values."""
    from ms_diffusion.schedules import NoiseSchedule

    given = dict(given or {})
    betas = np.asarray(buffers["betas"], np.float64)
    T = int(betas.shape[0])
    found = []
    for schedule in ("sigmoid", "cosine", "linear"):
        if given.get("beta_schedule", schedule) != schedule or "schedule_fn_kwargs" in given:
            continue
        try:
            s = NoiseSchedule.from_name(schedule, T)
        except ValueError:
            continue
        if not np.allclose(s.betas.astype(np.float32), betas, rtol=rtol, atol=1e-12):
            continue
        if "loss_weight" not in buffers:
            found.append({"timesteps": T, "beta_schedule": schedule})
            continue
        for objective in ("pred_noise", "pred_x0", "pred_v"):
            for min_snr in (False, True):
                gamma = float(given.get("min_snr_gamma", 5.0))
                if given.get("objective", objective) != objective or given.get("min_snr_loss_weight", min_snr) != min_snr:
                    continue
                with np.errstate(all="ignore"):
                    w = np.nan_to_num(s.loss_weight(objective, gamma if min_snr else None), nan=0.0, posinf=0.0)
                if np.allclose(w.astype(np.float32), np.asarray(buffers["loss_weight"], np.float64), rtol=rtol,
                               atol=1e-12):
                    option = {"timesteps": T, "beta_schedule": schedule, "objective": objective}
                    if min_snr:
                        option.update(min_snr_loss_weight=True, min_snr_gamma=gamma)
                    found.append(option)
    return found


# ----------------------------------------------------------------------------- plans

def unet_plan(unet, ms_prefix: str = "", torch_prefix: str = "") -> Plan:
    """The lucidrains name plan for our ``Unet`` (refuses the tutorial ConvNeXt and class-conditional forms,
    which denoising-diffusion-pytorch's Unet does not have)."""
    if getattr(unet, "block_type", "resnet") != "resnet":
        raise ConversionError("block_type='convnext' is the MindSpore tutorial's U-Net; denoising-diffusion-pytorch "
                              "has no counterpart")
    if getattr(unet, "num_classes", None) is not None:
        raise ConversionError("our class-conditional Unet adds a class embedding to the time embedding; "
                              "denoising-diffusion-pytorch's Unet has no class input (its classifier_free_guidance "
                              "Unet is a different network)")
    return build_plan(unet, LUCIDRAINS_UNET, ms_prefix=ms_prefix, torch_prefix=torch_prefix)


def diffusion_plan(diffusion, buffer_hint: str = "") -> Plan:
    """The plan for our GaussianDiffusion <-> lucidrains GaussianDiffusion state dict: ``model.*``, the schedule
    buffers (checked against ours, written on export) and our ``logvar`` (no lucidrains counterpart)."""
    plan = unet_plan(diffusion.model, "model.", "model.")
    plan.source = "denoising-diffusion-pytorch GaussianDiffusion"
    plan.checked = {name: getattr(diffusion, name).asnumpy() for name in LUCIDRAINS_SCHEDULE_BUFFERS}
    plan.fixed = {"logvar": (diffusion.logvar.asnumpy(), "the learned per-timestep log-variance")}
    plan.hint = buffer_hint
    return plan


# ----------------------------------------------------------------------------- reading a lucidrains file

def _split_ema(ema: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, np.ndarray]], int]:
    """ema-pytorch state dict -> (averaged model, online model copy or None, EMA step)."""
    averaged = {k[len(_EMA_AVERAGED):]: v for k, v in ema.items() if k.startswith(_EMA_AVERAGED)}
    online = {k[len(_EMA_ONLINE):]: v for k, v in ema.items() if k.startswith(_EMA_ONLINE)}
    other = sorted(k for k in ema if not k.startswith((_EMA_AVERAGED, _EMA_ONLINE)) and k not in _EMA_COUNTERS)
    if other or not averaged:
        raise ConversionError(f"the 'ema' entry is not an ema-pytorch EMA state dict (unexpected keys "
                              f"{other[:5]}, {len(averaged)} {_EMA_AVERAGED}* keys)")
    step = int(np.asarray(ema.get("step", 0)))
    return flat_arrays(averaged, "ema.ema_model"), (flat_arrays(online, "ema.online_model") if online else None), step


def read_lucidrains(path: PathLike) -> Dict[str, Any]:
    """Read a lucidrains weight file: {"kind": "trainer" | "diffusion" | "unet", "online": state, "ema": state or
    None, "step": int or None, "dropped": {entry: why}} (states keep lucidrains' names)."""
    content, _ = read_weights(path)
    dropped: Dict[str, str] = {}
    if "model" in content and isinstance(content["model"], Mapping):
        unknown = sorted(set(content) - _TRAINER_KEYS)
        if unknown:
            raise ConversionError(f"{path}: a Trainer checkpoint with unknown entries {unknown}")
        online = flat_arrays(content["model"], f"{path}['model']")
        ema, ema_online, ema_step = (None, None, None)
        if content.get("ema") is not None:
            ema, ema_online, ema_step = _split_ema(content["ema"])
            if ema_online is not None:
                differ = sorted(k for k in online if k not in ema_online or not np.array_equal(online[k], ema_online[k]))
                if differ or set(ema_online) != set(online):
                    raise ConversionError(f"{path}: the EMA's online_model copy differs from 'model' "
                                          f"(e.g. {differ[:3]}); which one is the trained network is unclear")
                dropped["ema.online_model.*"] = "the same weights as 'model'"
        for key, why in (("opt", "optimizer state (training only)"), ("scaler", "AMP loss-scaler state")):
            if content.get(key) is not None:
                dropped[key] = why
        step = content.get("step")
        return {"kind": "trainer", "online": online, "ema": ema, "step": None if step is None else int(step),
                "ema_step": ema_step, "dropped": dropped, "version": content.get("version")}
    if any(k.startswith(_EMA_AVERAGED) for k in content):
        ema, ema_online, ema_step = _split_ema(content)
        return {"kind": "diffusion" if "betas" in ema else "unet", "online": ema_online or ema, "ema": ema,
                "step": None, "ema_step": ema_step, "dropped": dropped}
    state = flat_arrays(content, str(path))
    kind = "diffusion" if any(k.startswith("model.") for k in state) else "unet"
    return {"kind": kind, "online": state, "ema": None, "step": None, "dropped": dropped}


# ----------------------------------------------------------------------------- lucidrains -> ours

def _schedule_hint(buffers: Mapping[str, np.ndarray], diffusion_cfg: Mapping[str, Any]) -> str:
    fits = infer_schedule(buffers)
    current = {k: diffusion_cfg.get(k, LUCIDRAINS_DIFFUSION_DEFAULTS.get(k)) for k in ("beta_schedule", "objective")}
    fits = [f for f in fits if any(f.get(k) != v for k, v in current.items())]
    if not fits:
        return ("no lucidrains schedule with default parameters fits these buffers; set diffusion.beta_schedule / "
                "schedule_fn_kwargs / objective to the ones the model was trained with")
    described = " or ".join(", ".join(f"diffusion.{k}={v}" for k, v in f.items()) for f in fits)
    return f"the buffers fit {described}"


def lucidrains_to_ms(path: PathLike, model: Optional[Mapping[str, Any]] = None,
                     diffusion: Optional[Mapping[str, Any]] = None, experiment: Optional[Mapping[str, Any]] = None
                     ) -> Converted:
    """Convert a lucidrains file (Trainer checkpoint, GaussianDiffusion or Unet state dict) to our
    GaussianDiffusion. ``model`` / ``diffusion``: config values (the rest is inferred from the weights and
    buffers, or lucidrains' defaults); ``diffusion["image_size"]`` is required (no weight records it);
    ``experiment``: other experiment-config sections (``sample``, ``name`` ...)."""
    src = read_lucidrains(path)
    model_cfg = {k: v for k, v in dict(model or {}).items() if k != "type"}
    diffusion_cfg = {k: v for k, v in dict(diffusion or {}).items() if k != "type"}
    if "image_size" not in diffusion_cfg:
        raise ConversionError("diffusion.image_size is required: lucidrains checkpoints do not record the image size "
                              "(pass e.g. --set diffusion.image_size=32)")
    state = src["online"]
    is_diffusion = src["kind"] != "unet"
    unet_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")} if is_diffusion else state
    model_cfg, inferred = infer_unet_config(unet_state, model_cfg, for_diffusion=True)
    notes = {f"model.{k}": "inferred from the weight shapes" for k in inferred}
    hint = ""
    if is_diffusion:
        buffers = {k: state[k] for k in LUCIDRAINS_SCHEDULE_BUFFERS if k in state}
        if "betas" not in buffers:
            raise ConversionError(f"{path}: a GaussianDiffusion state dict without its 'betas' buffer")
        fits = infer_schedule(buffers, diffusion_cfg)
        if len(fits) == 1:
            for k, v in fits[0].items():
                if k not in diffusion_cfg:
                    diffusion_cfg[k] = v
                    notes[f"diffusion.{k}"] = "inferred from the schedule buffers"
        diffusion_cfg.setdefault("timesteps", int(np.shape(buffers["betas"])[0]))
        hint = _schedule_hint(buffers, diffusion_cfg)
    else:
        notes["diffusion"] = "a bare Unet state dict carries no schedule: lucidrains defaults or the given values"
    for k, v in LUCIDRAINS_DIFFUSION_DEFAULTS.items():
        diffusion_cfg.setdefault(k, v)
    config = dict(experiment or {})
    config.setdefault("name", "converted")
    config["model"] = {"type": "unet", **model_cfg}
    config["diffusion"] = {"type": "gaussian", **diffusion_cfg}
    cfg, ours = build_from_config(config)
    config = cfg.to_dict()
    if is_diffusion:
        plan = diffusion_plan(ours, hint)
    else:
        plan = unet_plan(ours.model, "model.", "")
        plan.fixed = {"logvar": (ours.logvar.asnumpy(), "the per-timestep log-variance")}
    online = plan.to_ms(state)
    ema = plan.to_ms(src["ema"]) if src["ema"] is not None else None
    load_arrays_into(ours, online)   # every parameter of the model is set exactly once
    meta = {"source": "denoising-diffusion-pytorch", "kind": src["kind"], "path": str(path), "step": src["step"],
            "ema_step": src.get("ema_step"), "has_ema": ema is not None, "config_notes": notes,
            "not_converted": src["dropped"], "version": src.get("version")}
    return Converted(config=config, online=online, ema=ema, meta=meta)


# ----------------------------------------------------------------------------- ours -> lucidrains

def ms_to_lucidrains(path: PathLike, weights: str = "both", unet_only: bool = False) -> Dict[str, Any]:
    """Our checkpoint -> lucidrains: ``weights="both"`` a Trainer-style dict (``step``, ``model``, ``ema`` in
    ema-pytorch's layout, ``version``); ``"ema"`` / ``"online"`` one GaussianDiffusion state dict (with our
    schedule's buffers), or with ``unet_only`` the Unet state dict alone."""
    config, groups, meta = read_ms_checkpoint(path)
    if weights not in ("both", "ema", "online"):
        raise ValueError(f"weights must be both, ema or online, got {weights!r}")
    wanted = ("online", "ema") if weights == "both" else (weights,)
    absent = [g for g in wanted if g not in groups]
    if absent:
        raise ConversionError(f"{meta['path']} has no {' or '.join(absent)} weights (it holds "
                              f"{', '.join(sorted(groups))}); choose --weights {sorted(groups)[0]}")
    _, ours = build_from_config(config)
    if ours.__class__.__name__ != "GaussianDiffusion" or not hasattr(ours.model, "block_type"):
        raise ConversionError(f"{meta['path']} holds a {type(ours).__name__} around {type(ours.model).__name__}; "
                              f"denoising-diffusion-pytorch has GaussianDiffusion(Unet) only")
    plan = unet_plan(ours.model, "model.", "") if unet_only else diffusion_plan(ours)
    if unet_only:
        plan.fixed = {"logvar": (ours.logvar.asnumpy(), "the learned per-timestep log-variance")}
    states = {}
    for group in wanted:
        load_arrays_into(ours, groups[group])   # the file matches its own config
        states[group] = plan.to_torch(groups[group])
    if weights != "both":
        return states[weights]
    from ms_diffusion import __version__

    ema_step = ((meta.get("ema") or {}).get("step") or (meta.get("converted_from") or {}).get("ema_step")
                or meta.get("step") or 0)
    ema = {_EMA_ONLINE + k: v for k, v in states["online"].items()}
    ema.update({_EMA_AVERAGED + k: v for k, v in states["ema"].items()})
    ema["initted"] = np.array(True)
    ema["step"] = np.array(int(ema_step), np.int64)
    return {"step": int(meta.get("step") or 0), "model": states["online"], "ema": ema,
            "version": f"ms_diffusion {__version__}"}
