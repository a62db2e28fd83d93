"""Experiment configs: YAML -> validated, typed sections. Parsing only: ``ms_diffusion.experiment`` builds.

A config has top-level keys ``name, seed, device, mode, out_dir`` and sections:

* ``model``: ``type`` (a network registered in ``models.MODELS``) + its constructor arguments;
* ``diffusion``: ``type`` (an objective in ``diffusion.DIFFUSIONS``) + its arguments (the model is
  passed in); ``latent`` names its frozen first stage, an autoencoder run (``first_stage``);
* ``loss`` instead of ``diffusion`` for autoencoder models (``model.type: autoencoder_kl``):
  ``type`` (an autoencoder loss in ``losses.LOSSES``) + its arguments;
* ``data``: ``name`` (a dataset in ``data.DATASETS``) + its constructor arguments;
* ``train``: ``TrainConfig`` fields; ``sample``: ``SampleConfig`` fields.

Keys are checked against the registered signatures / dataclass fields (``ms_diffusion.registry``):
an unknown or misspelt key is an error naming it and the closest valid key; values are coerced to
the annotated types (YAML lists -> tuples, "1e-4" -> float) or rejected. Only ``yaml.safe_load`` is
used, and a config can only name registered classes (no dotted-path imports).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from ms_diffusion.data import DATASETS
from ms_diffusion.diffusion.registry import DIFFUSIONS
from ms_diffusion.losses import LOSSES
from ms_diffusion.metrics.features import EXTRACTOR_KINDS
from ms_diffusion.models import MODELS
from ms_diffusion.registry import ConfigError, coerce, unknown_key
from ms_diffusion.training.trainer import TrainConfig

__all__ = ["ConfigError", "ExperimentConfig", "SampleConfig", "load_config", "config_from_dict", "apply_overrides",
           "resolve_config_path", "AUTOENCODER_MODELS", "DEFAULT_CONFIG", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "fashion_mnist_fast.yaml"

#: model types trained as autoencoders: their config has a ``loss`` section instead of ``diffusion``
AUTOENCODER_MODELS = ("autoencoder_kl",)


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
    prompts: Optional[List[str]] = None        # text-conditional models: grids and evaluations cycle these
    negative_prompt: Optional[str] = None

    def generate_options(self, conditional: bool, text: bool = False, **overrides: Any) -> Dict[str, Any]:
        """``pipeline.generate`` keywords (sampler, steps, eta, guidance_scale, guidance_rescale, and for a
        ``text``-conditional model negative_prompt) of this section, with the non-None ``overrides``
        (command-line flags) taking precedence; guidance is off (scale 1, rescale 0) for an unconditional
        model unless an override asks for it."""
        options = {"sampler": self.sampler, "steps": self.steps, "eta": self.eta,
                   "guidance_scale": self.guidance_scale if conditional or text else 1.0,
                   "guidance_rescale": self.guidance_rescale if conditional or text else 0.0}
        if text:
            options["negative_prompt"] = self.negative_prompt
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


def _plain(value):
    """Tuples -> lists, recursively (for YAML/JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _dataclass_section(section: str, values: Mapping[str, Any], cls):
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise unknown_key(key, names, f"{section}.")
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


# ----------------------------------------------------------------------------- loading

_TOP_LEVEL = {f.name for f in dataclasses.fields(ExperimentConfig)}


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a plain dict (parsed YAML) into an ExperimentConfig."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise unknown_key(key, _TOP_LEVEL, "")
    cfg = ExperimentConfig()
    for key in ("name", "device", "mode", "out_dir"):
        if key in raw:
            setattr(cfg, key, coerce(raw[key], Optional[str] if key == "out_dir" else str, key))
    if "seed" in raw:
        cfg.seed = coerce(raw["seed"], int, "seed")
    if cfg.mode not in ("graph", "pynative"):
        raise ConfigError(f"mode: expected graph or pynative, got {cfg.mode!r}")
    cfg.model = MODELS.validate(raw.get("model", {"type": "unet"}))
    if cfg.is_autoencoder:
        if raw.get("diffusion") is not None:
            raise ConfigError(f"model.type {cfg.model['type']!r} is an autoencoder: it is trained with a `loss:` "
                              f"section, not `diffusion:` (see configs/autoencoder_kl_fashion_mnist.yaml)")
        cfg.diffusion = None
        cfg.loss = LOSSES.validate(raw.get("loss") or {"type": "lpips_discriminator"})
    else:
        if raw.get("loss") is not None:
            raise ConfigError(f"a `loss:` section belongs to autoencoder models ({', '.join(AUTOENCODER_MODELS)}); "
                              f"model.type {cfg.model['type']!r} is trained by its `diffusion:` section")
        cfg.diffusion = DIFFUSIONS.validate(raw.get("diffusion", {"type": "gaussian"}))
    cfg.data = DATASETS.validate(raw.get("data") or {"name": "fashion_mnist"})
    try:
        cfg.train = _dataclass_section("train", raw.get("train"), TrainConfig).validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.train.eval_features not in EXTRACTOR_KINDS:
        raise ConfigError(f"train: eval_features must be one of {EXTRACTOR_KINDS}")
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
