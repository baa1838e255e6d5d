//! Shared by the fuzz targets: a scratch file per process, and draining a reader. Must not
//! swallow panics: a panic is the finding.

use std::path::PathBuf;

/// A file in a folder of this process's own, rewritten for every input.
pub fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fhirlift-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(name);
    std::fs::write(&path, data).expect("write the scratch file");
    path
}

/// Reads a source to its end. Every error must carry the file's name; rows and errors are
/// formatted, as the rejects file and `inspect` do.
pub fn drain(reader: fhirlift::source::SourceReader) {
    let file = reader.file().to_string();
    for item in reader {
        match item {
            Ok(row) => {
                let _ = row.to_json_object();
                for cell in row.errors.iter() {
                    assert!(cell.to_string().contains(&file), "{cell}");
                }
            }
            Err(e) => assert!(e.to_string().contains(&file), "{e}"),
        }
    }
}
