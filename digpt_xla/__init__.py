"""D-iGPT pretraining on CPU, CUDA and XLA from one model core."""

__version__ = "0.1.0"
