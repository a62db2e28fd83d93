"""Layer 1: files only -- checkpoint and safetensors formats with atomic writes, the state-dict renamer and
loader, the one reader of run folders and checkpoints, file hashing. No models, no config."""
from ms_diffusion.io.checkpoint import (META_KEY, CheckpointError, export_safetensors, latest_checkpoint,
                                        list_checkpoints, load_checkpoint, load_safetensors, save_checkpoint)
from ms_diffusion.io.hashing import file_sha256
from ms_diffusion.io.state import ConversionError, load_arrays_into, named_parameters, rename, state_arrays
from ms_diffusion.io.weights import read_weight_groups, read_weights, resolve_checkpoint

__all__ = ["META_KEY", "CheckpointError", "export_safetensors", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_safetensors", "save_checkpoint", "file_sha256", "ConversionError",
           "load_arrays_into", "named_parameters", "rename", "state_arrays", "read_weight_groups", "read_weights",
           "resolve_checkpoint"]
