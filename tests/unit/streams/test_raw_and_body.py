"""RawStream, the read() contract of GeneratedStream, and CountingBody."""

import io
import shutil

import testtools
from glanceclient.common import http
from oslo_utils import units

from snapworker.streams import body
from snapworker.streams import raw
from tests.unit.streams import fakes

KiB = units.Ki
MiB = units.Mi


class RawStreamTestCase(testtools.TestCase):

    def test_content_size_and_reads(self):
        ranges = [(100, 5000), (MiB, 3 * MiB + 1)]
        view = fakes.FakeView(6 * MiB + 3, ranges)
        stream = raw.RawStream(view, chunk_size=MiB)
        self.assertEqual(6 * MiB + 3, stream.size)
        self.assertEqual(view.content(), fakes.read_all(stream, 300 * KiB))
        self.assertEqual(5000 + 3 * MiB + 1, view.bytes_read)
        self.assertEqual(MiB, max(length for _, length in view.reads))

    def test_empty(self):
        stream = raw.RawStream(fakes.FakeView(0))
        self.assertEqual(0, stream.size)
        self.assertEqual(b'', stream.read())

    def test_read_all_returns_one_chunk(self):
        stream = raw.RawStream(fakes.FakeView(10 * MiB), chunk_size=MiB)
        self.assertEqual(MiB, len(stream.read()))
        self.assertEqual(MiB, len(stream.read(-1)))
        self.assertEqual(MiB, len(stream.read(5 * MiB)))

    def test_reads_are_full_until_the_end(self):
        view = fakes.FakeView(10000, [(3, 4000), (5000, 10)])
        stream = raw.RawStream(view, chunk_size=1000)
        sizes = []
        while chunk := stream.read(999):
            sizes.append(len(chunk))
        self.assertEqual([999] * 10 + [10], sizes)

    def test_copyfileobj(self):
        view = fakes.FakeView(3 * MiB, [(0, 10), (2 * MiB, 7)])
        out = io.BytesIO()
        shutil.copyfileobj(raw.RawStream(view), out)
        self.assertEqual(view.content(), out.getvalue())

    def test_context_manager_closes_view(self):
        view = fakes.FakeView(MiB)
        with raw.RawStream(view) as stream:
            stream.read(1)
        self.assertTrue(view.closed)

    def test_rejects_bad_chunk_size(self):
        self.assertRaises(ValueError, raw.RawStream, fakes.FakeView(1), 0)


class CountingBodyTestCase(testtools.TestCase):

    def test_counts_and_reports(self):
        view = fakes.FakeView(2 * MiB + 5, [(MiB, 10)])
        seen = []
        counting = body.CountingBody(raw.RawStream(view), seen.append)
        self.assertEqual(2 * MiB + 5, counting.size)
        self.assertEqual(view.content(), fakes.read_all(counting, MiB))
        self.assertEqual(2 * MiB + 5, counting.bytes_out)
        self.assertEqual([MiB, 2 * MiB, 2 * MiB + 5], seen)

    def test_glanceclient_chunks_the_body(self):
        """What glanceclient does with ``data=`` of images.upload()."""
        view = fakes.FakeView(3 * MiB + 1, [(10, 20)])
        counting = body.CountingBody(raw.RawStream(view))
        client = http._BaseHTTPClient()
        headers = {'Content-Type': 'application/octet-stream'}
        kwargs = {'data': counting}
        data = client._set_common_request_kwargs(headers, kwargs)
        self.assertTrue(kwargs['stream'])
        sent = b''.join(data)
        self.assertEqual(view.content(), sent)
        self.assertEqual(counting.size, counting.bytes_out)

    def test_empty_body_is_still_read_to_the_end(self):
        counting = body.CountingBody(raw.RawStream(fakes.FakeView(0)))
        self.assertEqual([], list(http._BaseHTTPClient._chunk_body(counting)))

    def test_close_closes_stream_and_view(self):
        view = fakes.FakeView(MiB)
        body.CountingBody(raw.RawStream(view)).close()
        self.assertTrue(view.closed)
