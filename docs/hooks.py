"""mkdocs hook: the training page's config key table is generated from the config schema
(defaults, allowed values and help all come from the code), never written by hand."""

from __future__ import annotations

MARKER = "<!-- config-keys -->"


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    from hacbo_jax.trainer.config.keys import config_key_table

    return markdown.replace(MARKER, config_key_table())
