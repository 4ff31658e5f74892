"""domaintune studio: the web app over a project folder.

`domaintune studio [ROOT]` serves pages and a JSON API (app.py) over ROOT's configs, data, documents and runs.
It holds no logic of its own beyond views, jobs and security: every action runs the CLI as a job (jobs.py,
job.py) that outlives the studio, and every check is the library's own (forms.py, preview.py).

- app.py: `create_app(project, token, host, port)`, `serve_studio(root, host, port, token)`, the pages.
- security.py: the token, Host, Origin and size checks in front of every route.
- api_runs.py / api_actions.py / api_new.py: the JSON API (reading runs; acting on them; the form, files,
  uploads and documents). browse.py: the predictions browser's rows; markdown_html.py: report.md as safe HTML.
- project.py: ROOT and the one gate for request paths (`confine`); runs.py: finding runs, their status and
  summary, and tailing log.jsonl.
- static/: the pages, their scripts, the stylesheet and a small SVG line chart (chart.js).

Nothing here imports torch or transformers at import time; only `cli` imports this package.
"""
