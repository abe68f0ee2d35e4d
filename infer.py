"""Edit images by following instructions: ``python infer.py --image in.png --instruction "make it winter"``.

See ``python infer.py --help`` and the README's CLI reference. All logic lives in ``ip2p.inference``.
"""

import sys

import torch

from ip2p.inference import main

if __name__ == "__main__":
    # Global numerics flags belong to the entry point, never to the package at import.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sys.exit(main())
