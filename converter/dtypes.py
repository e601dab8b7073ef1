"""The dtype vocabulary shared by readers and writers (numpy + ml_dtypes, so bfloat16 needs no torch)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# safetensors dtype codes <-> numpy dtypes
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": BFLOAT16,
    "I64": np.dtype("int64"),
    "U64": np.dtype("uint64"),
    "U32": np.dtype("uint32"),
    "U16": np.dtype("uint16"),
    "I32": np.dtype("int32"),
    "I16": np.dtype("int16"),
    "I8": np.dtype("int8"),
    "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# torch typed-storage class names (as pickled) -> numpy dtypes
TORCH_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("float64"),
    "FloatStorage": np.dtype("float32"),
    "HalfStorage": np.dtype("float16"),
    "BFloat16Storage": BFLOAT16,
    "LongStorage": np.dtype("int64"),
    "IntStorage": np.dtype("int32"),
    "ShortStorage": np.dtype("int16"),
    "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"),
    "BoolStorage": np.dtype("bool"),
}

# names a user gives on the command line
NAMED_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": BFLOAT16,
}


def dtype_name(dtype: np.dtype) -> str:
    """A stable, human name for a dtype ('bfloat16', 'float32', ...)."""
    return np.dtype(dtype).name


def is_floating(dtype: np.dtype) -> bool:
    """True for every float format, bfloat16 and float8 included (numpy does not call those floats)."""
    return dtype_name(dtype).startswith(("float", "bfloat"))
