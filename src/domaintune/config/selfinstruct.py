"""The `selfinstruct` config section (read by `domaintune gen-data`).

Relative paths (`seeds_path`, `question_template`, `answer_template`, `output_dir`) are read relative to
the current working directory, i.e. where the command runs (not the config file's folder).
The API key is never part of the config: `api_key_env` names the environment variable holding it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import EndpointURL, Section

# Questions that need something a text model cannot see or produce (self-instruct's idea), kept narrow so
# that domain topics such as "video games" or "body image" pass. ASCII keywords match whole words
# ("draw a" does not hit "drawer"); others match as substrings.
DEFAULT_BLOCKLIST = [
    "draw a", "diagram", "flowchart", "attached", "upload", "this image", "this picture", "this photo",
    "请画", "画图", "流程图", "上传", "附件", "这张图", "下图", "上图",
]
# Answers that talk about the model instead of answering.
DEFAULT_ANSWER_BLOCKLIST = [
    "as an ai language model", "as a language model", "i cannot browse",
    "作为一个ai", "作为一个人工智能", "作为ai语言模型", "作为一个语言模型",
]


class Persona(Section):
    name: str = Field("Assistant", description="The assistant's name, filled into {name} in prompts and identity data.")
    organisation: str = Field("domaintune", description="Who made the assistant: fills {organisation}.")
    year: int = Field(2025, description="Year the assistant was made: fills {year}.")


class SelfInstructConfig(Section):
    """Self-instruct data generation: seed questions -> new questions -> filters -> answers -> train.jsonl."""

    domain: str = Field("", description="Domain name written into the prompts (e.g. 家庭教育); required by gen-data.")
    language: Literal["zh", "en"] = Field(
        "zh", description="Language of the built-in prompt templates and identity data.")
    seeds_path: str = Field(
        "", description="Seed questions: JSON lines with a \"question\" field; required by gen-data without "
        "documents (with documents they are optional and only show the style of questions wanted).")
    documents: list[str] = Field(
        default_factory=list, description="Your documents: files, folders or globs of PDF, DOCX, Markdown, HTML "
        "or text. When set, every question is asked about one passage of them and answered from it, and each "
        "train.jsonl row keeps its source (file, page, heading, passage id).")
    exclude: list[str] = Field(
        default_factory=list, description="Files that must not leak into the data (e.g. your test set): a "
        "generated question that shares 8 consecutive tokens with them, or is a near-duplicate of one of their "
        "questions, is dropped (reason contaminated) and counted.")
    exclude_ngram: int = Field(8, ge=4, description="Consecutive tokens (a Chinese character or an English word "
                               "each) a question must share with an excluded file to count as contaminated; "
                               "raise it when common phrases of your domain cause drops.")
    passage_tokens: int = Field(400, ge=50, description="Token budget of one passage (an estimate: about one "
                                "token per Chinese character, 1.3 per English word).")
    passage_overlap: int = Field(40, ge=0, description="Tokens of whole sentences repeated from the previous "
                                 "passage of the same section, so that no question loses its context at a cut.")
    questions_per_passage: int = Field(3, gt=0, description="Questions asked for in one passage's request.")
    judge: bool = Field(True, description="Ask the endpoint whether each document-grounded answer is supported by "
                        "its passage; unsupported answers are dropped with the judge's reason (rejected.jsonl).")
    citations: Literal["metadata", "inline"] = Field(
        "metadata", description="Where a grounded row's source goes: metadata = a \"source\" object in each "
        "train.jsonl row (training ignores it); inline = also a last line of the answer (来源：… / Source: …).")
    doc_question_template: str | None = Field(
        None, description="Question prompt for documents; None = built-in for `language`. Placeholders: {passage} "
        "(required) {source} {examples} {num_examples} {num_questions} {domain} {name} {organisation} {year}.")
    doc_answer_template: str | None = Field(
        None, description="Answer prompt for documents; None = built-in. Placeholders: {question} {passage} "
        "(required) {source} {domain} {name} {organisation} {year}.")
    judge_template: str | None = Field(
        None, description="Faithfulness prompt; None = built-in. Placeholders: {question} {answer} {passage} "
        "(required); the reply must contain SUPPORTED or UNSUPPORTED, then the reason.")
    question_template: str | None = Field(
        None, description="Question prompt template file; None = built-in for `language`. Placeholders: "
        "{domain} {num_questions} {num_examples} {examples} {name} {organisation} {year}.")
    answer_template: str | None = Field(
        None, description="Answer prompt template file; None = built-in for `language`. Placeholders: "
        "{question} {domain} {name} {organisation} {year}.")
    weak_answer_template: str | None = Field(
        None, description="gen-data --preferences without --run: the prompt for a deliberately poor answer (the "
        "rejected side); None = built-in for `language`. Placeholders: {question} {domain} {name} {organisation} "
        "{year}.")
    preference_max_similarity: float = Field(
        0.7, ge=0, le=1, description="gen-data --preferences drops a pair whose chosen and rejected answers reach "
        "this ROUGE-L F1 (near-identical: the pair teaches nothing).")
    persona: Persona = Field(
        default_factory=Persona, description="The assistant persona filled into prompts and identity data.")

    num_questions: int = Field(100, gt=0, description="Target number of Q&A pairs in train.jsonl.")
    questions_per_call: int = Field(10, gt=0, description="New questions asked for in one question-generation request.")
    examples_per_prompt: int = Field(6, ge=0, description="Example questions shown in each question prompt.")
    generated_examples_per_prompt: int = Field(
        2, ge=0, description="How many of those examples come from questions generated so far "
        "(the rest from the seeds).")
    seed: int = Field(42, description="Random seed for sampling the example questions.")

    base_url: EndpointURL = Field("https://api.openai.com/v1", description="OpenAI-compatible endpoint, ending in /v1.")
    model: str = Field("gpt-4o-mini", description="Model name sent to the endpoint.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key (unset = no key sent).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature for questions and answers.")
    max_tokens: int | None = Field(
        1024, gt=0, description="Completion token limit per request; answers cut by it (finish_reason length) "
        "follow on_length.")
    max_concurrency: int = Field(4, gt=0, description="Requests in flight at once (a thread pool of this size).")
    request_timeout: float = Field(60.0, gt=0, description="Seconds to wait for one HTTP response before retrying.")
    max_retries: int = Field(
        5, ge=0, description="Retries by the openai client on 429, 5xx, timeouts and connection errors "
        "(exponential backoff from 0.5 s, honouring Retry-After).")
    malformed_retries: int = Field(
        3, ge=0, description="Retries of a reply that is not a chat completion (not JSON, no choices).")
    retry_base_delay: float = Field(
        1.0, ge=0, description="Base of the exponential backoff (seconds) for malformed-reply and length retries.")
    on_length: Literal["retry", "drop"] = Field(
        "retry", description="Answers cut by max_tokens: ask again (up to length_retries times) or drop them.")
    length_retries: int = Field(2, ge=0, description="With on_length: retry, how often to ask again before dropping.")

    min_question_chars: int = Field(5, ge=0, description="Questions shorter than this (characters) are dropped.")
    max_question_chars: int = Field(300, gt=0, description="Questions longer than this (characters) are dropped.")
    min_answer_chars: int = Field(10, ge=0, description="Answers shorter than this (characters) are dropped.")
    blocklist: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BLOCKLIST),
        description="Questions containing one of these keywords (case-insensitive) are dropped.")
    answer_blocklist: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ANSWER_BLOCKLIST),
        description="Answers containing one of these phrases (case-insensitive) are dropped.")
    rouge_threshold: float = Field(
        0.7, ge=0, le=1, description="Questions whose ROUGE-L F1 with any seed or kept question reaches this "
        "are near-duplicates.")
    max_stalled_calls: int = Field(
        20, gt=0, description="Give up (target not reached) after this many calls in a row that keep nothing.")

    write_messages: bool = Field(False, description="Also write train.messages.jsonl (OpenAI messages format).")
    output_dir: str = Field(
        "runs/gen-data", description="Output directory (resumable: rerun the same command to continue).")
