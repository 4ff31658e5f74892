"""Training and test data: read -> validate -> template -> tokenise + mask.

| module | what |
|---|---|
| `reader.py` | JSON lines / JSON arrays -> (line, value); the one reader of data files |
| `examples.py` | row validation (file, line, field) -> `Example` (OpenAI-style messages); `check_data_files` |
| `templates.py` | prompt templates as data (`prompt_templates/*.json`) and the one encoder of conversations |
| `encode.py` | tokenise + mask, over-length policy, validation split (capped), `DataReport` |
"""
