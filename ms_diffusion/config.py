"""Experiment configs: YAML -> validated, typed sections -> built objects.

A config has top-level keys ``name, seed, device, mode, out_dir`` and sections:

* ``model``: ``type`` (a registered network) + that class's constructor arguments;
* ``diffusion``: ``type`` (a registered objective) + its arguments (the model is passed in);
  ``latent`` names its frozen first stage, an autoencoder run (``first_stage``);
* ``loss`` instead of ``diffusion`` for autoencoder models (``model.type: autoencoder_kl``):
  ``type`` (a registered autoencoder loss) + its arguments;
* ``data``: ``name`` (a registered dataset) + ``build_source`` arguments;
* ``train``: ``TrainConfig`` fields; ``sample``: ``SampleConfig`` fields.

Keys are checked against the registered class signatures / dataclass fields: an unknown or
misspelt key is an error naming it and the closest valid key; values are coerced to the annotated
types (YAML lists -> tuples, "1e-4" -> float) or rejected. Only ``yaml.safe_load`` is used, and a
config can only name registered classes (no dotted-path imports).
"""
from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from ms_diffusion.diffusion import GaussianDiffusion, LatentDiffusion
from ms_diffusion.diffusion.latent import LDM_DIFFUSION_DEFAULTS, ClassEmbedder
from ms_diffusion.losses import LPIPSWithDiscriminator
from ms_diffusion.models import AutoencoderKL, UNetModel, Unet
from ms_diffusion.training.trainer import TrainConfig

