"""Layer 2: the text side of text-to-image -- CLIP's tokenizer and text encoder."""
from ms_diffusion.models import MODELS
from ms_diffusion.text.clip import SD1_TEXT_ENCODER, SD2_TEXT_ENCODER, CLIPTextEmbedder, CLIPTextModel
from ms_diffusion.text.tokenizer import CLIPTokenizer, TokenizerFileError, bytes_to_unicode, default_bpe_file

__all__ = ["CLIPTokenizer", "TokenizerFileError", "bytes_to_unicode", "default_bpe_file", "CLIPTextModel",
           "CLIPTextEmbedder", "SD1_TEXT_ENCODER", "SD2_TEXT_ENCODER"]

#: a CLIP text encoder as a network file's section (``{"network": {"type": "clip_text", ...}}``): what
#: ``convert_checkpoint.py from-diffusers`` writes and ``diffusion.text.encoder`` names
MODELS.register("clip_text", CLIPTextModel)
