"""A plan context that writes the image into a file (``snapworker stream``).

Running the worker's own plans (not a copy of their logic) through the
same ``PlanContext`` the pipeline implements is what makes ``snapworker
stream`` show exactly what the worker would upload.
"""

from oslo_utils import units

from snapworker import exception
from snapworker.sources import base


class WriteContext(base.PlanContext):
    """Writes the image stream of ``upload`` to ``out``; journals nothing."""

    #: Names the scratch directory of a convert plan.
    image_id = 'stream'

    def __init__(self, out):
        super().__init__()
        self._out = out
        self.bytes_out = 0

    def upload(self, stream, disk_format, store=None, reads_source=True):
        try:
            while True:
                data = stream.read(units.Mi)
                if not data:
                    break
                self._out.write(data)
                self.bytes_out += len(data)
            self._out.flush()
        finally:
            if reads_source:
                self.add_bytes_read(stream.bytes_read)

    def register_location(self, url, validation_data=None):
        raise exception.UnsupportedDisk(
            path=url, reason='a clone exists only inside a store: '
                             'snapworker stream writes file plans only')

    def source_released(self):
        """No guest waits for a disk named on the command line."""

    def track(self, kind, ref):
        """Nothing to journal: the plan's cleanup runs before exit."""

    def handed_over(self, kind, ref, to, **details):
        return lambda: None
