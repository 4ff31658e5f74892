"""Training and test data: read -> validate -> template -> tokenise + mask.

| module | what |
|---|---|
| `reader.py` | JSON lines / JSON arrays -> (line, value); the one reader of data files |
| `examples.py` | row validation (file, line, field) -> `Example` (OpenAI-style messages) |
| `templates.py` | prompt templates as data (`prompt_templates/*.json`) and the one encoder of conversations |
| `encode.py` | tokenise + mask, over-length policy, validation split, `DataReport` |
"""
