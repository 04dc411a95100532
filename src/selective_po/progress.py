"""Progress bars for every long step: a rate, an ETA, and a clock that moves even while one update takes long.

Bars show on the local main process only (as accelerate's do) and respect `TQDM_DISABLE`.
"""

from __future__ import annotations

import os
import threading
import time

from tqdm.auto import tqdm
from transformers import ProgressCallback


def quiet() -> bool:
    return bool(os.environ.get("TQDM_DISABLE"))


def _main_process() -> bool:
    """Whether this is the local main process (accelerate's rule for its own bars): other ranks show none."""
    from accelerate import PartialState

    return PartialState().local_process_index == 0


class Bar(tqdm):
    """A tqdm bar that redraws itself every second while open on a terminal, so its clock moves during a long update."""

    def __init__(self, *args, tick: float = 1.0, **kwargs):
        kwargs.setdefault("dynamic_ncols", True)
        kwargs["disable"] = kwargs.get("disable", False) or quiet() or not _main_process()
        super().__init__(*args, **kwargs)
        self._stop = threading.Event()
        self._ticker = None
        # Redraws help a person watching a terminal; in a log file each one would be another line.
        if not self.disable and getattr(self.fp, "isatty", lambda: False)():
            self._ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True)
            self._ticker.start()

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()
        super().close()


def bar(*, total: int | float | None, desc: str, unit: str = "it", **kwargs) -> Bar:
    return Bar(total=total, desc=desc, unit=unit, **kwargs)


class TickingProgressCallback(ProgressCallback):
    """transformers' training and evaluation bars, redrawn every second (a CPU step takes several)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = Bar(total=state.max_steps)
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and self.prediction_bar is None and eval_dataloader is not None:
            try:
                total = len(eval_dataloader)
            except TypeError:  # an iterable dataset has no length
                total = None
            self.prediction_bar = Bar(total=total, leave=self.training_bar is None)
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)


class TimedStages:
    """One bar over stages whose typical durations are known (seconds, measured on 2 CPU cores).

    Within a stage the bar moves with the clock but stops short of the stage's end; when the stage
    finishes it jumps there. So the ETA is an estimate from those durations, and the bar never claims
    work that is not done.

        with TimedStages("Converting", {"download": 10, "load": 20}) as stages:
            stages.start("download"); ...; stages.start("load"); ...
    """

    def __init__(self, desc: str, durations: dict[str, float]):
        self.durations = durations
        self.ends, total = {}, 0.0
        for name, seconds in durations.items():
            total += seconds
            self.ends[name] = total
        self.desc = desc
        # Redrawn by this class's own clock below, not Bar's.
        self.bar = Bar(total=round(total), desc=desc, unit="s", tick=3600.0, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self._stage, self._stage_start, self._base = None, 0.0, 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> TimedStages:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self._set(self.bar.total)
        self.bar.close()

    def start(self, stage: str) -> None:
        with self._lock:
            if self._stage is not None:
                self._base = self.ends[self._stage]
            self._stage, self._stage_start = stage, time.monotonic()
        self.bar.set_description_str(f"{self.desc} ({stage})", refresh=False)
        self._set(self._base)

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self._stage is None:
                    continue
                end = self.ends[self._stage]
                position = min(self._base + time.monotonic() - self._stage_start, end - 0.5)
            self._set(max(position, self._base))

    def _set(self, position: float) -> None:
        self.bar.n = min(round(position, 1), self.bar.total)
        self.bar.refresh()
