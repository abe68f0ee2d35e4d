"""Edit images by following instructions: ``python infer.py --image in.png --instruction "make it winter"``.

See ``python infer.py --help`` and the README's CLI reference. All logic lives in ``ip2p.inference``.
"""

import sys

from ip2p.inference import main

if __name__ == "__main__":
    # No TF32 matmuls (unlike train.py): PyTorch's default precision is what diffusers' pipeline runs with, so an fp32
    # edit on a GPU stays bit-identical to it.
    sys.exit(main())
