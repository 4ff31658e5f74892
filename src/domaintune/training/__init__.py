"""Training: the one model loader and a run from config to run directory.

| module | what |
|---|---|
| `model.py` | the one loader: tokenizer, base model (dtype, QLoRA), LoRA wrapping, adapters; model card facts |
| `precision.py` | device, dtype, what full / LoRA / QLoRA load and autocast in |
| `trainer.py` | `run_train`: the configured stage (sft, dpo, orpo, kto, simpo) |
| `run.py` | `TrainingRun`: an SFT run set up in stages (output, data, model, trainer), trained, saved |
| `preference.py` | `PreferenceRun`: dpo / orpo / kto / simpo on TRL's trainers, from an SFT run; the reference model |
| `arguments.py` | the `train` section as TrainingArguments; world size; trackers |
| `callbacks.py` | log.jsonl, loss.png and template/config in every checkpoint |
| `outputs.py` | the run directory: fresh / resume / overwrite checks, files written at the end |
| `data_check.py` | `run_data_check`: the data as training sees it, no model loaded |
| `tiny.py` | tiny random models + tokenizers built offline, for tests and the quickstart |
"""
