"""The CUDA sources of poet_peft's kernels: the installed package ships them as poet_peft.csrc (see setup.py)."""
