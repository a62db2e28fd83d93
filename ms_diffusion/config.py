"""Experiment configs: YAML -> validated, typed sections -> built objects.

A config has top-level keys ``name, seed, device, mode, out_dir`` and sections:

* ``model``: ``type`` (a registered network) + that class's constructor arguments;
* ``diffusion``: ``type`` (a registered objective) + its arguments (the model is passed in);
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

from ms_diffusion.diffusion import GaussianDiffusion
from ms_diffusion.models import Unet
from ms_diffusion.training.trainer import TrainConfig

__all__ = ["ConfigError", "ExperimentConfig", "SampleConfig", "load_config", "config_from_dict", "MODELS",
           "DIFFUSIONS", "build_model", "build_diffusion", "apply_overrides", "DEFAULT_CONFIG"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "fashion_mnist_fast.yaml"

MODELS: Dict[str, Callable] = {"unet": Unet}
DIFFUSIONS: Dict[str, Callable] = {"gaussian": GaussianDiffusion}


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


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    mode: str = "graph"
    out_dir: Optional[str] = None
    model: Dict[str, Any] = field(default_factory=lambda: {"type": "unet"})
    diffusion: Dict[str, Any] = field(default_factory=lambda: {"type": "gaussian"})
    data: Dict[str, Any] = field(default_factory=lambda: {"name": "fashion_mnist"})
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

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
    cfg.diffusion = _registered("diffusion", raw.get("diffusion", {"type": "gaussian"}), "type", DIFFUSIONS,
                                ("self", "model"))
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


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (default: the shipped Fashion-MNIST config), apply overrides, validate."""
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: invalid YAML: {err}") from None
    cfg = config_from_dict(apply_overrides(raw, overrides))
    if "name" not in raw and not any(o.startswith("name=") for o in overrides or ()):
        cfg.name = p.stem
    return cfg


# ----------------------------------------------------------------------------- building

def build_model(cfg: ExperimentConfig):
    kwargs = dict(cfg.model)
    return MODELS[kwargs.pop("type")](**kwargs)


def build_diffusion(cfg: ExperimentConfig, model=None):
    kwargs = dict(cfg.diffusion)
    return DIFFUSIONS[kwargs.pop("type")](model if model is not None else build_model(cfg), **kwargs)


def build_data_source(cfg: ExperimentConfig, diffusion, shard_id: int = 0, num_shards: int = 1):
    _, build_source = _data_builder()
    kwargs = dict(cfg.data)
    name = kwargs.pop("name")
    return build_source(name, image_size=tuple(diffusion.image_size), channels=diffusion.channels, seed=cfg.seed,
                        num_shards=num_shards, shard_id=shard_id, **kwargs)
