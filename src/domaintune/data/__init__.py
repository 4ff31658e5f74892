"""Training and test data: read -> validate -> template -> tokenise + mask.

| module | what |
|---|---|
| `reader.py` | JSON lines / JSON arrays -> (line, value); the one reader of data files |
| `examples.py` | row validation (file, line, field) -> `Example` (OpenAI-style messages); `check_data_files` |
| `templates.py` | prompt templates as data (`prompt_templates/*.json`) and the one encoder of conversations |
| `chat_template.py` | the model's own chat_template: each assistant turn's prompt and target, samples per row |
| `thinking.py` | reasoning in answers (`reasoning_content`, `<think>`) and data.thinking keep / drop / empty |
| `encode.py` | tokenise + mask, over-length policy, validation split (capped), `DataReport` |
"""
