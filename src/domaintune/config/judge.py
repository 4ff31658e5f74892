"""The `judge` config section (read by `domaintune judge`): an OpenAI-compatible model compares two predictions
files (pairwise, both orders) and/or grades each answer 1-10 against the reference.

Relative paths (`rubric` as a file, `pairwise_template`, `grade_template`) are read relative to the current
working directory. The API key is never part of the config: `api_key_env` names the environment variable.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import EndpointURL, Section


class JudgeConfig(Section):
    """LLM-as-a-judge: base (A) vs tuned (B) answers, judged by an endpoint's model."""

    base_url: EndpointURL = Field("https://api.openai.com/v1", description="OpenAI-compatible endpoint of the judge, "
                          "ending in /v1.")
    model: str = Field("gpt-4o", description="Judge model name sent to the endpoint; a strong model judges "
                       "better than a small one.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key (unset = no key sent).")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature of the judge; 0 = as "
                               "repeatable as the endpoint allows.")
    max_tokens: int | None = Field(
        512, gt=0, description="Completion token limit per judge reply (its reasons and the final VERDICT/GRADE "
        "line); a reply cut before that line is malformed and asked again.")
    max_concurrency: int = Field(4, gt=0, description="Judge requests in flight at once (a thread pool of this "
                                 "size).")
    request_timeout: float = Field(60.0, gt=0, description="Seconds to wait for one HTTP response before retrying.")
    max_retries: int = Field(
        5, ge=0, description="Retries by the openai client on 429, 5xx, timeouts and connection errors "
        "(exponential backoff from 0.5 s, honouring Retry-After).")
    malformed_retries: int = Field(
        2, ge=0, description="Asks again after a malformed reply (not a chat completion, or no VERDICT/GRADE "
        "line); after these the call is recorded as unparseable (a tie in pairwise, left out of grade means).")
    retry_base_delay: float = Field(
        1.0, ge=0, description="Base of the exponential backoff (seconds) between malformed-reply retries.")
    language: Literal["zh", "en"] = Field("zh", description="Language of the built-in judge prompts.")
    mode: Literal["pairwise", "grade", "both"] = Field(
        "pairwise", description="pairwise = which answer is better, asked in both orders (A,B) and (B,A); "
        "grade = each answer graded 1-10 against the reference; both = the two.")
    rubric: str = Field(
        "", description="Extra judging criteria for your domain: the text itself, or the path of a UTF-8 "
        "text file (.txt/.md) holding it; filled into {rubric}. Empty = the built-in criteria only.")
    pairwise_template: str | None = Field(
        None, description="Pairwise prompt template file; None = built-in for `language`. Placeholders: "
        "{question} {answer_a} {answer_b} (required) {reference} {rubric}; the reply must end with a line "
        "VERDICT: A, VERDICT: B or VERDICT: TIE.")
    grade_template: str | None = Field(
        None, description="Grading prompt template file; None = built-in for `language`. Placeholders: "
        "{question} {answer} (required) {reference} {rubric}; the reply must end with a line GRADE: N (1-10).")
    max_rows: int | None = Field(
        None, gt=0, description="Judge only the first N rows (a cheap first look; a later run with more "
        "continues); None = every row.")
    bootstrap_samples: int = Field(
        1000, gt=0, description="Resamples of the rows (with replacement) for the 95% intervals.")
    seed: int = Field(0, description="Seed of the bootstrap resampling (same seed, same intervals).")
