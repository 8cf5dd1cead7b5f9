"""The training room: the trainer (`trainer`), optimiser and schedule (`schedule`), losses (`losses`),
multi-process training (`distributed`), run directories and weights (`run_files`), INI run configs
(`run_config`), evaluation (`evaluation`) and retrieval metrics (`metrics`). Public names: `petl_tpr.tpr`."""
