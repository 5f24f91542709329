"""User-facing errors. Each message names the problem and the fix; tracebacks are for bugs."""


class NumoeError(Exception):
    """Base class for errors caused by input the user can correct (files, flags, requests)."""


class GGUFFormatError(NumoeError):
    """The file is not a readable GGUF file: bad magic, truncated, corrupt metadata."""


class UnsupportedArchitectureError(NumoeError):
    """general.architecture names a model family numoe cannot run yet."""


class UnsupportedQuantTypeError(NumoeError):
    """A tensor uses a ggml quantization type numoe has no kernel for."""


class TensorShapeError(NumoeError):
    """A tensor is missing or its shape disagrees with the model's metadata."""


class InvalidSamplingParams(NumoeError, ValueError):
    """A sampling parameter is outside its range (message names the parameter and the range)."""
