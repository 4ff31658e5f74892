"""Data generation (`domaintune gen-data`): grow a domain Q&A dataset with an OpenAI-compatible API.

| module | what |
|---|---|
| `selfinstruct.py` | `run_gen_data`: seed questions -> new questions -> filters -> answers -> train.jsonl |
| `client.py` | the OpenAI client with retries, counting every HTTP status |
| `filters.py` | question / answer filters, near-duplicates (ROUGE-L), the numbered-list parser |
| `inputs.py` | seed questions and prompt templates (built-in `prompts/` or the user's) |
| `store.py` | the output directory: append-only working files, train.jsonl, manifest.json |
| `identity.py` | `run_identity`: the built-in "who are you" data with the persona filled in |

The config is the `selfinstruct` section (config/selfinstruct.py).
"""
