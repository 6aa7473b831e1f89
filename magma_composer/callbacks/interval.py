"""The ``interval`` option of the package's callbacks."""

from __future__ import annotations

from typing import Union

from composer.core import Time, TimeUnit

from magma_composer.options import OptionError

__all__ = ["parse_interval"]


def parse_interval(interval: Union[str, int, None]) -> Time | None:
    """``'5ep'`` / ``'500ba'`` (an int counts epochs) -> a Time; ``0`` or ``None`` -> ``None`` (only at the end).

    Raises:
        OptionError: not a time in epochs or batches, or not positive.
    """
    if interval in (0, None):
        return None
    try:
        time = Time.from_input(interval, TimeUnit.EPOCH)
    except (ValueError, TypeError):
        raise OptionError(
            "interval", f"{interval!r} is not a Composer time such as '5ep' or '500ba' (0: never)"
        ) from None
    if time.unit not in (TimeUnit.EPOCH, TimeUnit.BATCH) or time.value <= 0:
        raise OptionError("interval", f"{interval!r} must be a positive number of epochs ('5ep') or batches ('500ba')")
    return time
