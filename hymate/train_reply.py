"""The metrics a site's training reply carries: one list for the site that sends them and the
coordinator that screens them.

Why exactly these keys: Flower's strategies refuse to aggregate training replies whose
MetricRecords differ in keys (``InconsistentMessageReplies``), so one site adding or dropping a
metric would stop the round for every site. The coordinator turns such a reply away instead
(server/screening.py), and the site sends exactly these (client/app.py).
"""

from __future__ import annotations

TRAIN_METRICS = frozenset({"num-examples", "train_loss", "seconds"})
