//! Removing every program, link and pin the redirector made.
use std::{fs, os::fd::AsFd, path::Path};

use redirector_common::{map_names, program_names};

use crate::{
    error::{Error, Result},
    loader::{link_pin, program_pin},
    sys,
};

/// What uninstall removed, for the operator.
#[derive(Debug, Default, serde::Serialize)]
pub struct Removed {
    pub links_detached: usize,
    pub pins_removed: usize,
}

/// Detaches every pinned link (`BPF_LINK_DETACH`, so the hooks are empty at once even if a
/// running `redirector run` still holds the links), then removes every pin and the directory.
/// Idempotent: a missing pin is skipped, a second run removes nothing and succeeds.
pub fn uninstall(pin_dir: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    for name in program_names::ALL {
        let path = link_pin(pin_dir, name);
        if !path.exists() {
            continue;
        }
        let link =
            sys::obj_get(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        match sys::link_detach(link.as_fd()) {
            Ok(()) => removed.links_detached += 1,
            // Already detached (e.g. its cgroup was removed): nothing to undo.
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
            Err(e) => return Err(Error::io(format!("detaching {}", path.display()), e)),
        }
        remove_pin(&path, &mut removed)?;
    }
    for name in program_names::ALL {
        remove_pin(&program_pin(pin_dir, name), &mut removed)?;
    }
    for name in map_names::ALL {
        remove_pin(&pin_dir.join(name), &mut removed)?;
    }
    for dir in [
        pin_dir.join("links"),
        pin_dir.join("programs"),
        pin_dir.to_owned(),
    ] {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "removing {} (something else is pinned there; remove it by hand)",
                        dir.display()
                    ),
                    e,
                ));
            }
        }
    }
    Ok(removed)
}

fn remove_pin(path: &Path, removed: &mut Removed) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            removed.pins_removed += 1;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}
