"""What a snapshot's emitter sends, and how often."""

import threading
import time

import testtools

from snapworker import notifications
from snapworker import objects


class _Notifier:
    def __init__(self, fail=False):
        self.sent = []
        self.fail = fail

    def _send(self, priority, context, event_type, payload):
        if self.fail:
            raise ConnectionError('broker away')
        self.sent.append((priority, event_type, payload))

    def info(self, context, event_type, payload):
        self._send('info', context, event_type, payload)

    def error(self, context, event_type, payload):
        self._send('error', context, event_type, payload)


class EmitterTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.now = 0.0
        self.notifier = _Notifier()
        self.payload = objects.SnapshotPayload(
            instance_uuid='9f1c2b0e-3d7a-4c55-8e21-6b0f4a9d1c11',
            image_id='1d9e7c3a-52b4-4f0e-9a6c-7e2b8d4f0a55', host='h')
        self.emitter = notifications.SnapshotEmitter(
            self.notifier, None, self.payload, progress_interval=5,
            clock=lambda: self.now)

    def _types(self):
        return [event_type for _, event_type, _ in self.notifier.sent]

    def test_progress_is_throttled(self):
        for self.now in (0.0, 1.0, 4.9, 5.0, 9.0, 10.5):
            self.emitter.progress()
        self.assertEqual(3, self._types().count(notifications.PROGRESS))

    def test_forced_progress_is_always_sent(self):
        self.emitter.progress()
        self.emitter.progress(force=True)
        self.assertEqual(2, len(self.notifier.sent))

    def test_payload_is_versioned_and_complete(self):
        self.emitter.start()
        _, _, primitive = self.notifier.sent[0]
        self.assertEqual('SnapshotPayload',
                         primitive['snapworker_object.name'])
        self.assertEqual(objects.SnapshotPayload.VERSION,
                         primitive['snapworker_object.version'])
        data = primitive['snapworker_object.data']
        # Every field is present from the first event on.
        self.assertEqual(set(objects.SnapshotPayload.fields), set(data))
        self.assertEqual(0, data['bytes_read'])
        self.assertIsNone(data['strategy'])

    def test_error_has_error_priority_code_and_message(self):
        self.emitter.error('ImageNotQueued', 'image is active')
        priority, event_type, primitive = self.notifier.sent[0]
        data = primitive['snapworker_object.data']
        self.assertEqual(('error', notifications.ERROR),
                         (priority, event_type))
        self.assertEqual(('ImageNotQueued', 'image is active'),
                         (data['error_code'], data['error_message']))

    def test_a_lost_notification_does_not_fail_the_snapshot(self):
        self.notifier.fail = True
        self.emitter.start()
        self.emitter.end()


class QueuedNotifierTestCase(testtools.TestCase):
    """Events leave in order from their own thread; a job never waits."""

    class _Blocking:
        def __init__(self):
            self.gate = threading.Event()
            self.sent = []
            self.fail_first = 0

        def info(self, context, event_type, payload):
            self.gate.wait(10)
            if self.fail_first:
                self.fail_first -= 1
                raise ConnectionError('broker away')
            self.sent.append(event_type)

        warn = error = info

    def test_a_blocked_broker_does_not_block_the_caller(self):
        backend = self._Blocking()
        notifier = notifications.QueuedNotifier(backend, retry_delay=0.01)
        started = time.monotonic()
        for event in ('a', 'b', notifications.END):
            notifier.info({}, event, {})
        self.assertLess(time.monotonic() - started, 1)
        backend.fail_first = 2
        backend.gate.set()
        self.assertTrue(notifier.flush(5))
        self.assertEqual(['a', 'b', notifications.END], backend.sent)
        notifier.stop(1)

    def test_full_queue_drops_progress_never_final_events(self):
        backend = self._Blocking()
        notifier = notifications.QueuedNotifier(backend, max_queued=3,
                                                retry_delay=0.01)
        for event in (notifications.START, notifications.PROGRESS,
                      notifications.PROGRESS, notifications.ERROR,
                      notifications.END):
            notifier.info({}, event, {})
        backend.gate.set()
        self.assertTrue(notifier.flush(5))
        self.assertNotIn(notifications.PROGRESS, backend.sent[1:])
        self.assertEqual([notifications.ERROR, notifications.END],
                         backend.sent[-2:])
        notifier.stop(1)
