"""How ``snapworker snapshot`` and ``watch`` show snapshots.

Two renderers take the same events (``events.Event``):

``JsonLines``
    one JSON object per event (``event_type``, ``publisher_id``,
    ``payload``): for scripts, ``--format json``, and whenever stdout is
    not a terminal.
``ProgressBoard``
    for a terminal: one live line per snapshot in progress, redrawn in
    place, e.g.::

        3f2a9c1e uploading [########........]  52% 133.1 MiB/256.0 MiB
            31.8 MiB/s ETA 0:04 (stream, disk held)

    and, when a snapshot ends, its result line printed above the live
    ones, where it stays::

        Image 3f2a9c1e-... active: stream, 256.0 MiB uploaded in 8.1 s
        (source held 8.0 s, 0 B scratch)
        Image 3f2a9c1e-... error: Cancelled: ...

Phases, in the order a snapshot goes through them: ``start`` (the worker
chose its plan), ``uploading`` (bytes are going to Glance), ``released``
(the disk is no longer needed: a suspended guest may run), ``active``.
A convert plan releases the disk before it uploads, a stream after; the
line shows which (``disk held`` / ``disk released``).

Rate and ETA are computed here, from the bytes the progress events report
and the time they arrive.
"""

import json
import shutil
import time

from snapworker import notifications

_PHASES = {notifications.END: 'active',
           notifications.ERROR: 'error',
           notifications.REFUSED: 'refused'}

_BAR_WIDTH = 16


def human_bytes(n):
    """``1536`` -> ``'1.5 KiB'``: binary units, one decimal."""
    n = float(n or 0)
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(n) < 1024 or unit == 'TiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return None  # not reached


def human_duration(seconds):
    """``75`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f'{hours}:{minutes:02d}:{seconds:02d}'
    return f'{minutes}:{seconds:02d}'


class JsonLines:
    """One JSON object per event."""

    def __init__(self, out):
        self._out = out

    def show(self, event):
        self._out.write(json.dumps({'event_type': event.event_type,
                                    'publisher_id': event.publisher_id,
                                    'payload': event.payload},
                                   sort_keys=True) + '\n')
        self._out.flush()

    def close(self):
        pass


class SnapshotProgress:
    """What is known of one snapshot, from its events so far."""

    def __init__(self, image_id, clock):
        self.image_id = image_id
        self._clock = clock
        self.payload = {}
        self.phase = 'queued'
        self.released = False
        self._first = None  # (time, bytes) of the first progress seen
        self._last = None

    def update(self, event):
        self.payload = dict(event.payload)
        if event.event_type == notifications.SOURCE_RELEASED:
            self.released = True
        if event.event_type in notifications.FINAL:
            self.phase = _PHASES[event.event_type]
        else:
            self.phase = self._phase()
        now = self._clock()
        if self._first is None:
            self._first = (now, self.done_bytes)
        self._last = (now, self.done_bytes)

    def _phase(self):
        """Where a snapshot in progress is.

        ``uploading`` while bytes are on their way, ``released`` once the
        disk is no longer needed and nothing is on its way (a convert plan
        releases it before its upload, a stream after), else ``start``.
        """
        done, total = self.done_bytes, self.total_bytes
        if done and not (total and done >= total):
            return 'uploading'
        if self.released:
            return 'released'
        return 'uploading' if done else 'start'

    @property
    def done_bytes(self):
        return self.payload.get('bytes_uploaded') or 0

    @property
    def total_bytes(self):
        return (self.payload.get('bytes_total')
                or self.payload.get('virtual_size'))

    @property
    def rate(self):
        """Bytes per second since the first event, or None."""
        if self._first is None or self._last is None:
            return None
        seconds = self._last[0] - self._first[0]
        moved = self._last[1] - self._first[1]
        if seconds <= 0 or moved <= 0:
            return None
        return moved / seconds

    @property
    def eta(self):
        rate, total = self.rate, self.total_bytes
        if not rate or not total:
            return None
        return max(0.0, (total - self.done_bytes) / rate)

    def line(self, width):
        """The live line, at most ``width`` characters: the phase first,
        so that a narrow terminal still shows it."""
        total, done = self.total_bytes, self.done_bytes
        fraction = min(1.0, done / total) if total else 0.0
        filled = int(fraction * _BAR_WIDTH)
        parts = [self.image_id[:8], f'{self.phase:<9}',
                 '[' + '#' * filled + '.' * (_BAR_WIDTH - filled) + ']',
                 f'{fraction * 100:3.0f}%',
                 f'{human_bytes(done)}/{human_bytes(total)}'
                 if total else human_bytes(done)]
        if self.rate:
            parts.append(f'{human_bytes(self.rate)}/s')
        if self.eta is not None and self.phase == 'uploading':
            parts.append(f'ETA {human_duration(self.eta)}')
        strategy = self.payload.get('strategy')
        held = 'disk released' if self.released else 'disk held'
        parts.append(f'({strategy}, {held})' if strategy else f'({held})')
        return ' '.join(parts)[:max(width, 1)]

    def result(self):
        """The line that stays once the snapshot has ended."""
        p = self.payload
        if self.phase != 'active':
            return (f"Image {self.image_id} {self.phase}: "
                    f"{p.get('error_code')}: {p.get('error_message')}")
        moved = (f"{human_bytes(p.get('bytes_uploaded'))} uploaded"
                 if p.get('bytes_uploaded') else 'no data moved')
        held = p.get('source_held_seconds')
        return (f"Image {self.image_id} active: {p.get('strategy')}, "
                f"{moved} in {p.get('duration_seconds')} s "
                f"(source held {held} s, "
                f"{human_bytes(p.get('scratch_bytes'))} scratch)")


class ProgressBoard:
    """Live lines on a terminal, one per snapshot not yet ended.

    The lines are redrawn in place (cursor up, clear line) on every
    event; a snapshot that ends leaves its result line above them.
    """

    def __init__(self, out, clock=time.monotonic, width=None):
        self._out = out
        self._clock = clock
        self._width = width
        self._live = {}
        self._drawn = 0

    def _columns(self):
        if self._width:
            return self._width
        return shutil.get_terminal_size((100, 24)).columns - 1

    def show(self, event):
        image_id = event.image_id or '?'
        progress = self._live.get(image_id)
        if progress is None:
            progress = self._live[image_id] = SnapshotProgress(
                image_id, self._clock)
        progress.update(event)
        finished = []
        if event.event_type in notifications.FINAL:
            finished.append(self._live.pop(image_id).result())
        self._redraw(finished)

    def _redraw(self, finished=()):
        text = ''
        if self._drawn:
            # Back to the first live line: "cursor previous line" n times.
            text += f'\x1b[{self._drawn}F'
        for line in finished:
            text += line + '\x1b[K\n'
        width = self._columns()
        lines = [p.line(width) for p in self._live.values()]
        for line in lines:
            text += line + '\x1b[K\n'
        # Lines left over from a longer board are cleared.
        text += '\x1b[J'
        self._drawn = len(lines)
        self._out.write(text)
        self._out.flush()

    def close(self):
        """Leave the board as it is (the last frame stays visible)."""
        self._out.flush()


def renderer(out, fmt, clock=time.monotonic):
    """The renderer ``--format`` asks for; ``auto`` picks the board on a
    terminal and JSON lines otherwise."""
    if fmt == 'json' or (fmt == 'auto' and not _isatty(out)):
        return JsonLines(out)
    return ProgressBoard(out, clock)


def _isatty(out):
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
