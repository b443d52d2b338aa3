import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (module import), so it must be set
# before any test module imports hcconvert.kernels. Without a GPU, run Triton kernels in the
# CPU interpreter; with one, leave the environment alone so the real kernels are tested.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
