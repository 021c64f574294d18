"""chunk payloads hold one item per line instead of a JSON array

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 23:30:00

A worker split a chunk's JSON array into its elements by scanning the whole text again, which cost it
about 6% of its work per item. The receiver now stores each element on a line of its own, ended by a line
break (any line break inside one was whitespace between tokens and becomes a space), so the split is a
search for line breaks. Pending chunks are recoded; ended ones have no payload. A chunk that a receiver of
before this revision stores as an array while the deployment is upgraded ends with "]" rather than a line
break, and the worker still reads it.
"""

from collections.abc import Callable, Sequence

import lz4.frame
import msgspec
import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    elements = msgspec.json.Decoder(list[msgspec.Raw])
    _recode_pending(
        lambda items: b"".join(bytes(e).replace(b"\n", b" ") + b"\n" for e in elements.decode(items))
    )


def downgrade() -> None:
    _recode_pending(lambda items: b"[" + items.removesuffix(b"\n").replace(b"\n", b",") + b"]")


def _recode_pending(recode: Callable[[bytes], bytes]) -> None:
    """The payloads of chunks still pending, in the other form; one in memory at a time."""
    bind = op.get_bind()
    pending = bind.execute(sa.text("SELECT id FROM chunks WHERE payload IS NOT NULL")).scalars().all()
    for chunk_id in pending:
        payload = bind.execute(
            sa.text("SELECT payload FROM chunks WHERE id = :id"), {"id": chunk_id}
        ).scalar_one()
        items = recode(lz4.frame.decompress(bytes(payload)))
        bind.execute(
            sa.text("UPDATE chunks SET payload = :payload WHERE id = :id"),
            {"payload": lz4.frame.compress(items), "id": chunk_id},
        )
