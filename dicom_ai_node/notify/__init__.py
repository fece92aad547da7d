"""Notifications (issue 13 §2): events that need a person, sent to [[notify]] targets.

``Notifier.emit(event, **fields)`` is what the receiver, the job runner and the outbox call;
it only queues (notifier.py). One sender thread formats each event (message.py) and sends it
by webhook (webhook.py) or e-mail (email.py).
"""

from dicom_ai_node.notify.notifier import Notifier, ignore, patients_in

__all__ = ["Notifier", "ignore", "patients_in"]
