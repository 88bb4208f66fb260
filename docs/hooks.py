"""mkdocs hook: render the docstrings' Sphinx roles (``:class:`~lora_inject.Rule```) as code.

The docstrings follow PyTorch's style, whose cross-references are Sphinx roles; mkdocstrings'
Google parser leaves them as ``:class:`` followed by the code span. This turns each into the
code span alone (the last dotted part where the target starts with ``~``), linked to its entry
when the page has one, and the reST ``Example::`` heading as ``Example:``.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):<code>(~?)([\w.]+)</code>")


def on_page_content(html, page, config, files):
    def code(m):
        tilde, target = m.groups()
        text = target.rsplit(".", 1)[-1] if tilde else target
        anchors = [a for a in (target, f"lora_inject.{target}") if f'id="{a}"' in html]
        return f'<a href="#{anchors[0]}"><code>{text}</code></a>' if anchors else f"<code>{text}</code>"

    return ROLE.sub(code, html).replace("<p>Example::</p>", "<p>Example:</p>")
