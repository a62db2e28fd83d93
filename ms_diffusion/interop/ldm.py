"""ldm (CompVis latent-diffusion) and Stable Diffusion checkpoints <-> ms_diffusion.

An ldm checkpoint (``.ckpt`` with a ``state_dict``, or a flat ``.safetensors``) holds, for a
``LatentDiffusion``:

* ``model.diffusion_model.*``: the UNetModel -> our ``UNetModel`` (same module paths);
* ``first_stage_model.*``: the AutoencoderKL -> our ``AutoencoderKL`` (same module paths);
* ``cond_stage_model.*``: the conditioning encoder; ``ClassEmbedder`` converts (ours sits at
  ``model.cond_stage_model``); text encoders (CLIP, BERT) have no implementation here;
* ``model_ema.*``: LitEma's shadow of the UNet, named without dots
  (``model_ema.diffusion_modelinput_blocks00weight``), plus ``decay`` / ``num_updates``;
* the schedule buffers of ``DDPM.register_schedule`` (checked against ours), ``scale_factor``
  (a buffer with ``scale_by_std``), ``logvar`` (a parameter with ``learn_logvar``).

Differences from our parameters (``names.LDM``): GroupNorm/LayerNorm ``weight``/``bias`` <->
``gamma``/``beta``, ``nn.Embedding`` ``weight`` <-> ``embedding_table``, AttentionBlock's Conv1d
``qkv`` / ``proj_out`` (O, I, 1) <-> our 1x1 Conv2d (O, I, 1, 1).

ldm checkpoints carry no config: pass the model's ldm YAML (``configs/latent-diffusion/*.yaml``,
``models/ldm/*/config.yaml``, ``v1-inference.yaml``); it is read with ``yaml.safe_load`` and its
``target:`` strings are only compared, never imported.

The ldm ClassEmbedder table and ours: ours has ``n_classes + 1`` rows, the last one the null class
of classifier-free guidance. An ldm table of K rows becomes ours with ``n_classes = K - 1``
(``cin256-v2`` trains exactly that way: class 1000 of its 1001 rows is "unconditional").
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import yaml

from ms_diffusion.interop.checkpoints import (Converted, autoencoder_experiment, build_from_config, is_network_file,
                                              load_network, read_ms_checkpoint)
from ms_diffusion.interop.names import LDM, LDM_SCHEDULE_BUFFERS
from ms_diffusion.interop.plan import Entry, Plan, build_plan, select_prefix
from ms_diffusion.io.state import ConversionError, load_arrays_into, problem_report
from ms_diffusion.interop.torch_io import PathLike, flat_arrays, read_weights
from ms_diffusion.interop.transforms import IDENTITY

__all__ = ["LdmConfig", "load_ldm_yaml", "parse_ldm_config", "read_ldm_checkpoint", "unet_plan", "autoencoder_plan",
           "latent_diffusion_plan", "lit_ema_key", "lit_ema_state", "ldm_to_ms", "ms_to_ldm", "COMPONENTS",
           "UNET_PREFIX", "FIRST_STAGE_PREFIX", "COND_STAGE_PREFIX"]

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
COMPONENTS = ("all", "unet", "vae")
_LIGHTNING_TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks", "loops", "hparams_name",
                             "hyper_parameters", "epoch", "global_step", "pytorch-lightning_version",
                             "NativeMixedPrecisionPlugin", "MixedPrecisionPlugin", "native_amp_scaling_state")
# ldm UNetModel options that change nothing here (memory / precision switches of the torch code)
_UNET_IGNORED = ("use_checkpoint", "use_fp16")
# ldm's LitEma counters
_EMA_COUNTERS = ("decay", "num_updates")
_PARAMETERIZATIONS = {"eps": "pred_noise", "x0": "pred_x0", "v": "pred_v"}
# ldm / stablediffusion text encoders: class -> (where its weights come from, the layer it conditions on)
_TEXT_STAGES = {"FrozenCLIPEmbedder": ("transformers", "last"), "FrozenOpenCLIPEmbedder": ("open_clip", "last")}
_SCHEDULES = {"linear": "ldm_linear", "cosine": "cosine", "sqrt_linear": "sqrt_linear", "sqrt": "sqrt"}


@dataclass
class LdmConfig:
    """What an ldm YAML says about the networks and the diffusion, in our constructors' terms.

    ``unet_problems`` keep the UNet from converting at all; ``problems`` keep the whole model from
    converting (its first stage or conditioning has no counterpart here) while components may.
    """

    unet: Optional[Dict[str, Any]] = None              # UNetModel kwargs
    autoencoder: Optional[Dict[str, Any]] = None       # {"ddconfig": ..., "embed_dim": ...}
    autoencoder_loss: Optional[Dict[str, Any]] = None  # LPIPSWithDiscriminator params of a first-stage config
    cond_stage: Optional[Dict[str, Any]] = None        # {"target": ..., "params": ...} or None (unconditional)
    text_stage: Optional[Dict[str, Any]] = None        # a CLIP text encoder: target, source, layer, max_length
    diffusion: Dict[str, Any] = field(default_factory=dict)   # our `latent` diffusion section, without type
    target: str = ""
    unet_problems: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)


def load_ldm_yaml(source: Union[PathLike, Mapping[str, Any]]) -> Mapping[str, Any]:
    """An ldm YAML (path, or an already-read mapping) with its `model:` section, or ConversionError."""
    if isinstance(source, Mapping):
        return source
    p = Path(source)
    if not p.is_file():
        raise ConversionError(f"ldm config {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConversionError(f"{p}: invalid YAML: {err}") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("model"), Mapping):
        raise ConversionError(f"{p}: not an ldm config (no `model:` section)")
    return raw


def _unet_kwargs(params: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    from ms_diffusion.models import UNetModel

    accepted = set(inspect.signature(UNetModel.__init__).parameters) - {"self"}
    kwargs, problems = {}, []
    for key, value in params.items():
        if key in _UNET_IGNORED:
            continue
        if key not in accepted:
            problems.append(f"UNetModel option {key}={value!r} is not implemented here")
        elif key == "num_classes" and value == "sequential":
            problems.append("num_classes='sequential' (SDXL/SD-2 upscaler vector conditioning, adm_in_channels) "
                            "is not implemented here")
        elif key == "context_dim" and isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                problems.append(f"per-level context_dim {value} is not implemented here")
            kwargs[key] = int(value[0])
        elif key == "transformer_depth" and isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                problems.append(f"per-level transformer_depth {value} (SDXL) is not implemented here")
            kwargs[key] = int(value[0])
        else:
            kwargs[key] = list(value) if isinstance(value, tuple) else value
    return kwargs, problems


def parse_ldm_config(source: Union[PathLike, Mapping[str, Any]]) -> LdmConfig:
    """Read an ldm YAML (a LatentDiffusion config or a first-stage AutoencoderKL config)."""
    raw = load_ldm_yaml(source)
    model = raw["model"]
    target = str(model.get("target", ""))
    params = dict(model.get("params") or {})
    out = LdmConfig(target=target)
    if target.endswith("AutoencoderKL"):
        out.autoencoder = {"ddconfig": dict(params["ddconfig"]), "embed_dim": int(params["embed_dim"])}
        loss = params.get("lossconfig") or {}
        if str(loss.get("target", "")).endswith("LPIPSWithDiscriminator"):
            out.autoencoder_loss = dict(loss.get("params") or {})
        return out
    if not target.endswith("LatentDiffusion"):
        raise ConversionError(f"ldm model target {target!r} is not supported: convert a LatentDiffusion or an "
                              f"AutoencoderKL (pixel-space ldm DDPM models have no ms_diffusion counterpart)")
    unet_cfg = params.get("unet_config") or {}
    out.unet, out.unet_problems = _unet_kwargs(dict(unet_cfg.get("params") or {}))
    first = params.get("first_stage_config") or {}
    first_target = str(first.get("target", "") if isinstance(first, Mapping) else first)
    if first_target.endswith("AutoencoderKL"):
        fp = dict(first.get("params") or {})
        out.autoencoder = {"ddconfig": dict(fp["ddconfig"]), "embed_dim": int(fp["embed_dim"])}
    else:
        out.problems.append(f"first stage {first_target!r} is not a KL autoencoder (VQ models are not implemented "
                            f"here)")
    cond = params.get("cond_stage_config")
    key = params.get("conditioning_key")
    if key is None:
        key = "concat" if params.get("concat_mode", True) else "crossattn"
    if cond == "__is_unconditional__":
        key, cond = None, None
    elif isinstance(cond, Mapping) and str(cond.get("target", "")).endswith("ClassEmbedder"):
        cond = {"target": str(cond["target"]), "params": dict(cond.get("params") or {})}
    elif isinstance(cond, Mapping) and str(cond.get("target", "")).rsplit(".", 1)[-1] in _TEXT_STAGES:
        cond_params = dict(cond.get("params") or {})
        source, default_layer = _TEXT_STAGES[str(cond["target"]).rsplit(".", 1)[-1]]
        layer = cond_params.get("layer", default_layer)
        if layer not in ("last", "penultimate") or (source == "transformers" and layer != "last"):
            out.problems.append(f"text encoder layer {layer!r} of {cond['target']} is not implemented here")
        out.text_stage = {"target": str(cond["target"]), "source": source, "layer": layer,
                          "max_length": int(cond_params.get("max_length", 77))}
        cond = None
    else:
        name = cond if isinstance(cond, str) else (cond or {}).get("target")
        out.problems.append(f"conditioning stage {name!r} is not implemented here (only ClassEmbedder and "
                            f"unconditional models convert whole; convert --component unet / vae instead)")
        cond = None
    out.cond_stage = cond
    d: Dict[str, Any] = {"conditioning_key": key}
    if params.get("given_betas") is not None:
        out.problems.append("given_betas is not supported; name the schedule instead")
    schedule = params.get("beta_schedule", "linear")
    if schedule not in _SCHEDULES:
        out.problems.append(f"beta_schedule {schedule!r} is not known")
    else:
        d["beta_schedule"] = _SCHEDULES[schedule]
        if schedule == "cosine":
            d["schedule_fn_kwargs"] = {"s": float(params.get("cosine_s", 8e-3))}
        else:
            d["schedule_fn_kwargs"] = {"beta_start": float(params.get("linear_start", 1e-4)),
                                       "beta_end": float(params.get("linear_end", 2e-2))}
    d["timesteps"] = int(params.get("timesteps", 1000))
    parameterization = params.get("parameterization", "eps")
    if parameterization not in _PARAMETERIZATIONS:
        out.problems.append(f"parameterization {parameterization!r} is not known")
    else:
        d["objective"] = _PARAMETERIZATIONS[parameterization]
    for ours, theirs, default in (("loss_type", "loss_type", "l2"), ("l_simple_weight", "l_simple_weight", 1.0),
                                  ("original_elbo_weight", "original_elbo_weight", 0.0),
                                  ("v_posterior", "v_posterior", 0.0), ("learn_logvar", "learn_logvar", False),
                                  ("logvar_init", "logvar_init", 0.0), ("scale_by_std", "scale_by_std", False)):
        d[ours] = params.get(theirs, default)
    d["scale_factor"] = float(params.get("scale_factor", 1.0))
    d["clip_denoised"] = False   # ldm's LatentDiffusion always sets it off
    if out.autoencoder is not None and params.get("image_size") is not None:
        f = 2 ** (len(out.autoencoder["ddconfig"].get("ch_mult", (1, 2, 4, 8))) - 1)
        d["image_size"] = int(params["image_size"]) * f   # ldm: latent size; ours: image size
    if isinstance(cond, Mapping):
        rows = int(cond["params"].get("n_classes", 1000))
        d["num_classes"] = rows - 1
        if out.unet is not None and int(cond["params"].get("embed_dim", 512)) != out.unet.get("context_dim"):
            out.problems.append("ClassEmbedder embed_dim differs from the unet's context_dim")
    elif key == "adm" and out.unet is not None and out.unet.get("num_classes") is not None:
        d["num_classes"] = int(out.unet["num_classes"]) - 1
    out.diffusion = d
    return out


# ----------------------------------------------------------------------------- reading

def read_ldm_checkpoint(path: PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """(flat state dict, info) of an ldm / SD checkpoint: a Lightning ``.ckpt`` (its ``state_dict``), a flat
    state dict (``.pt``) or ``.safetensors``. info: ``step`` and ``not_converted`` training state."""
    content, _ = read_weights(path)
    info: Dict[str, Any] = {"step": None, "not_converted": {}}
    if "state_dict" in content and isinstance(content["state_dict"], Mapping):
        unknown = sorted(k for k in content if k != "state_dict" and k not in _LIGHTNING_TRAINING_STATE)
        if unknown:
            raise ConversionError(f"{path}: a Lightning checkpoint with unknown entries {unknown}")
        step = content.get("global_step")
        info["step"] = None if step is None else int(np.asarray(step))
        for k in content:
            if k != "state_dict":
                info["not_converted"][k] = "Lightning training state"
        content = content["state_dict"]
    return flat_arrays(content, str(path)), info


def lit_ema_key(torch_name: str) -> str:
    """LitEma's key (after ``model_ema.``) for a ``model.*`` name: LitEma shadows the DiffusionWrapper's parameters
    under their names without dots (``model.diffusion_model.out.2.bias`` -> ``diffusion_modelout2bias``)."""
    if not torch_name.startswith("model."):
        raise ValueError(f"LitEma shadows model.* parameters only, not {torch_name!r}")
    return torch_name[len("model."):].replace(".", "")


def lit_ema_state(state: Mapping[str, np.ndarray], torch_names: List[str]) -> Optional[Dict[str, np.ndarray]]:
    """The UNet weights held by LitEma (``model_ema.<name without dots>``), under their ``model.*`` names.

    ``torch_names`` are the UNet's names in the checkpoint (``model.diffusion_model.*``). None when
    the checkpoint has no EMA; ConversionError if the EMA is partial or two names lose their dots
    to the same key."""
    shadow = {k[len(EMA_PREFIX):]: v for k, v in state.items()
              if k.startswith(EMA_PREFIX) and k[len(EMA_PREFIX):] not in _EMA_COUNTERS}
    if not shadow:
        return None
    flat = {}
    for name in torch_names:
        key = lit_ema_key(name)
        if key in flat:
            raise ConversionError(f"LitEma names {flat[key]!r} and {name!r} identically ({key!r})")
        flat[key] = name
    missing = sorted(f"{EMA_PREFIX}{k}" for k in flat if k not in shadow)
    unexpected = sorted(f"{EMA_PREFIX}{k}" for k in shadow if k not in flat)
    if missing or unexpected:
        raise ConversionError(f"the checkpoint's EMA (model_ema.*) does not match its unet: "
                              f"{problem_report(missing, unexpected)}")
    return {flat[k]: v for k, v in shadow.items()}


# ----------------------------------------------------------------------------- plans

def unet_plan(unet, torch_prefix: str = UNET_PREFIX, ms_prefix: str = "") -> Plan:
    """ldm UNetModel names for our ``UNetModel``."""
    return build_plan(unet, LDM, ms_prefix=ms_prefix, torch_prefix=torch_prefix, source="ldm UNetModel")


def autoencoder_plan(autoencoder, torch_prefix: str = FIRST_STAGE_PREFIX, ms_prefix: str = "") -> Plan:
    """ldm AutoencoderKL names for our ``AutoencoderKL``."""
    return build_plan(autoencoder, LDM, ms_prefix=ms_prefix, torch_prefix=torch_prefix, source="ldm AutoencoderKL")


def latent_diffusion_plan(ldm, learn_logvar: bool, scale_by_std: bool) -> Plan:
    """A whole ldm LatentDiffusion state dict <-> our LatentDiffusion (schedule buffers checked)."""
    plan = unet_plan(ldm.model.diffusion_model, UNET_PREFIX, "model.diffusion_model.")
    plan.source = "ldm LatentDiffusion"
    plan.extend(autoencoder_plan(ldm.first_stage_model, FIRST_STAGE_PREFIX, "first_stage_model."))
    if getattr(ldm.model, "has_cond_stage", False):
        plan.extend(build_plan(ldm.model.cond_stage_model, LDM, ms_prefix="model.cond_stage_model.",
                               torch_prefix=COND_STAGE_PREFIX))
    plan.checked = {name: getattr(ldm, name).asnumpy() for name in LDM_SCHEDULE_BUFFERS}
    for name, learned, what in (("logvar", learn_logvar, "the per-timestep log-variance (ldm: a parameter only "
                                                         "with learn_logvar)"),
                                ("scale_factor", scale_by_std, "the latent scale factor (ldm: a buffer only with "
                                                               "scale_by_std)")):
        value = getattr(ldm, name).asnumpy()
        if learned:
            plan.entries.append(_scalar_entry(name, value))
        else:
            plan.fixed[name] = (value, what)
    return plan


def _scalar_entry(name: str, value: np.ndarray) -> Entry:
    return Entry(name, (name,), IDENTITY, tuple(value.shape), value.dtype)


# ----------------------------------------------------------------------------- ldm -> ours

def ldm_to_ms(path: PathLike, ldm_config: Union[PathLike, Mapping[str, Any]], component: str = "all",
              use_ema: bool = True, experiment: Optional[Mapping[str, Any]] = None) -> Converted:
    """Convert an ldm / Stable Diffusion checkpoint.

    ``component``: ``"all"`` the whole LatentDiffusion (an experiment config ``sample.py`` runs; needs a KL
    first stage and an unconditional / ClassEmbedder / adm conditioning); ``"vae"`` the first stage as an
    autoencoder experiment (usable as a latent diffusion's ``first_stage``); ``"unet"`` the UNetModel alone
    (a network file, ``load_network``). ``use_ema``: for ``unet``, take LitEma's weights when present.
    Choosing a component leaves the rest of the checkpoint out on purpose; the result lists it.
    """
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    cfg = parse_ldm_config(ldm_config)
    state, info = read_ldm_checkpoint(path)
    experiment = dict(experiment or {})
    meta = {"source": "ldm", "path": str(path), "step": info["step"], "component": component,
            "not_converted": dict(info["not_converted"])}
    standalone_vae = cfg.unet is None
    if component == "vae" or standalone_vae:
        if cfg.autoencoder is None:
            raise ConversionError("the ldm config has no KL first stage to convert")
        if standalone_vae:
            inside = {k: v for k, v in state.items() if not k.startswith("loss.")}
            left = sorted(k for k in state if k.startswith("loss."))
            if left and component != "vae":
                raise ConversionError(f"the checkpoint also holds the autoencoder's training loss ({len(left)} loss.* "
                                      f"tensors: LPIPS, discriminator, logvar), which is not converted; pass "
                                      f"component 'vae' (--component vae) to convert the autoencoder alone")
            if left:
                meta["not_converted"]["loss.*"] = f"the autoencoder's training loss ({len(left)} tensors)"
        else:
            inside, left = select_prefix(state, FIRST_STAGE_PREFIX)
            if left:
                meta["not_converted"]["(not first_stage_model.*)"] = f"{len(left)} tensors of the other components"
        built, vae = build_from_config(autoencoder_experiment(cfg.autoencoder, cfg.autoencoder_loss,
                                                                      experiment))
        online = autoencoder_plan(vae, "").to_ms(inside)
        return Converted(config=built.to_dict(), online=online, meta=meta)
    if cfg.unet is None:
        raise ConversionError("the ldm config has no unet_config")
    if cfg.unet_problems:
        raise ConversionError("this ldm UNet does not convert: " + "; ".join(cfg.unet_problems))
    if component == "unet":
        from ms_diffusion.models import UNetModel

        plan = unet_plan(UNetModel(**cfg.unet), UNET_PREFIX)
        inside = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
        ema = lit_ema_state(state, plan.torch_names)
        left = sum(1 for k in state if not k.startswith((UNET_PREFIX, EMA_PREFIX)))
        if left:
            meta["not_converted"]["(not model.diffusion_model.*)"] = f"{left} tensors of the other components"
        if ema is not None and use_ema:
            online = plan.to_ms(ema)
            meta["not_converted"]["model.diffusion_model.*"] = "the non-EMA unet weights (use_ema chose model_ema.*)"
        else:
            online = plan.to_ms(inside)
            if ema is not None:
                meta["not_converted"]["model_ema.*"] = "the unet's EMA weights (use_ema=False)"
        meta["weights"] = "ema" if (ema is not None and use_ema) else "online"
        return Converted(config=None, online=online, meta=meta, network={"type": "unet_ldm", **cfg.unet})
    if cfg.text_stage is not None:
        raise ConversionError(f"this is a text-to-image model ({cfg.text_stage['target']}): load it whole with "
                              f"StableDiffusion.from_single_file (sample.py --ckpt FILE --prompt ...), or convert "
                              f"--component unet / vae")
    if cfg.problems:
        raise ConversionError("this ldm model does not convert whole (convert --component unet / vae instead): "
                              + "; ".join(cfg.problems))
    config = dict(experiment)
    config.setdefault("name", "converted-ldm")
    config["model"] = {"type": "unet_ldm", **cfg.unet}
    config["diffusion"] = {"type": "latent", **cfg.diffusion}
    first_stage = {"type": "autoencoder_kl", **cfg.autoencoder}
    built, ldm = build_from_config(config, first_stage)
    d = cfg.diffusion
    plan = latent_diffusion_plan(ldm, bool(d.get("learn_logvar")), bool(d.get("scale_by_std")))
    ema_unet = lit_ema_state(state, [t for t in plan.torch_names if t.startswith(UNET_PREFIX)])
    body = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    online = plan.to_ms(body)
    ema = None
    if ema_unet is not None:
        ema = plan.to_ms({**body, **ema_unet})
        meta["not_converted"]["model_ema.decay, model_ema.num_updates"] = "LitEma's counters"
    load_arrays_into(ldm, online)
    return Converted(config=built.to_dict(), online=online, ema=ema, meta=meta, first_stage=first_stage)


# ----------------------------------------------------------------------------- ours -> ldm

def ms_to_ldm(path: PathLike, weights: str = "ema", prefix: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Our checkpoint or network file -> an ldm state dict.

    A latent diffusion gives the whole LatentDiffusion state dict (``weights="both"``: online weights plus
    LitEma's ``model_ema.*``); an autoencoder run or a ``unet_ldm`` network file gives that component under
    ``prefix`` (default: where an ldm LatentDiffusion keeps it; ``""`` for a bare state dict)."""
    from ms_diffusion.models import UNetModel

    if weights not in ("both", "ema", "online"):
        raise ValueError(f"weights must be both, ema or online, got {weights!r}")
    if is_network_file(path):
        network, arrays, _ = load_network(path)
        if not isinstance(network, UNetModel):
            raise ConversionError(f"{path} holds a {type(network).__name__}, not an ldm UNetModel")
        return unet_plan(network, UNET_PREFIX if prefix is None else prefix).to_torch(arrays)
    config, groups, meta = read_ms_checkpoint(path)
    if (config.get("model") or {}).get("type") == "autoencoder_kl":
        _, vae = build_from_config(config)
        group = "online" if "online" in groups else next(iter(groups))
        load_arrays_into(vae, groups[group])
        return autoencoder_plan(vae, FIRST_STAGE_PREFIX if prefix is None else prefix).to_torch(groups[group])
    if (config.get("diffusion") or {}).get("type") != "latent":
        raise ConversionError(f"{meta['path']} is not a latent diffusion, an autoencoder or an ldm UNet; "
                              f"GaussianDiffusion(Unet) checkpoints go to lucidrains (to-lucidrains)")
    _, ldm = build_from_config(config, (meta.get("first_stage") or {}).get("model"),
                               (meta.get("text_encoder") or {}).get("network"))
    d = config["diffusion"]
    plan = latent_diffusion_plan(ldm, bool(d.get("learn_logvar")), bool(d.get("scale_by_std")))
    wanted = ("online", "ema") if weights == "both" else (weights,)
    for g in wanted:
        if g not in groups:
            raise ConversionError(f"{meta['path']} has no {g} weights (it holds {', '.join(sorted(groups))})")
        load_arrays_into(ldm, groups[g])
    out = plan.to_torch(groups[wanted[0]])
    if weights == "both":
        for t, v in plan.to_torch(groups["ema"]).items():
            if t.startswith(UNET_PREFIX):
                out[EMA_PREFIX + lit_ema_key(t)] = v
        out[EMA_PREFIX + "decay"] = np.array(0.9999, np.float32)
        out[EMA_PREFIX + "num_updates"] = np.array(int((meta.get("ema") or {}).get("step", 0)), np.int32)
    return out
