"""Sphinx directives that render snapworker's references from its code.

``.. snapworker-events::``, ``.. snapworker-payload::`` and
``.. snapworker-errors::`` take a definition list (``name`` then its
meaning, indented) and render each entry with what the code says about
it: a payload field's type, an error's message and whether it is a
refusal. Every name the code has must be there and no other, or the
build warns (an error with ``-W``): a new field or exception without
documentation fails CI.

``.. snapworker-docstring:: dotted.name`` shows a module's, class's or
function's docstring as literal text (the operator CLI's usage), so the
page follows the code whatever markup the docstring uses.
``.. snapworker-example-payload::`` shows one notification as JSON.
"""

import json

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import snapworker_reference as reference

LOG = logging.getLogger(__name__)


class _EntriesDirective(SphinxDirective):
    """A checked definition list; subclasses say what each term shows."""

    has_content = True
    name = None

    def run(self):
        documented = reference.parse_entries(list(self.content))
        for problem in reference.problems(self.name, documented):
            LOG.warning(problem, location=self.get_location())
        rst = []
        for term in reference.expected(self.name):
            if term not in documented:
                continue
            rst += self.entry(term)
            rst += ['   ' + line for line in documented[term]] + ['']
        node = nodes.container()
        self.state.nested_parse(StringList(rst, self.get_source_info()[0]),
                                self.content_offset, node)
        return node.children

    def entry(self, term):
        raise NotImplementedError


class EventsDirective(_EntriesDirective):
    name = 'snapworker-events'

    def entry(self, term):
        return [f'``{term}``']


class PayloadDirective(_EntriesDirective):
    name = 'snapworker-payload'

    def entry(self, term):
        return [f'``{term}`` ({reference.payload_fields()[term]})']


class ErrorsDirective(_EntriesDirective):
    name = 'snapworker-errors'

    def entry(self, term):
        cls = reference.error_classes().get(term)
        if cls is None:
            return [f'``{term}``', '   *Message*: the exception\'s type and '
                    'text.', '']
        kind = ('refused (``snapshot.create.refused``, the image left '
                'untouched)' if cls.refusal
                else 'failed (``snapshot.create.error``)')
        return [f'``{term}``',
                f'   *Message*: ``{cls.msg_fmt}``', '',
                f'   *Ends as*: {kind}.', '']


class DocstringDirective(SphinxDirective):
    required_arguments = 1

    def run(self):
        text = reference.docstring(self.arguments[0])
        return [nodes.literal_block(text, text)]


class ExamplePayloadDirective(SphinxDirective):

    def run(self):
        text = json.dumps(reference.example_payload(), indent=2)
        block = nodes.literal_block(text, text)
        block['language'] = 'json'
        return [block]


def setup(app):
    for directive in (EventsDirective, PayloadDirective, ErrorsDirective):
        app.add_directive(directive.name, directive)
    app.add_directive('snapworker-docstring', DocstringDirective)
    app.add_directive('snapworker-example-payload', ExamplePayloadDirective)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
