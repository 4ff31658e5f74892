"""llama.cpp (llama-cpp-python) as the tests of the GGUF export run it: one loader and one greedy decoder, so every
test compares against llama.cpp the same way."""
from __future__ import annotations

import llama_cpp
import numpy as np
from llama_cpp import Llama


def llama(path, n_threads: int = 1, n_ctx: int = 1024, **kw) -> Llama:
    """A quiet llama.cpp model on the GGUF file `path`."""
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, seed=0, verbose=False, **kw)


def llama_greedy(llm: Llama, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from llama.cpp, stopping at an end-of-generation token (not returned) or after n."""
    out: list[int] = []
    llm.reset()
    for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t) or len(out) == n:
            break
        out.append(t)
    return out


def llama_logits(llm: Llama, seq: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `seq` (the model needs `logits_all=True`)."""
    llm.reset()
    llm.eval(seq)
    return np.asarray(llm.scores[: len(seq)])
