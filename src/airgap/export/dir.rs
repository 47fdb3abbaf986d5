//! Writing a plan as an OCI layout directory, every blob hashed again on its way out.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::Plan;
use crate::airgap::oci::{self, INDEX_FILE, LAYOUT_FILE, LAYOUT_MARKER};
use crate::airgap::verify::{self, StageError};
use crate::airgap::{AirgapError, write_error};

fn stage_error(e: StageError, path: &Path) -> AirgapError {
    match e {
        StageError::Io(source) => AirgapError::Io {
            context: format!("writing {}", path.display()),
            source,
        },
        StageError::Mismatch(why) => {
            AirgapError::Corrupt(vec![format!("cached blob damaged: {why}")])
        }
    }
}

/// Writes the plan as a layout directory. An existing layout there keeps its content and
/// entries, except entries with a ref name the plan has; `index.json` is written last, so
/// an interrupted export never looks complete.
pub fn write_dir(plan: &Plan, dir: &Path) -> Result<(), AirgapError> {
    fs::create_dir_all(dir).map_err(write_error(dir))?;
    let marker = dir.join(LAYOUT_FILE);
    let index = dir.join(INDEX_FILE);
    let existing = if marker.exists() {
        oci::check_marker(&fs::read(&marker).map_err(write_error(&marker))?)?;
        match fs::read(&index) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(write_error(&index)(e)),
        }
    } else {
        if fs::read_dir(dir)
            .map_err(write_error(dir))?
            .next()
            .is_some()
        {
            return Err(AirgapError::Other(format!(
                "{} is not empty and not an OCI layout",
                dir.display()
            )));
        }
        Vec::new()
    };
    let content = plan
        .manifests
        .iter()
        .map(|(d, body)| (d, None, Some(body)))
        .chain(
            plan.blobs
                .iter()
                .map(|(d, (path, len))| (d, Some((path, *len)), None)),
        );
    for (d, source, body) in content {
        let dest = dir.join(oci::blob_path(d));
        let want_len = source.map_or_else(|| body.map_or(0, |b| b.len() as u64), |(_, l)| l);
        // Content-addressed: a file of the right size is the same content.
        if fs::metadata(&dest).is_ok_and(|m| m.len() == want_len) {
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(write_error(parent))?;
        }
        let tmp = dest.with_file_name(format!(".{}.partial", d.hex()));
        let staged = match (source, body) {
            (Some((path, len)), _) => {
                let src = File::open(path).map_err(write_error(path))?;
                verify::stage(src, &tmp, d, Some(len))
            }
            (None, Some(body)) => verify::stage(&body[..], &tmp, d, Some(want_len)),
            (None, None) => continue,
        };
        staged.map_err(|e| stage_error(e, &dest))?;
        fs::rename(&tmp, &dest).map_err(write_error(&dest))?;
        if let (Some(p), Some(_)) = (&plan.progress, source) {
            p.bytes(want_len);
            p.blob_done();
        }
    }
    if !marker.exists() {
        verify::write_file(&marker, LAYOUT_MARKER).map_err(write_error(&marker))?;
    }
    let doc = oci::index_json(&existing, &plan.entries)?;
    verify::write_file(&index, &doc).map_err(write_error(&index))?;
    Ok(())
}
