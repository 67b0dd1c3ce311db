import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))   # tests/helpers.py
# Without a GPU the Triton kernels run in Triton's interpreter (tiny shapes; set before they are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
