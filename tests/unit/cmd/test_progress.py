"""What ``snapworker snapshot`` and ``watch`` print for events."""

import io
import json
import re

import testtools

from snapworker import events
from snapworker import notifications
from snapworker.cmd import progress

MIB = 1024 ** 2
IMAGE = '3f2a9c1e-0000-4000-8000-000000000001'
OTHER = '7b1d0c2f-0000-4000-8000-000000000002'


def event(event_type, image_id=IMAGE, **payload):
    payload = dict({'image_id': image_id, 'strategy': 'stream',
                    'bytes_uploaded': 0, 'bytes_total': 256 * MIB,
                    'virtual_size': 256 * MIB}, **payload)
    return events.Event(event_type=event_type, publisher_id='snapworker:h',
                        priority='INFO', payload=payload, raw_payload={})


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def frames(text):
    """The visible lines after each redraw, ANSI sequences removed."""
    lines = [re.sub(r'\x1b\[[0-9]*[A-Za-z]', '', line)
             for line in text.split('\n')]
    return [line for line in lines if line]


class HumanUnitsTest(testtools.TestCase):

    def test_bytes_and_durations(self):
        self.assertEqual(['0 B', '1023 B', '1.5 KiB', '256.0 MiB',
                          '2.0 GiB'],
                         [progress.human_bytes(n) for n in
                          (0, 1023, 1536, 256 * MIB, 2 * 1024 ** 3)])
        self.assertEqual(['0:04', '1:15', '1:02:05'],
                         [progress.human_duration(s) for s in
                          (4.4, 75, 3725)])


class ProgressBoardTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.out = io.StringIO()
        self.clock = Clock()
        self.board = progress.ProgressBoard(self.out, self.clock, width=200)

    def show(self, *evs, advance=0):
        for e in evs:
            self.board.show(e)
            self.clock.now += advance

    def phase(self):
        line = frames(self.out.getvalue())[-1]
        return line.split()[1]

    def test_bar_shows_bytes_rate_eta_and_phase(self):
        self.show(event(notifications.START), advance=2)
        self.show(event(notifications.PROGRESS,
                        bytes_uploaded=64 * MIB), advance=0)

        last = frames(self.out.getvalue())[-1]
        self.assertIn('3f2a9c1e uploading [####............]  25%', last)
        self.assertIn('64.0 MiB/256.0 MiB', last)
        self.assertIn('32.0 MiB/s', last)      # 64 MiB in 2 s
        self.assertIn('ETA 0:06', last)        # 192 MiB left at 32 MiB/s
        self.assertIn('(stream, disk held)', last)

    def test_phases_in_order_and_result_line_ends_it(self):
        self.show(event(notifications.START), advance=1)
        phases = [self.phase()]
        self.show(event(notifications.PROGRESS, bytes_uploaded=256 * MIB),
                  advance=1)
        phases.append(self.phase())
        self.show(event(notifications.SOURCE_RELEASED,
                        bytes_uploaded=256 * MIB))
        phases.append(self.phase())
        self.assertEqual(['start', 'uploading', 'released'], phases)
        self.assertIn('(stream, disk released)',
                      frames(self.out.getvalue())[-1])

        self.show(event(notifications.END, bytes_uploaded=256 * MIB,
                        duration_seconds=8.1, source_held_seconds=8.0,
                        scratch_bytes=0))

        text = self.out.getvalue()
        self.assertEqual(f'Image {IMAGE} active: stream, 256.0 MiB '
                         f'uploaded in 8.1 s (source held 8.0 s, 0 B '
                         f'scratch)', frames(text)[-1])
        # The live line was replaced: cursor back up one line, result
        # written, the rest of the screen cleared.
        self.assertTrue(text.endswith('\x1b[1F' + frames(text)[-1]
                                      + '\x1b[K\n\x1b[J'))

    def test_convert_releases_before_it_uploads(self):
        phases = []
        for e in (event(notifications.START, strategy='convert'),
                  event(notifications.SOURCE_RELEASED, strategy='convert'),
                  event(notifications.PROGRESS, strategy='convert',
                        bytes_uploaded=MIB),
                  event(notifications.PROGRESS, strategy='convert',
                        bytes_uploaded=256 * MIB)):
            self.show(e, advance=1)
            phases.append(self.phase())
        self.assertEqual(['start', 'released', 'uploading', 'released'],
                         phases)

    def test_error_result_names_the_code(self):
        self.show(event(notifications.START),
                  event(notifications.ERROR, error_code='Cancelled',
                        error_message='cancelled by ops'))
        self.assertEqual(f'Image {IMAGE} error: Cancelled: cancelled by '
                         f'ops', frames(self.out.getvalue())[-1])

    def test_clone_moves_no_data(self):
        self.show(event(notifications.START, strategy='clone',
                        bytes_total=None),
                  event(notifications.END, strategy='clone',
                        bytes_total=None, duration_seconds=0.4,
                        source_held_seconds=0.1, scratch_bytes=0))
        self.assertIn('active: clone, no data moved in 0.4 s',
                      frames(self.out.getvalue())[-1])

    def test_one_live_line_per_snapshot(self):
        self.show(event(notifications.START),
                  event(notifications.START, image_id=OTHER))
        self.assertEqual(['3f2a9c1e', '7b1d0c2f'],
                         [line.split()[0] for line in
                          frames(self.out.getvalue())[-2:]])
        self.show(event(notifications.END, image_id=OTHER,
                        duration_seconds=1, source_held_seconds=1,
                        scratch_bytes=0))
        # The ended one's result, then the other one still live.
        last = frames(self.out.getvalue())[-2:]
        self.assertTrue(last[0].startswith(f'Image {OTHER} active'))
        self.assertTrue(last[1].startswith('3f2a9c1e start '))

    def test_line_fits_the_terminal(self):
        board = progress.ProgressBoard(self.out, self.clock, width=30)
        board.show(event(notifications.START))
        self.assertEqual(30, len(frames(self.out.getvalue())[-1]))


class RendererChoiceTest(testtools.TestCase):

    class Tty(io.StringIO):
        def isatty(self):
            return True

    def test_auto_is_a_board_on_a_terminal_and_json_otherwise(self):
        self.assertIsInstance(progress.renderer(self.Tty(), 'auto'),
                              progress.ProgressBoard)
        self.assertIsInstance(progress.renderer(io.StringIO(), 'auto'),
                              progress.JsonLines)
        self.assertIsInstance(progress.renderer(self.Tty(), 'json'),
                              progress.JsonLines)
        self.assertIsInstance(progress.renderer(io.StringIO(), 'human'),
                              progress.ProgressBoard)

    def test_json_lines_carry_the_whole_event(self):
        out = io.StringIO()
        progress.JsonLines(out).show(event(notifications.PROGRESS,
                                           bytes_uploaded=MIB))
        line = json.loads(out.getvalue())
        self.assertEqual(('snapshot.progress', 'snapworker:h', MIB),
                         (line['event_type'], line['publisher_id'],
                          line['payload']['bytes_uploaded']))
