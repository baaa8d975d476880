"""hvdcomp: gradient compression for Horovod and PyTorch DDP."""
