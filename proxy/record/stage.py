"""The record stage: every exchange becomes one decision record (and, through the
recorder's listeners, one OCSF audit event). Runs on the way back, for forwarded
and refused requests alike; an admitted CONNECT is not a decision of its own
(every request inside the tunnel is recorded) and is not recorded.

The typed record is kept in the exchange's stage data (`record_of`), so the stages
that run after this one on the way back (metrics) label what the line says.
"""

from __future__ import annotations

from ..core.chain import Stage
from ..core.exchange import Exchange, Kind
from .decisions import DecisionRecorder
from .model import RECORD_KEY, DecisionRecord


class RecordDecision(Stage):
    name = RECORD_KEY

    def __init__(self, recorder: DecisionRecorder, with_inputs: bool = True) -> None:
        self.recorder = recorder
        self.with_inputs = with_inputs  # keep the sanitised Cedar inputs (replay, explain)

    def on_response(self, ex: Exchange) -> None:
        if ex.kind is Kind.TUNNEL and ex.refusal is None:
            return
        rec = ex.stage_data[RECORD_KEY] = DecisionRecord.from_exchange(ex, with_inputs=self.with_inputs)
        self.recorder.write(rec)
