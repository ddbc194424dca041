"""What the reference pages must document, read from the code itself.

The notification and troubleshooting pages give each event type, payload
field and error code a meaning in words, written in the page; the names,
types and messages come from here (``snapworker_sphinx`` renders them),
and a page that leaves one out or names one that does not exist fails
the docs build and ``tests/unit/test_docs.py``. No Sphinx import here, so
the unit tests can use it without the documentation requirements.
"""

import importlib
import inspect
import re

from oslo_versionedobjects import fields as ovo_fields

from snapworker import exception
from snapworker import notifications
from snapworker import objects

#: The code a job reports for a failure that is no SnapshotError
#: (pipeline.py); it has no class.
INTERNAL_ERROR = 'InternalError'

#: The directives whose entries are checked, and what they must cover.
DIRECTIVES = ('snapworker-events', 'snapworker-payload',
              'snapworker-errors')


def event_types():
    """Every event type snapworker sends, in the order a snapshot sends them."""
    return [value for name, value in vars(notifications).items()
            if name.isupper() and isinstance(value, str)
            and value.startswith('snapshot.')]


def payload_fields():
    """``{name: 'type, nullable, default ...'}`` of ``SnapshotPayload``."""
    described = {}
    for name, field in objects.SnapshotPayload.fields.items():
        kind = type(field).__name__.removesuffix('Field') or 'String'
        notes = [kind.lower()]
        if field.nullable:
            notes.append('nullable')
        if field.default is not ovo_fields.UnspecifiedDefault:
            notes.append(f'default {field.default!r}')
        described[name] = ', '.join(notes)
    return described


def error_classes():
    """``{error_code: class}`` for every error a snapshot can end with."""
    return {cls.__name__: cls
            for cls in vars(exception).values()
            if inspect.isclass(cls)
            and issubclass(cls, exception.SnapshotError)
            and cls is not exception.SnapshotError}


def expected(directive):
    """The names a directive must document, in the code's order."""
    if directive == 'snapworker-events':
        return event_types()
    if directive == 'snapworker-payload':
        return list(payload_fields())
    if directive == 'snapworker-errors':
        return list(error_classes()) + [INTERNAL_ERROR]
    raise ValueError(f'unknown directive {directive}')


def parse_entries(lines):
    """A definition list's ``{term: [description lines]}``.

    A term is a non-blank line that starts at column 0; its description
    is the indented lines after it (dedented), blank lines included.
    """
    entries, current = {}, None
    for line in lines:
        if line and not line[0].isspace():
            current = line.strip().strip('`')
            entries[current] = []
        elif current is not None:
            entries[current].append(line)
    for term, body in entries.items():
        indent = min((len(x) - len(x.lstrip()) for x in body if x.strip()),
                     default=0)
        entries[term] = [x[indent:] for x in body]
    return entries


def problems(directive, documented):
    """What is wrong with the names a page documents, as sentences."""
    want = expected(directive)
    found = []
    missing = [name for name in want if name not in documented]
    extra = [name for name in documented if name not in want]
    if missing:
        found.append(f'{directive} leaves out {", ".join(missing)}: '
                     f'document what each means')
    if extra:
        found.append(f'{directive} documents {", ".join(extra)}, which '
                     f'the code does not have')
    for name, body in documented.items():
        if not any(line.strip() for line in body):
            found.append(f'{directive}: {name} has no description')
    return found


_DIRECTIVE_RE = re.compile(r'^\.\. (snapworker-[a-z-]+)::\s*$')


def directive_blocks(text):
    """``[(directive, content lines)]`` of the checked directives in rst."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = _DIRECTIVE_RE.match(lines[i])
        i += 1
        if not match or match.group(1) not in DIRECTIVES:
            continue
        content = []
        while i < len(lines) and (not lines[i].strip()
                                  or lines[i].startswith('   ')):
            content.append(lines[i][3:])
            i += 1
        blocks.append((match.group(1), content))
    return blocks


def docstring(dotted):
    """The docstring of a module, or of a class or function in one."""
    module_name, target = dotted, None
    while True:
        try:
            obj = importlib.import_module(module_name)
            break
        except ImportError:
            module_name, _, attr = module_name.rpartition('.')
            if not module_name:
                raise
            target = attr if target is None else f'{attr}.{target}'
    for attr in (target.split('.') if target else ()):
        obj = getattr(obj, attr)
    return inspect.getdoc(obj) or ''


def example_payload():
    """One ``snapshot.create.end`` as a consumer receives it.

    Built with the object's own serialization, so its shape is always
    the current version's; the numbers are those ``tools/run-demo``
    reported for its snapshot of a Nova-style disk (a qcow2 overlay on a
    raw base, 1 GiB virtual, 176 MiB of data) streamed to qcow2.
    """
    payload = objects.SnapshotPayload(
        request_id='req-3b9c8f4e-61a7-4f5e-9a0c-2d8e6f1b7c45',
        instance_uuid='6f1e2c9a-4c1b-4bd5-9d4e-0d2a3c9b7e11',
        image_id='0b6c4f7e-2d59-4e55-a1f5-3c2d1e0f9a88',
        host='compute-1', strategy='stream',
        plan_reason='qcow2 with 1 backing file(s) to qcow2: active layer '
                    'flattened through a read-only qemu-nbd export',
        source_kind='file', source_format='qcow2',
        virtual_size=1073741824, target_format='qcow2',
        bytes_read=184549376, bytes_uploaded=184877056,
        bytes_total=184877056, scratch_bytes=0,
        source_held_seconds=7.792, duration_seconds=8.012,
        image_status='active', image_hashed=True, data_verified=True)
    return {
        'event_type': notifications.END,
        'publisher_id': 'snapworker:compute-1',
        'priority': 'INFO',
        'timestamp': '2026-12-03 15:04:05.123456',
        'message_id': 'e3f5a9b0-7c1d-4e2f-8a6b-9c0d1e2f3a4b',
        'payload': payload.obj_to_primitive(),
    }
