"""Where a training run's numbers go: ``train_log.jsonl``, TensorBoard scalars and the console.

Keys of ``train_log.jsonl``: ``l_pix``, ``l_per``, ``l_gen``, ``l_g_total`` (generator);
``d_adv``, ``d_balance``, ``d_ortho``, ``d_dist``, ``d_z`` (with ``train.d_opt.lambda_z``),
``d_total`` (discriminator); ``acc_d_real``, ``acc_d_fake`` (D's accuracy on real and fake
pixels, the keys :func:`calgan_fast.losses.discriminator_loss` and the BasicSR integration use
too); ``expert_usage`` (share of the real pixels per expert, by argmax of the
routing probabilities), ``expert_usage_sampled`` (by the Gumbel-sampled experts the losses use),
``routing_entropy``, ``routing_pixel_entropy``, ``tau`` (the Gumbel temperature, with
``train.d_opt.tau_end``); ``lr_g``, ``lr_d``, ``it_per_s``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import deque
from pathlib import Path

__all__ = ["ACC_KEYS", "ChanceWatch", "LazyWriter", "RunLog", "tensorboard_available"]

#: D's accuracy on real and on fake pixels.
ACC_KEYS = ("acc_d_real", "acc_d_fake")

#: Shown next to the progress bar.
_BAR_KEYS = ("l_pix", "l_gen", "d_adv", *ACC_KEYS)


class LazyWriter:
    """A TensorBoard ``SummaryWriter`` made on its first use, so that a run that writes nothing
    (a resume that stops at once, a failed start) leaves no empty event file."""

    def __init__(self, folder: str | os.PathLike):
        self.folder, self._w = str(folder), None

    def __getattr__(self, name):
        if self._w is None:
            from torch.utils.tensorboard import SummaryWriter

            self._w = SummaryWriter(self.folder)
        return getattr(self._w, name)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class RunLog:
    """The log of one run folder: JSON lines, TensorBoard and the console (rank 0 writes).

    Args:
        out: the run folder (``train_log.jsonl`` and ``tb/`` go there).
        is_main: whether this process writes (rank 0).
        use_tb: TensorBoard scalars (``logger.use_tb_logger``); without tensorboard installed, a
            warning and none.
    """

    def __init__(self, out: str | os.PathLike, is_main: bool, use_tb: bool):
        self.out, self.is_main = Path(out), is_main
        self.bar = None
        self.tb = None
        if is_main and use_tb:
            if tensorboard_available():
                self.tb = LazyWriter(self.out / "tb")
            else:
                warnings.warn("tensorboard is not installed: no TensorBoard scalars "
                              "(pip install tensorboard)", stacklevel=2)

    @property
    def path(self) -> Path:
        return self.out / "train_log.jsonl"

    # ---------------------------------------------------------------- console
    def say(self, message: str) -> None:
        """A line on the console (above the progress bar), rank 0 only."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def open_bar(self, total: int, initial: int, desc: str) -> None:
        """A tqdm progress bar (rank 0 only)."""
        if not self.is_main:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)

    def advance(self, line: dict | None = None) -> None:
        """One iteration done on the bar; ``line``: a logged line whose losses it shows."""
        if self.bar is None:
            return
        if line is not None:
            self.bar.set_postfix({k: f"{line[k]:.3g}" for k in _BAR_KEYS if k in line}, refresh=False)
        self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    # ---------------------------------------------------------------- files
    def write(self, it: int, phase: int, logs: dict, lr_g: float, lr_d: float, it_per_s: float) -> dict:
        """Appends one line to ``train_log.jsonl`` (rank 0) and returns it as a dict.

        ``logs``: scalars (tensors or numbers) and, under keys starting with ``usage``, per-expert
        shares (written as ``expert_<key>`` lists).
        """
        flat = {"iter": it, "phase": phase}
        for k, v in logs.items():
            if k.startswith("usage"):
                flat["expert_" + k] = [round(float(x), 6) for x in v]
            else:
                flat[k] = float(v)
        flat["lr_g"] = lr_g
        flat["lr_d"] = lr_d
        flat["it_per_s"] = round(it_per_s, 3)
        if self.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(flat) + "\n")
        return flat

    def scalars(self, it: int, logs: dict, lr_g: float, lr_d: float) -> None:
        """The values of ``logs`` as TensorBoard scalars: ``loss/``, ``accuracy/``, ``routing/``, ``lr/``."""
        if self.tb is None:
            return
        for k, v in logs.items():
            if k == "usage_sampled":
                continue
            if k == "usage":
                for i, x in enumerate(v.tolist()):
                    self.tb.add_scalar(f"routing/expert_{i:02d}_usage", x, it)
            elif k.startswith("routing"):
                self.tb.add_scalar(f"routing/{k[8:]}", float(v), it)
            elif k == "tau":
                self.tb.add_scalar("routing/tau", float(v), it)
            elif k in ACC_KEYS:
                self.tb.add_scalar(f"accuracy/{k}", float(v), it)
            else:
                self.tb.add_scalar(f"loss/{k}", float(v), it)
        self.tb.add_scalar("lr/g", lr_g, it)
        self.tb.add_scalar("lr/d", lr_d, it)

    def truncate(self, it: int) -> None:
        """Drops the lines after iteration ``it`` (a run killed between checkpoints logged
        iterations that a resume redoes)."""
        path = self.path
        if not self.is_main or not path.exists():
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln)["iter"] <= it]
        tmp = path.with_name(f".train_log.jsonl.tmp{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, path)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()


class ChanceWatch:
    """Warns when D's mean accuracy on real and fake pixels has stayed within ``margin`` of 0.5
    for a whole window of iterations (checked once per window length).

    ``window``: the recent accuracies; saved in checkpoints so that a resumed run warns alike.
    """

    def __init__(self, length: int, margin: float):
        self.window: deque = deque(maxlen=length)
        self.margin = margin

    def update(self, it: int, logs: dict, warn: bool = True) -> None:
        if ACC_KEYS[0] not in logs:
            return
        self.window.append(0.5 * (float(logs[ACC_KEYS[0]]) + float(logs[ACC_KEYS[1]])))
        n = self.window.maxlen
        if len(self.window) == n and warn:
            mean = sum(self.window) / n
            if mean < 0.5 + self.margin and it % n == 0:
                warnings.warn(f"iteration {it}: the discriminator's accuracy on real/fake pixels has "
                              f"stayed at chance ({mean:.3f}) for {n} iterations; "
                              "consider a smaller train.d_opt.lambda_d", stacklevel=2)
