"""Layer 2: the text side of text-to-image -- CLIP's tokenizer and text encoder."""
from ms_diffusion.text.tokenizer import CLIPTokenizer, TokenizerFileError, bytes_to_unicode, default_bpe_file

__all__ = ["CLIPTokenizer", "TokenizerFileError", "bytes_to_unicode", "default_bpe_file"]
