"""What the study writes for readers: :mod:`.results` (``results.json`` from the saved runs),
:mod:`.record` (versions, git commit and device for ``run.json``), :mod:`.pages` (``index.html``, the
README's results block, the model card and the CLAIM checklist, from Jinja2 templates in
:mod:`.templates`). ``python -m cxrstudy.reporting --profile P`` updates the README."""
