"""CBAS: run long batch jobs on preemptible cloud machines, checkpointed, to the finish."""

__version__ = "0.1.0"
