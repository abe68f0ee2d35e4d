"""Data generation as in the paper (SPEC section 6): LM instructions, Prompt-to-Prompt image pairs, CLIP filter.

Stages, one module each:

- ``text``: a causal LM maps captions to (instruction, edited caption); ``finetune`` trains it on human triples.
- ``p2p`` / ``images``: Stable Diffusion samples both captions from the same noise, the edited branch sharing the
  input branch's self-attention for the first fraction p of the steps.
- ``filter``: CLIP thresholds and the best k per caption pair (scores from ``ip2p.eval.clip``).
- ``writer``: parquet shards in the training format and the original ``seeds.json`` layout, resumable.
- ``shards``: deterministic splitting over processes.

Command line: ``python -m ip2p.datagen {finetune-lm,text,images,filter,run} --help``; see docs/datagen.md.
Submodules are imported on use: this package pulls in no model code by itself.
"""
