"""Measured peaks that correct the memory forecast: where a setting (or one like it) was measured, the planner
expects that peak and needs a smaller safety margin than the flat USABLE_SHARE of an unproven forecast.

Layer 1. Records are JSON (`measured_peaks.json` beside this file, plus any file named by LOWTUNE_MEASURED_PEAKS):
a list of {"shape": {config.json-like keys of Shape}, "quantization", "lora_r", "optimizer", "micro_batch",
"seq_len", "checkpointing", "offload", "peak_gib", "card", "source"}. `bench/bench_train.py sweep` writes new ones.

Rule (docs/decisions.md): a setting measured exactly expects its measured peak with EXACT_MARGIN; otherwise the
same-mode record nearest to it (same shape first, then quantization, then tokens per micro-batch) scales the
forecast by its measured/forecast ratio, with NEAR_MARGIN plus the spread of all same-mode ratios. Where those ratios
disagree by more than MAX_SPREAD, or no record shares the mode, the forecast stays uncalibrated.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lowtune.models.memory import GIB, Setting, Shape, forecast, long_rows

EXACT_MARGIN = 0.05  # run-to-run and card-to-card spread of one setting's peak (54.8 H100 vs 56.0 GiB H200)
NEAR_MARGIN = 0.15  # a setting not itself measured: forecast error plus allocator fragmentation under a cap
MAX_SPREAD = 0.15
SHIPPED = Path(__file__).with_name("measured_peaks.json")
ENV = "LOWTUNE_MEASURED_PEAKS"


@dataclass(frozen=True)
class Measured:
    shape: Shape
    setting: Setting
    peak_bytes: int

    @classmethod
    def from_json(cls, row: dict) -> Measured:
        keys = ("quantization", "lora_r", "optimizer", "micro_batch", "seq_len", "checkpointing", "offload")
        return cls(Shape(**row["shape"]), Setting(*(row[k] for k in keys)), int(row["peak_gib"] * GIB))

    def to_json(self, **extra: str) -> dict:
        return {"shape": asdict(self.shape), **asdict(self.setting), "peak_gib": round(self.peak_bytes / GIB, 3),
                **extra}

    def ratio(self) -> float:
        """Measured peak over the forecast of the same setting."""
        s = self.setting
        parts = forecast(self.shape, quantization=s.quantization, lora_r=s.lora_r, optimizer=s.optimizer,
                         tokens=s.tokens, checkpointing=s.checkpointing, offload=s.offload, tiled=long_rows(s.seq_len))
        return self.peak_bytes / sum(parts.values())


class Calibration:
    """The memory forecast corrected by measured peaks (satisfies models.memory.Corrector)."""

    def __init__(self, records: list[Measured]) -> None:
        self.records = records

    def correct(self, shape: Shape, setting: Setting, forecast_bytes: int) -> tuple[int, float] | None:
        mode = (setting.checkpointing, setting.offload)
        same_mode = [r for r in self.records if (r.setting.checkpointing, r.setting.offload) == mode]
        exact = [r.peak_bytes for r in same_mode if r.shape == shape and r.setting == setting]
        if exact:
            return max(exact), EXACT_MARGIN
        if not same_mode:
            return None
        ratios = [r.ratio() for r in same_mode]
        spread = max(ratios) / min(ratios) - 1
        if spread > MAX_SPREAD:
            return None
        nearest = min(same_mode, key=lambda r: _distance(r, shape, setting))
        return int(forecast_bytes * nearest.ratio()), NEAR_MARGIN + spread


def _distance(record: Measured, shape: Shape, setting: Setting) -> tuple:
    return (record.shape != shape, record.setting.quantization != setting.quantization,
            abs(math.log(record.setting.tokens / setting.tokens)))


def read_records(path: Path) -> list[Measured]:
    return [Measured.from_json(row) for row in json.loads(path.read_text(encoding="utf-8"))]


def load_calibration(extra: str | None = None) -> Calibration:
    """The shipped measured peaks plus those of the file named by `extra` (default: $LOWTUNE_MEASURED_PEAKS)."""
    records = read_records(SHIPPED) if SHIPPED.is_file() else []
    extra = extra if extra is not None else os.environ.get(ENV)
    if extra:
        records += read_records(Path(extra))
    return Calibration(records)
