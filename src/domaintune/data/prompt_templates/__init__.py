"""The built-in prompt templates (domain_zh, alpaca, chatml) as JSON data, read by data/templates.py."""
