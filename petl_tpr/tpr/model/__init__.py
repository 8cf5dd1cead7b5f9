"""The model room: CLIP checkpoint files (`clip_files`), position-embedding resizing (`position`)
and the dual encoder with its builders and loaders (`dual_encoder`). Public names: `petl_tpr.tpr`."""
