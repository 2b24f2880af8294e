"""SimVQ Codec: a streaming neural speech codec with SimVQ residual quantization.

from codec import load_model, compress, decompress
codec = load_model()                      # the bundled default model, "simvq-16k", and its identity
compress("speech.wav", "speech.tok", codec, bitrate=3.0)
decompress("speech.tok", "restored.wav")
"""

from codec.api import compress, decode_array, decompress, encode_array
from codec.errors import AudioError, CheckpointError, CodecError, TokFormatError, UnknownModelError
from codec.model import CodecOutput, SimVQCodec
from codec.presets import DEFAULT_MODEL_ID, list_models, load_model
from codec.pretrained import Pretrained
from codec.quantizer import QuantizerResult
from codec.stages import StageError, stages_for_bitrate

__all__ = [
    "AudioError",
    "CheckpointError",
    "CodecError",
    "CodecOutput",
    "DEFAULT_MODEL_ID",
    "Pretrained",
    "QuantizerResult",
    "SimVQCodec",
    "StageError",
    "TokFormatError",
    "UnknownModelError",
    "compress",
    "decode_array",
    "decompress",
    "encode_array",
    "list_models",
    "load_model",
    "stages_for_bitrate",
]
