"""Training data: row formats, validation with file:line errors, snapshots."""

from loom.data.formats import Example, RowFormat
from loom.data.reader import ReadReport, read_rows

__all__ = ["Example", "ReadReport", "RowFormat", "read_rows"]
