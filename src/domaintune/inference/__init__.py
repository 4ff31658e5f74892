"""Inference: using a trained run.

| module | what |
|---|---|
| `params.py` | `GenerationParams` and the named presets: every sampling default, "temperature 0 = greedy" |
| `loading.py` | `load_run()`: the one way a run, checkpoint or model directory is loaded (Engine and export) |
| `engine.py` | `Engine`: batched generation, streaming, teacher-forced scoring, with the run's template |
| `stops.py` | stop strings, whole or streamed |
| `predict.py` | `run_predict`: resumable predictions of a test file, then scores; `run_test_loss` |
| `chat.py` | `run_chat`: the streaming terminal chat |
| `serve/` | `run_serve`: the OpenAI-compatible server and web page |
| `export.py` | `run_export`: a standalone merged model directory |
| `benchmark.py` | `run_benchmark`: base and tuned model scored on multiple-choice tasks through lm-eval |
"""
