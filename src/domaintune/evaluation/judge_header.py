"""The header of judge.jsonl: what its records belong to, and in words what changed since.

A rerun in the same folder continues the records only when the header still matches: the two predictions
files, the questions, the prompts and rubric (by content), and every judge setting that can change a verdict.
Those settings are the whole `judge` config section less NOT_VERDICT_KEYS, the keys that provably cannot change
a verdict; so a key added to JudgeConfig later is fingerprinted unless it is listed there (with its reason).
"""
from __future__ import annotations

from ..config.judge import JudgeConfig

# Header fields that must match for the records of an earlier run to count in this one, besides the settings.
FINGERPRINT = ("a_sha256", "b_sha256", "questions_sha256", "pairwise_template_sha256", "grade_template_sha256",
               "rubric_sha256")
# Keys of the judge section that cannot change a verdict, so a rerun may change them. Every other key, including
# any added to JudgeConfig later, is recorded in the header's "settings" and must match on a rerun.
NOT_VERDICT_KEYS = {
    "api_key_env": "where the key is read from, not what the judge answers",
    "max_concurrency": "how many calls are in flight at once",
    "request_timeout": "how long one HTTP response is waited for; a timed-out call is retried, never recorded",
    "max_retries": "HTTP retries of the client; a call that still fails stops the run and records nothing",
    "retry_base_delay": "the pause before a malformed reply is asked again",
    "max_rows": "which rows are judged, not how: a later run with more rows continues",
    "bootstrap_samples": "the statistics, recomputed from the records at every run",
    "seed": "the bootstrap's seed, likewise",
}
# Keys whose content, not their value, is fingerprinted (the *_sha256 fields above): a renamed rubric file with
# the same text judges the same, and a template of a kind the mode does not use changes nothing.
CONTENT_KEYS = {"rubric": "rubric_sha256", "pairwise_template": "pairwise_template_sha256",
                "grade_template": "grade_template_sha256"}


def verdict_settings(cfg: JudgeConfig) -> dict:
    """The judge settings the verdicts depend on: the whole section less NOT_VERDICT_KEYS and CONTENT_KEYS."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_VERDICT_KEYS
            and k not in CONTENT_KEYS}


def header_changes(head: dict, header: dict, schema: type[JudgeConfig] = JudgeConfig) -> list[str]:
    """What differs between the header of earlier records (`head`) and this run's (`header`), in words, each
    naming its key; empty when the records can be continued."""
    changed = _changed_settings(head, header, schema)
    changed += [c for c in (_change(k, head, header) for k in FINGERPRINT if head.get(k) != header[k]) if c]
    return changed


def _change(key: str, head: dict, header: dict) -> str | None:
    """What changed in header field `key`, in words; None for a template that only one of the two runs used
    (judge.mode changed, which is said already)."""
    old, new = head.get(key), header[key]
    if key in ("a_sha256", "b_sha256"):
        side = key[0]
        return f"{side.upper()} {head.get(side)} -> {header[side]}: not the same content"
    if key == "questions_sha256":
        return (f"the questions changed (now from {header.get('questions_from')}, before from "
                f"{head.get('questions_from')})")
    if old is None or new is None:
        return None
    name = next(k for k, v in CONTENT_KEYS.items() if v == key)
    what = "text" if name == "rubric" else "prompt template"
    return f"judge.{name}: its {what} changed (sha256 {str(old)[:12]} -> {str(new)[:12]})"


def _changed_settings(head: dict, header: dict, schema: type[JudgeConfig]) -> list[str]:
    """The verdict settings that differ, in words. A key the recorded settings lack (the file was written before
    that key existed) counts as having had its default. A header without settings (written before they were
    recorded, with only mode, model and temperature) cannot be checked: refused."""
    old_settings = head.get("settings")
    if not isinstance(old_settings, dict):
        return ["it was written by an earlier domaintune that did not record every judge setting, so its "
                "verdicts cannot be checked against judge.max_tokens, judge.base_url and the others"]
    fields = schema.model_fields
    out = []
    for key, new in header["settings"].items():
        old = old_settings.get(key, fields[key].default if key in fields else None)
        if old != new:
            out.append(f"judge.{key} {old!r} -> {new!r}")
    return out
