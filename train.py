"""Fine-tune an instruction editor: ``accelerate launch train.py --config configs/<name>.yaml [key=value ...]``.

All logic lives in ``ip2p.training``; see ``configs/README.md`` for every config key.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from ip2p.config import ConfigError, load_config
    from ip2p.training import train

    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100 output_dir=runs/x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.data.path.strip():
            # Checked here, before train() builds the run folder and its accelerator: at the command line the fix is
            # --config, which the data layer's own "data.path is empty" cannot say.
            raise ConfigError("data.path is empty: pass --config configs/<name>.yaml (e.g. configs/tiny.yaml) or set "
                              "data.path=<dataset>")
        final = train(cfg)
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError) as e:  # the last: a diverged loss
        logging.getLogger("train").error("error: %s", e)
        return 2
    logging.getLogger("train").info("done: %s", final)
    return 0


if __name__ == "__main__":
    # Global numerics flags belong to the entry point, never to the package at import.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sys.exit(main())
