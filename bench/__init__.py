"""qie benchmarks: host runtime vs qie in one process. Importing this package first pins numpy's BLAS
to one thread: its idle worker threads otherwise spin on the second core and distort 2-thread timings."""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
