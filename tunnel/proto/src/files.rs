//! Files only their owner may read: keys, and the certificates and bundles beside them.
use std::{fs, io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use crate::error::{Error, Result};

/// Writes a file only its owner can read (keys, and everything beside them).
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}
