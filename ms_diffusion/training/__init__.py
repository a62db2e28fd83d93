"""Layer 4: the only place with mutable training state (optimizer, EMA, loss scale, checkpoints)."""
from ms_diffusion.io.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from ms_diffusion.training.amp import apply_amp
from ms_diffusion.training.autoencoder import AutoencoderTrainer
from ms_diffusion.training.base import MicroStep, TrainerBase
from ms_diffusion.training.ema import EMA
from ms_diffusion.training.optim import WarmupConstantLR, WarmupCosineLR, build_lr_schedule, build_optimizer
from ms_diffusion.training.step import TrainStep
from ms_diffusion.training.trainer import TrainConfig, Trainer

__all__ = ["apply_amp", "CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "EMA",
           "WarmupConstantLR", "WarmupCosineLR", "build_lr_schedule", "build_optimizer", "TrainStep", "TrainConfig",
           "Trainer", "TrainerBase", "MicroStep", "AutoencoderTrainer"]
