import os

import torch

# Without a GPU, Triton kernels run under its CPU interpreter. Triton reads this
# when a kernel is defined (at import of the module holding it), so it must be
# set before any test module imports bye_fast.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
