"""Shared by the template tests of every layer: chat templates that refuse conversations, the way Mistral /
LLaMA-2 / Gemma templates do (`raise_exception`), which must become a clear error; and `spans`, an encoding's
trained and untrained runs as text."""


def spans(tok, ids, mask):
    """[(trainable, decoded text), ...] for each run of equal mask values."""
    out, cur, flag = [], [], None
    for i, m in zip(ids, mask, strict=True):
        if cur and m != flag:
            out.append((flag, tok.decode(cur)))
            cur = []
        cur.append(i)
        flag = m
    if cur:
        out.append((flag, tok.decode(cur)))
    return out


# [INST] layout: refuses a system role and roles that do not alternate user/assistant.
STRICT_INST = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
    "{% endif %}{% endfor %}")

# ChatML layout that refuses a system role.
STRICT_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
