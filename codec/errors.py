"""Errors a user can cause: the CLI and the server turn these into one clear line, never a traceback."""


class CodecError(Exception):
    """Base class for every error caused by input, not by a bug."""


class AudioError(CodecError, ValueError):
    """The input audio is missing, unreadable, empty or not finite."""


class TokFormatError(CodecError, ValueError):
    """A .tok file is malformed: wrong magic, version, truncation, CRC, or values out of range."""


class UnknownModelError(CodecError, LookupError):
    """A model id or directory that this installation does not have."""


class CheckpointError(CodecError, ValueError):
    """A checkpoint whose files are missing, altered (sha256 mismatch) or inconsistent."""


class OutputError(CodecError):
    """The output cannot be written: a folder, a full disk, a read-only file system, no permission."""
