"""The reference pages cover exactly what the code has.

The docs build checks the same (warnings are errors there); this runs it
with the unit tests, without Sphinx, so a new payload field, event type
or error code without documentation fails here too.
"""

import configparser
import glob
import os
import sys

import testtools

from snapworker import objects

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, 'doc', 'source')
sys.path.insert(0, os.path.join(SOURCE, '_exts'))

import snapworker_reference as reference  # noqa: E402


def _pages():
    pages = {}
    for path in glob.glob(os.path.join(SOURCE, '*.rst')):
        with open(path) as f:
            pages[os.path.basename(path)] = f.read()
    return pages


class ReferencePagesTestCase(testtools.TestCase):

    def test_every_reference_is_complete(self):
        seen = set()
        for page, text in _pages().items():
            for directive, content in reference.directive_blocks(text):
                seen.add(directive)
                documented = reference.parse_entries(content)
                self.assertEqual(
                    [], reference.problems(directive, documented),
                    f'{page}: {directive}')
        self.assertEqual(set(reference.DIRECTIVES), seen)

    def test_what_must_be_documented_comes_from_the_code(self):
        self.assertEqual(list(objects.SnapshotPayload.fields),
                         reference.expected('snapworker-payload'))
        events = reference.expected('snapworker-events')
        self.assertIn('snapshot.create.refused', events)
        self.assertEqual(6, len(events))
        errors = reference.expected('snapworker-errors')
        self.assertIn('WorkerRestarted', errors)
        self.assertIn(reference.INTERNAL_ERROR, errors)
        self.assertNotIn('SnapshotError', errors)

    def test_a_missing_or_unknown_entry_is_a_problem(self):
        text = _pages()['notifications.rst']
        (content,) = [c for d, c in reference.directive_blocks(text)
                      if d == 'snapworker-payload']
        documented = reference.parse_entries(content)
        del documented['shared_bytes']
        documented['bytes_guessed'] = ['Not a field.']
        documented['store'] = ['']
        problems = ' '.join(reference.problems('snapworker-payload',
                                               documented))
        for word in ('leaves out shared_bytes', 'bytes_guessed',
                     'store has no description'):
            self.assertIn(word, problems)

    def test_example_payload_is_the_current_object(self):
        example = reference.example_payload()
        primitive = example['payload']
        self.assertEqual(
            ('SnapshotPayload', objects.SnapshotPayload.VERSION),
            (primitive['snapworker_object.name'],
             primitive['snapworker_object.version']))
        data = primitive['snapworker_object.data']
        self.assertEqual(set(objects.SnapshotPayload.fields), set(data))
        self.assertEqual(('stream', 'active'),
                         (data['strategy'], data['image_status']))
        self.assertIn(example['event_type'],
                      reference.expected('snapworker-events'))

    def test_every_console_script_is_documented(self):
        setup = configparser.ConfigParser()
        setup.read(os.path.join(ROOT, 'setup.cfg'))
        scripts = [line.split('=')[0].strip() for line in
                   setup['entry_points']['console_scripts'].splitlines()
                   if line.strip()]
        cli = _pages()['cli.rst']
        for script in scripts:
            self.assertIn(f'``{script}', cli)
