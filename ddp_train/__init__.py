"""ddp_train: train PyTorch models on one CPU, one GPU, many GPUs or many nodes with one command."""

__version__ = "0.1.0"
