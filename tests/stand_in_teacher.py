"""A stand-in teacher and judge for the docs' tutorials: an OpenAI-compatible server on 127.0.0.1
(tests/fake_llm_server.py) whose replies follow domaintune's built-in prompts, Chinese and English.

It is not a language model. It reads the prompt and answers in the shape each prompt asks for, from the prompt's
own text, so gen-data, gen-data's preference pairs and judge run their whole path offline:

- questions about a passage (documents): one question per sentence of the passage;
- new questions from seeds (self-instruct): the next ones of a fixed list of 20 (so at most 20 distinct);
- answers: the passage's sentences when there is one, else a short practical answer that names the question;
- weak answers (preference pairs): a vague sentence;
- the data judge: SUPPORTED; the pairwise judge: the second answer (VERDICT: B); the grade judge: 7.
"""
from __future__ import annotations

import itertools
import re

from fake_llm_server import FakeLLM

_PASSAGE = re.compile(r"<(?:passage|资料)>\n(.*?)\n</(?:passage|资料)>|<(?:reference|参考资料)[^>]*>\n(.*?)\n</", re.S)
_SENTENCE = re.compile(r"[^。！？!?\n]+(?:[。！？!?]|(?<=\w)\.(?=\s|$))", re.M)
_QUESTION = re.compile(r"(?:^Question|^问题)[:：]\s*(.+?)\s*$", re.M)
# New questions from seeds: a fixed list, asked in turn (a counter picks the next), so no two are near-duplicates.
_NEW_ZH = [
    "孩子每天晚上拖到十一点才睡，怎么帮他早点上床？", "四岁女儿一不顺心就在超市里大哭，当场该怎么处理？",
    "上初中的儿子回家就关上房门不说话，家长怎样打开话题？", "孩子写作业时总要人陪着，怎样培养他独立完成？",
    "两个孩子天天抢玩具吵架，父母要不要出面裁判？", "孩子挑食只吃肉不吃蔬菜，有什么温和的办法？",
    "零花钱该按周给还是按月给，给多少合适？", "孩子考试没考好不敢告诉父母，我们该如何回应？",
    "老人带孩子时过度溺爱，父母怎样沟通不伤和气？", "孩子说在学校被同学起外号，家长第一步做什么？",
    "暑假里怎样安排作息，才不会开学时调不过来？", "孩子沉迷短视频，强行没收手机有用吗？",
    "三岁宝宝还不太会说完整的句子，需要担心吗？", "怎样让孩子愿意主动分担一点家务？",
    "孩子撒谎被发现后，惩罚和讲道理哪个更有效？", "青春期女儿开始在意外貌，家长该怎么引导？",
    "孩子害怕上幼儿园，每天早上哭着不肯出门怎么办？", "怎样给小学生挑选适合他阅读水平的课外书？",
    "父母意见不一致时当着孩子争论，会有什么影响？", "孩子总拿自己和别的同学比较，变得很自卑，怎么办？",
]
_NEW_EN = [
    "My son won't go to bed before eleven; how can I move his bedtime earlier?",
    "What should I do when my four-year-old has a meltdown in the supermarket?",
    "My teenager shuts himself in his room after school; how do I start a conversation?",
    "How can I get my child to do homework without me sitting next to her?",
    "Should parents referee when siblings fight over toys every day?",
    "My child only eats meat and refuses vegetables; what gentle approaches work?",
    "Is weekly or monthly pocket money better, and how much is reasonable?",
    "My daughter hid a bad test result from us; how should we respond?",
    "Grandparents spoil our toddler when they babysit; how do we raise it kindly?",
    "Classmates call my son names at school; what is the first thing to do?",
    "How do we plan the summer holidays so the school routine is easy to restart?",
    "Does taking away the phone help a child hooked on short videos?",
    "Our three-year-old doesn't speak in full sentences yet; should we worry?",
    "How can I get my kids to help with chores without nagging?",
    "After catching a child lying, does punishment or a talk work better?",
    "My teenage daughter worries about her looks; how can I support her?",
    "My son cries every morning before kindergarten; how can we make drop-off easier?",
    "How do I choose books that match my second-grader's reading level?",
    "What does it do to children when parents argue about them in front of them?",
    "My child keeps comparing himself with classmates and feels worthless; what helps?",
]


def _chinese(text: str) -> bool:
    return sum("\u4e00" <= c <= "\u9fff" for c in text) > len(text) // 10


def _sentences(passage: str) -> list[str]:
    out = [s.strip(" -*#>•\t") for s in _SENTENCE.findall(passage)]
    return [s for s in out if len(s) >= 6]


def _count(prompt: str) -> int:
    m = re.search(r"Write (\d+)|写出(\d+)个", prompt)
    return int(next(g for g in m.groups() if g)) if m else 3


class StandInTeacher(FakeLLM):
    """``with StandInTeacher() as teacher:``; ``teacher.base_url`` is the /v1 URL."""

    def __init__(self) -> None:
        super().__init__(reply_fn=self._reply_text)
        self._counter = itertools.count()

    def _reply_text(self, prompt: str) -> str:
        zh = _chinese(prompt)
        if "UNSUPPORTED" in prompt:  # gen-data's grounding judge
            return "SUPPORTED: 回答中的说法都出自资料。" if zh else "SUPPORTED: every claim is stated in the passage."
        if "VERDICT" in prompt:  # judge, pairwise
            return ("第二个回答更具体，也更可行。\nVERDICT: B" if zh else
                    "The second answer is more specific and practical.\nVERDICT: B")
        if "GRADE" in prompt:  # judge, grade
            return "回答基本准确，可以更具体。\nGRADE: 7" if zh else "Mostly accurate; be more specific.\nGRADE: 7"
        passage = _PASSAGE.search(prompt)
        text = next((g for g in passage.groups() if g), "") if passage else ""
        asks_questions = re.search(r"one question per line|每行一个问题", prompt)
        if asks_questions and text:
            return self._passage_questions(_sentences(text), _count(prompt), zh)
        if asks_questions:
            return self._new_questions(_count(prompt), zh)
        if "poor answer on purpose" in prompt or "不够好的回答" in prompt:
            return "看情况吧，多注意一下就好。" if zh else "It depends; just keep an eye on it."
        if text:
            return " ".join(_sentences(text)[:3]) or text[:200]
        question = _QUESTION.search(prompt)
        q = question[1] if question else ""
        if zh:
            return (f"关于“{q}”：先弄清楚孩子的具体情况，再定一个简单、固定的做法，坚持两周并观察变化；"
                    "如果问题持续或影响生活，建议咨询儿科医生或心理老师。")
        return (f"About “{q}”: first find out what is behind it, then agree on one simple routine and keep it for two "
                "weeks; if the problem persists, talk to a paediatrician or a school counsellor.")

    def _passage_questions(self, sentences: list[str], n: int, zh: bool) -> str:
        picked = [sentences[(next(self._counter)) % len(sentences)] for _ in range(n)] if sentences else []
        if zh:
            qs = [f"{s.rstrip('。！？!?')}，具体应该怎么做？" for s in dict.fromkeys(picked)]
        else:
            qs = [f"What should parents know about this: {s.rstrip('.!?')}?" for s in dict.fromkeys(picked)]
        return "\n".join(f"{k}. {q}" for k, q in enumerate(qs, 1))

    def _new_questions(self, n: int, zh: bool) -> str:
        pool = _NEW_ZH if zh else _NEW_EN
        qs = [pool[next(self._counter) % len(pool)] for _ in range(n)]
        return "\n".join(f"{k}. {q}" for k, q in enumerate(qs, 1))