__all__ = ["ConfigError", "ExperimentConfig", "SampleConfig", "load_config", "config_from_dict", "MODELS",
           "DIFFUSIONS", "LOSSES", "AUTOENCODER_MODELS", "build_model", "build_network", "build_diffusion",
           "build_autoencoder_loss", "build_latent_diffusion", "apply_overrides", "DEFAULT_CONFIG"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "fashion_mnist_fast.yaml"

MODELS: Dict[str, Callable] = {"unet": Unet, "unet_ldm": UNetModel, "autoencoder_kl": AutoencoderKL}
DIFFUSIONS: Dict[str, Callable] = {"gaussian": GaussianDiffusion}   # + "latent", registered below its builder
#: model types trained as autoencoders: their config has a ``loss`` section instead of ``diffusion``
AUTOENCODER_MODELS = ("autoencoder_kl",)
LOSSES: Dict[str, Callable] = {"lpips_discriminator": LPIPSWithDiscriminator}
# arguments of a registered class that code passes in and a config cannot name
_BUILD_ONLY = {"diffusion": ("self", "model", "first_stage_model"), "loss": ("self", "perceptual_model")}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


@dataclass
class SampleConfig:
    """How ``sample.py`` and training sample grids draw images (the ``sample:`` section)."""

    sampler: Optional[str] = None      # None: DDIM if diffusion.sampling_timesteps < timesteps, else DDPM
    steps: Optional[int] = None
    eta: Optional[float] = None
    num: int = 64
    batch_size: int = 64
    seed: int = 0
    class_label: Optional[int] = None
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    gif_frames: int = 40

    def generate_options(self, conditional: bool, **overrides: Any) -> Dict[str, Any]:
        """``pipeline.generate`` keywords (sampler, steps, eta, guidance_scale, guidance_rescale) of this
        section, with the non-None ``overrides`` (command-line flags) taking precedence; guidance is off
        (scale 1, rescale 0) for an unconditional model unless an override asks for it."""
        options = {"sampler": self.sampler, "steps": self.steps, "eta": self.eta,
                   "guidance_scale": self.guidance_scale if conditional else 1.0,
                   "guidance_rescale": self.guidance_rescale if conditional else 0.0}
        unknown = set(overrides) - set(options)
        if unknown:
            raise TypeError(f"unknown sampling option(s) {sorted(unknown)}")
        options.update({k: v for k, v in overrides.items() if v is not None})
        return options


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    mode: str = "graph"
    out_dir: Optional[str] = None
    model: Dict[str, Any] = field(default_factory=lambda: {"type": "unet"})
    diffusion: Optional[Dict[str, Any]] = field(default_factory=lambda: {"type": "gaussian"})  # None: autoencoder
    data: Dict[str, Any] = field(default_factory=lambda: {"name": "fashion_mnist"})
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    loss: Optional[Dict[str, Any]] = None   # autoencoder models only

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    @property
    def is_autoencoder(self) -> bool:
        """True for an autoencoder experiment (trained with a ``loss`` section, no diffusion)."""
        return self.model.get("type") in AUTOENCODER_MODELS

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return _plain(d)


# ----------------------------------------------------------------------------- type coercion

def _plain(value):
    """Tuples -> lists, recursively (for YAML/JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value, annotation, where: str):
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``where``."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(annotation)}")
    if origin in (tuple, list, collections.abc.Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        if args and origin is tuple and len(args) > 1:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" — did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown key {where + key!r}{hint}")


def _signature_params(fn: Callable, skip: Sequence[str]) -> Dict[str, inspect.Parameter]:
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # an annotation that cannot be resolved: check names only for those
        hints = {}
    sig = inspect.signature(fn)
    out = {}
    for name, p in sig.parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = hints.get(name, p.annotation)
        if isinstance(annotation, str):
            annotation = inspect.Parameter.empty
        out[name] = p.replace(annotation=annotation)
    return out


def _validate_kwargs(section: str, values: Mapping[str, Any], fn: Callable, skip: Sequence[str]) -> Dict[str, Any]:
    params = _signature_params(fn, skip)
    out = {}
    for key, value in values.items():
        if key not in params:
            raise _unknown_key(key, params, f"{section}.")
        out[key] = _coerce(value, params[key].annotation, f"{section}.{key}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in out]
    if missing:
        raise ConfigError(f"{section}: missing required key(s) {missing}")
    return out


def _unknown_choice(where: str, what: str, value, choices: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    hint = f" — did you mean {close[0]!r}?" if close else f"; choose one of {sorted(choices)}"
    return ConfigError(f"{where}: unknown {what} {value!r}{hint}")


def _registered(section: str, values: Mapping[str, Any], key: str, registry: Mapping[str, Callable],
                skip: Sequence[str]) -> Dict[str, Any]:
    values = dict(values or {})
    kind = values.pop(key, None)
    if kind is None:
        raise ConfigError(f"{section}: missing {key!r}; choose one of {sorted(registry)}")
    if kind not in registry:
        raise _unknown_choice(f"{section}.{key}", key, kind, registry)
    return {key: kind, **_validate_kwargs(section, values, registry[kind], skip)}


def _dataclass_section(section: str, values: Mapping[str, Any], cls):
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(key, names, f"{section}.")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


# ----------------------------------------------------------------------------- loading

def _data_builder():
    from ms_diffusion.data import DATASET_NAMES, build_source
    return DATASET_NAMES, build_source


_DATA_FILLED = ("name", "image_size", "channels", "seed", "num_shards", "shard_id")
_TOP_LEVEL = {f.name for f in dataclasses.fields(ExperimentConfig)}


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a plain dict (parsed YAML) into an ExperimentConfig."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise _unknown_key(key, _TOP_LEVEL, "")
    cfg = ExperimentConfig()
    for key in ("name", "device", "mode", "out_dir"):
        if key in raw:
            setattr(cfg, key, _coerce(raw[key], Optional[str] if key == "out_dir" else str, key))
    if "seed" in raw:
        cfg.seed = _coerce(raw["seed"], int, "seed")
    if cfg.mode not in ("graph", "pynative"):
        raise ConfigError(f"mode: expected graph or pynative, got {cfg.mode!r}")
    cfg.model = _registered("model", raw.get("model", {"type": "unet"}), "type", MODELS, ("self",))
    if cfg.is_autoencoder:
        if raw.get("diffusion") is not None:
            raise ConfigError(f"model.type {cfg.model['type']!r} is an autoencoder: it is trained with a `loss:` "
                              f"section, not `diffusion:` (see configs/autoencoder_kl_fashion_mnist.yaml)")
        cfg.diffusion = None
        cfg.loss = _registered("loss", raw.get("loss") or {"type": "lpips_discriminator"}, "type", LOSSES,
                               _BUILD_ONLY["loss"])
    else:
        if raw.get("loss") is not None:
            raise ConfigError(f"a `loss:` section belongs to autoencoder models ({', '.join(AUTOENCODER_MODELS)}); "
                              f"model.type {cfg.model['type']!r} is trained by its `diffusion:` section")
        cfg.diffusion = _registered("diffusion", raw.get("diffusion", {"type": "gaussian"}), "type", DIFFUSIONS,
                                    _BUILD_ONLY["diffusion"])
    datasets, build_source = _data_builder()
    data = dict(raw.get("data") or {"name": "fashion_mnist"})
    name = data.pop("name", None)
    if name not in datasets:
        raise _unknown_choice("data.name", "dataset", name, datasets)
    cfg.data = {"name": name, **_validate_kwargs("data", data, build_source, _DATA_FILLED)}
    try:
        cfg.train = _dataclass_section("train", raw.get("train"), TrainConfig).validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg.sample = _dataclass_section("sample", raw.get("sample"), SampleConfig)
    return cfg


def _parse_override(item: str) -> Tuple[List[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. train.lr=2e-4)")
    key, text = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: cannot parse value: {err}") from None
    return path, value


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides or ():
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return raw


def resolve_config_path(path: Optional[str]) -> Path:
    """A config path as given, or a bare name looked up in the shipped configs/ folder."""
    if path is None:
        return CONFIG_DIR / DEFAULT_CONFIG
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(q.name for q in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"config file {path!r} not found; pass a path or one of the shipped configs: {shipped}")


def _yaml_error_message(path: Path, text: str, err: "yaml.YAMLError") -> str:
    """``FILE, line L, column C: invalid YAML: problem (context)`` and the offending line with a caret (1-based)."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        line, column = mark.line, mark.column
        problem = getattr(err, "problem", None) or str(err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None and (context_mark.line, context_mark.column) != (line, column):
            problem += f" ({context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
        elif context:
            problem += f" ({context})"
    elif isinstance(getattr(err, "position", None), int):  # a reader error: a character YAML does not allow
        pos = err.position
        line, column = text.count("\n", 0, pos), pos - (text.rfind("\n", 0, pos) + 1)
        char = getattr(err, "character", None)
        code = char if isinstance(char, int) else ord(char) if isinstance(char, str) and len(char) == 1 else None
        problem = f"character {'U+%04X' % code if code is not None else repr(char)} is not allowed in YAML"
    else:
        return f"{path}: invalid YAML: {err}"
    if "'\\t'" in problem:
        problem += "; YAML indents with spaces, not tabs"
    lines = text.splitlines()
    shown = ""
    if 0 <= line < len(lines) and lines[line].strip():
        shown = f"\n  {lines[line].rstrip()}\n  {' ' * column}^"
    return f"{path}, line {line + 1}, column {column + 1}: invalid YAML: {problem}{shown}"


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (default: the shipped Fashion-MNIST config), apply overrides, validate."""
    p = resolve_config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not a YAML text file (byte {err.start} is not UTF-8 text)") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error_message(p, text, err)) from None
    cfg = config_from_dict(apply_overrides(raw, overrides))
    if "name" not in raw and not any(o.startswith("name=") for o in overrides or ()):
        cfg.name = p.stem
    return cfg


# ----------------------------------------------------------------------------- building

def build_network(section: Mapping[str, Any]):
    """A network from a ``model:`` section ({type, arguments}), validated like a config's."""
    kwargs = _registered("model", section, "type", MODELS, ("self",))
    return MODELS[kwargs.pop("type")](**kwargs)


def build_model(cfg: ExperimentConfig):
    kwargs = dict(cfg.model)
    return MODELS[kwargs.pop("type")](**kwargs)


def build_diffusion(cfg: ExperimentConfig, model=None, **build_args):
    """The diffusion objective around ``model`` (default: built from ``cfg.model``).

    ``build_args`` are the registered builder's code-only arguments (e.g. ``first_stage_model``).
    """
    if cfg.diffusion is None:
        raise ConfigError(f"model.type {cfg.model['type']!r} is an autoencoder, not a diffusion model; train it "
                          f"with train.py and use its run as diffusion.first_stage of a `latent` config")
    kwargs = dict(cfg.diffusion)
    return DIFFUSIONS[kwargs.pop("type")](model if model is not None else build_model(cfg), **kwargs, **build_args)


def build_autoencoder_loss(cfg: ExperimentConfig) -> LPIPSWithDiscriminator:
    """The ``loss:`` section of an autoencoder config as its loss Cell (discriminator, logvar, LPIPS)."""
    if cfg.loss is None:
        raise ConfigError("this config has no `loss:` section (only autoencoder models have one)")
    kwargs = dict(cfg.loss)
    return LOSSES[kwargs.pop("type")](**kwargs)


def data_geometry(built) -> Tuple[Tuple[int, int], int]:
    """((H, W), channels) of the training images of a built diffusion or autoencoder.

    A latent diffusion trains on images of its first stage's size, not on its latents.
    """
    if isinstance(built, AutoencoderKL):
        res = int(built.ddconfig["resolution"])
        return (res, res), built.in_channels
    if isinstance(built, LatentDiffusion):
        return tuple(built.pixel_size), built.first_stage_model.in_channels
    return tuple(built.image_size), built.channels


def build_data_source(cfg: ExperimentConfig, diffusion, shard_id: int = 0, num_shards: int = 1):
    """The data source of ``cfg`` shaped for ``diffusion`` (a built diffusion or autoencoder)."""
    _, build_source = _data_builder()
    kwargs = dict(cfg.data)
    name = kwargs.pop("name")
    size, channels = data_geometry(diffusion)
    return build_source(name, image_size=size, channels=channels, seed=cfg.seed, num_shards=num_shards,
                        shard_id=shard_id, **kwargs)


# ----------------------------------------------------------------------------- latent diffusion

_CLASS_CONDITIONINGS = (None, "crossattn", "adm")


def build_latent_diffusion(model: UNetModel, *, first_stage: Optional[str] = None,
                           first_stage_model: Optional[AutoencoderKL] = None, conditioning_key: Optional[str] = None,
                           num_classes: Optional[int] = None, cond_drop_prob: float = 0.1, scale_factor: float = 1.0,
                           scale_by_std: bool = False, image_size: Optional[int] = None, auto_normalize: bool = True,
                           **diffusion_kwargs) -> LatentDiffusion:
    """The ``latent`` diffusion type: ``LatentDiffusion`` around an ldm ``UNetModel`` and a frozen autoencoder.

    ``first_stage``: an autoencoder run folder, step checkpoint or ``model.safetensors`` (written by
    ``train.py`` with an autoencoder config); its architecture and weights are loaded, frozen, and
    recorded (``first_stage_info``: path, sha256, step, model section) so that the latent
    diffusion's checkpoints, which hold the first stage's weights too, load on their own. Code that
    already has the autoencoder passes ``first_stage_model`` instead (``pipeline.load_diffusion``).

    Class conditioning from the data's labels: ``conditioning_key: crossattn`` with ``num_classes``
    (a ``ClassEmbedder`` into the unet's ``context_dim``) or ``adm`` (the unet's ``num_classes`` is
    N + 1: N classes and the null class). Any ``GaussianDiffusion`` option (``timesteps``,
    ``sampling_timesteps``, ``learn_logvar``, ...) may follow; unset ones take ldm's defaults.
    """
    if conditioning_key not in _CLASS_CONDITIONINGS:
        raise ConfigError(f"diffusion.conditioning_key {conditioning_key!r}: a config trains on images and class "
                          f"labels, so choose one of {list(_CLASS_CONDITIONINGS)} (concat / hybrid conditionings "
                          f"need conditioning inputs: use LatentDiffusion from Python)")
    cond_stage = None
    if conditioning_key == "crossattn":
        if num_classes is None:
            raise ConfigError("diffusion.num_classes: conditioning_key crossattn embeds class labels; set the number "
                              "of classes")
        if model.context_dim is None:
            raise ConfigError("model.context_dim: crossattn conditioning needs use_spatial_transformer: true and "
                              "context_dim in the unet_ldm model")
        cond_stage = ClassEmbedder(model.context_dim, num_classes)
    elif conditioning_key == "adm":
        if model.num_classes is None or (num_classes is not None and model.num_classes != num_classes + 1):
            raise ConfigError(f"model.num_classes: adm conditioning needs the unet's num_classes = classes + 1 (the "
                              f"null class); got {model.num_classes} for num_classes={num_classes}")
    elif num_classes is not None:
        raise ConfigError("diffusion.num_classes is set but conditioning_key is not: choose crossattn or adm")
    if first_stage_model is None:
        if not first_stage:
            raise ConfigError("diffusion.first_stage: the latent diffusion needs its autoencoder: set it to the run "
                              "folder (or checkpoint) of an autoencoder trained with train.py")
        from ms_diffusion.pipeline import load_autoencoder  # the pipeline imports this module
        from ms_diffusion.io.checkpoint import CheckpointError

        try:
            first_stage_model, info = load_autoencoder(first_stage)
        except CheckpointError as err:
            raise ConfigError(f"diffusion.first_stage: {err}") from None
    else:
        info = None
    latent_channels = first_stage_model.embed_dim
    if (model.in_channels, model.out_channels) != (latent_channels, latent_channels):
        raise ConfigError(f"model.in_channels / out_channels are {model.in_channels} / {model.out_channels} but the "
                          f"first stage's latents have {latent_channels} channels (its embed_dim); set both to "
                          f"{latent_channels}")
    ldm = LatentDiffusion(first_stage_model, model, image_size=image_size, conditioning_key=conditioning_key,
                          cond_stage_model=cond_stage, cond_drop_prob=cond_drop_prob, scale_factor=scale_factor,
                          scale_by_std=scale_by_std, auto_normalize=auto_normalize, **diffusion_kwargs)
    ldm.first_stage_info = info
    return ldm


def _with_diffusion_options(builder: Callable) -> Callable:
    """Give ``builder`` (which forwards ``**diffusion_kwargs``) a signature that lists GaussianDiffusion's
    options with ldm's defaults, so config keys are checked and coerced against them."""
    own = inspect.signature(builder)
    params = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
    taken = {p.name for p in params}
    hints = typing.get_type_hints(GaussianDiffusion.__init__)
    for name, p in inspect.signature(GaussianDiffusion.__init__).parameters.items():
        if name in ("self", "model", "immiscible") or name in taken:
            continue
        params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=hints.get(name, p.annotation),
                                default=LDM_DIFFUSION_DEFAULTS.get(name, p.default)))
    builder.__signature__ = own.replace(parameters=params)
    return builder


DIFFUSIONS["latent"] = _with_diffusion_options(build_latent_diffusion)
