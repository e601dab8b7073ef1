"""The MLX runtime. Importing it first gives MLX an optimized BLAS on Linux (see runtime.blas) and
keeps freed memory in the process for MLX's CPU arrays (see runtime.malloc)."""
from vidport.runtime.blas import use_fast_blas
from vidport.runtime.malloc import tune_malloc

tune_malloc()
use_fast_blas()
