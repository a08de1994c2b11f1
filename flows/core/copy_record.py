"""What a copy of a backup adds to the primary's manifest: where it came from, when, how, and whether its
bytes were checked. It lives apart from flows.core.copies so both manifest models (dumps and base backups)
can carry it without importing the copy machinery (which imports them)."""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import AwareDatetime, BaseModel, Field

CopyMethod = Literal["server-side", "streamed"]


class CopyRecord(BaseModel):
    """Set on the manifest in a copy location only; the primary's manifest has none."""

    source: str = Field(description="The location the backup was copied from, e.g. s3://bucket/folder.")
    copied_at: AwareDatetime = Field(description="When the copy's manifest was written.")
    method: CopyMethod = Field(
        description="server-side: S3 CopyObject within one endpoint and account; streamed: through the "
        "worker."
    )
    sha256_checked: bool = Field(
        description="The copied main object (dump or tar) hashed to the manifest's sha256 after copying."
    )


# Both manifest models name the field `copy` (the storage contract), which hides pydantic v1's deprecated
# BaseModel.copy; pydantic warns about that at class creation, on every import. Only that warning is muted.
warnings.filterwarnings(
    "ignore",
    message=r'Field name "copy" in "(Manifest|BaseBackupManifest)" shadows an attribute',
    category=UserWarning,
)
