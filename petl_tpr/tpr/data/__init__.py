"""The data room: dataset readers (`datasets`), the CLIP tokenizer (`bpe`, `tokenizer`), caption
masking (`masking`), image transforms (`transforms`), torch datasets (`torch_data`) and the synthetic
person domains (`synthetic`, `synthetic_draw`, `synthetic_text`). Public names: `petl_tpr.tpr`."""
