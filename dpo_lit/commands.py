"""The subcommands of ``dpo-lit`` and its usage text (no imports: the console prints them at once)."""

SUBCOMMANDS = ("fit", "validate", "predict", "onpolicy", "compare", "frontier", "sweep", "plots")
USAGE = """usage: dpo-lit {fit,validate,predict,onpolicy,compare,frontier,sweep,plots} [--config CONFIG ...] [--KEY VALUE ...]

  fit        train: DPO and its family by default; model.class_path picks SFT, a reward model or PPO
  validate   held-out preference metrics, sampled KL, capability table (--data.val_files: any split)
  predict    sample k completions per prompt, score them, write preference pairs
  onpolicy   generate -> fit -> paired evaluation, for one or more rounds
  compare    every method (DPO, IPO, KTO, online DPO, PPO, RLOO, GRPO) from one model, same budget, measured
  frontier   the DPO paper's IMDb reward-KL frontier: DPO, PPO and baselines, measured along training
  sweep      a grid of overrides (e.g. beta), each point a run, summary.csv/png at the end
  plots      PNGs of a run's TensorBoard scalars

dpo-lit SUBCOMMAND --help lists a subcommand's options; --config goes after the subcommand."""
