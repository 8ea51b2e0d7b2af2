"""Progress bars for long phases: on a terminal, off in logs and pipes."""

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str, show: bool = True) -> Iterator[T]:
    # disable=None: tqdm shows the bar only when stderr is a terminal
    return tqdm(items, desc=desc, unit=unit, leave=False, disable=None if show else True)
