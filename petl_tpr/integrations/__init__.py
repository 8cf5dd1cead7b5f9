"""Integrations with other training stacks. `petl_tpr.integrations.hf`: transformers `Trainer`,
`save_pretrained` / `from_pretrained` and accelerate `save_state` / `load_state` (docs/integrations.md).

Importing this package (or `hf`) needs torch only; transformers or accelerate are imported when used.
"""
